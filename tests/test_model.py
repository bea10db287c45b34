"""Model properties that need no reference: caching, packing, causality, sizes, configs."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import Llama, ModelConfig, RopeScaling, RunOptions, init_cache
from llama_jax.inference import decode as D
from llama_jax import model as M
from llama_jax.interop.meta_params import meta_params_of
from llama_jax.interop.meta_params import config_from_meta
from llama_jax.interop.hf_config import hf_config_of
from llama_jax.interop.hf_config import config_from_hf

CFG = ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def params():
    p = Llama(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    # Perturb the norms so that their weights matter.
    import flax.linen as nn
    p = nn.unbox(p)
    return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(1), x.shape), p)


def _tokens(b, t, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)).astype(np.int32)


def test_cached_forward_equals_full_forward(params):
    """The one cached path (what generate runs), on the prepared form, against the full forward."""
    tokens = _tokens(2, 560, seed=3)
    full = np.asarray(jax.jit(Llama(CFG).apply)({"params": params}, tokens))
    weights = D.prepare(params)
    assert len(weights.layers) == CFG.n_layers
    step = jax.jit(lambda c, tok, i, last: D.forward(CFG, RunOptions(), weights, tok, c, i, last_only=last),
                   static_argnums=3)
    prefill = 520
    cache = init_cache(CFG, 2, 600)
    logits, _ = step(cache, tokens[:, :prefill], 0, False)
    np.testing.assert_allclose(logits, full[:, :prefill], rtol=1e-5, atol=1e-5)
    logits, cache = step(cache, tokens[:, :prefill], 0, True)
    assert logits.shape == (2, 1, CFG.vocab_size)
    np.testing.assert_allclose(logits[:, 0], full[:, prefill - 1], rtol=1e-5, atol=1e-5)
    for i in range(prefill, tokens.shape[1]):  # then one token at a time
        logits, cache = step(cache, tokens[:, i:i + 1], i, True)
        np.testing.assert_allclose(logits[:, 0], full[:, i], rtol=1e-5, atol=1e-5, err_msg=f"position {i}")
    np.testing.assert_array_equal(cache.segment_ids, np.arange(600)[None].repeat(2, 0) < 560)


def test_packed_row_gives_each_document_its_own_logits(params):
    lengths = [200, 7, 300, 5]  # the last 5 slots are padding (segment 0)
    docs = [_tokens(1, n, seed=i)[0] for i, n in enumerate(lengths[:3])]
    row = np.concatenate(docs + [np.zeros(lengths[3], np.int32)])[None]
    segs = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths[:3])] + [np.zeros(lengths[3])])
    pos = np.concatenate([np.arange(n) for n in lengths])
    packed = np.asarray(Llama(CFG).apply({"params": params}, row, positions=pos[None].astype(np.int32),
                                         segment_ids=segs[None].astype(np.int32)))
    start = 0
    for doc in docs:
        alone = np.asarray(Llama(CFG).apply({"params": params}, doc[None]))
        np.testing.assert_allclose(packed[0, start:start + len(doc)], alone[0], rtol=1e-5, atol=1e-5)
        start += len(doc)


@pytest.mark.parametrize("remat", ["none", "full", "dots_flash"])
def test_unrolled_layer_loop_equals_the_scan(params, remat):
    """Same stacked params, same logits, same (stacked) gradients, packed rows included."""
    tokens = _tokens(2, 520)
    segs = np.repeat((np.arange(520) >= 200)[None].astype(np.int32) + 1, 2, 0)
    pos = np.concatenate([np.arange(200), np.arange(320)])[None].repeat(2, 0).astype(np.int32)
    probe = np.random.default_rng(3).standard_normal((2, 520, CFG.vocab_size)).astype(np.float32)

    def loss_and_logits(p, run):
        logits = Llama(CFG, run).apply({"params": p}, tokens, positions=pos, segment_ids=segs)
        return jnp.sum(logits * probe), logits

    grad = jax.jit(jax.grad(loss_and_logits, has_aux=True), static_argnums=1)
    scan_g, scan_l = grad(params, RunOptions(remat_policy=remat))
    unrolled_g, unrolled_l = grad(params, RunOptions(remat_policy=remat, layer_loop="unrolled"))
    np.testing.assert_allclose(unrolled_l, scan_l, rtol=1e-5, atol=1e-5 * np.abs(scan_l).max())
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(unrolled_g), jax.tree.leaves(scan_g)):
        assert a.shape == b.shape, jax.tree_util.keystr(path)
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err < 1e-5, (jax.tree_util.keystr(path), err)


def test_changing_a_token_changes_no_earlier_logit(params):
    tokens = _tokens(1, 520)
    changed = tokens.copy()
    changed[0, 300] = (changed[0, 300] + 1) % CFG.vocab_size
    f = jax.jit(Llama(CFG).apply)
    a, b = np.asarray(f({"params": params}, tokens)), np.asarray(f({"params": params}, changed))
    np.testing.assert_array_equal(a[:, :300], b[:, :300])
    assert np.abs(a[:, 300:] - b[:, 300:]).max(axis=-1).min() > 0  # every later position moved


@pytest.mark.parametrize("name,count", [("llama-7b", 6.74e9), ("llama-13b", 13.02e9),
                                        ("llama-33b", 32.53e9), ("llama-65b", 65.29e9)])
def test_paper_sizes_by_eval_shape(name, count):
    cfg = ModelConfig.preset(name)
    shapes = M.param_shapes(cfg)  # abstract: no memory is allocated
    leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    n = sum(int(np.prod(x.shape)) for x in leaves)
    assert n == cfg.num_params()
    assert round(n / 1e9, 2) == round(count / 1e9, 2), n


@pytest.mark.parametrize("name,hidden", [("llama-7b", 11008), ("llama-13b", 13824), ("llama-33b", 17920),
                                          ("llama-65b", 22016), ("llama2-70b", 28672), ("llama3-8b", 14336),
                                          ("llama3.1-405b", 53248)])
def test_ffn_hidden_sizes(name, hidden):
    assert ModelConfig.preset(name).ffn_hidden_dim == hidden


def test_logical_axes_on_every_parameter():
    shapes = M.param_shapes(CFG)
    import flax.linen as nn
    boxed = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert boxed and all(isinstance(x, nn.LogicallyPartitioned) for x in boxed)
    for x in boxed:
        assert len(x.names) == len(x.value.shape)
    layer_names = shapes["layers"]["attention"]["wq"].names
    assert layer_names == ("layers", "embed", "heads", "head_dim")


@pytest.mark.parametrize("field,value,needle", [
    ("dim", 130, "divisible by n_heads"), ("n_kv_heads", 3, "multiple of n_kv_heads"),
    ("dim", 4 * 15, "odd head_dim"), ("norm_eps", 0.0, "norm_eps"), ("vocab_size", 0, "vocab_size"),
])
def test_invalid_configs_fail_naming_field_and_value(field, value, needle):
    with pytest.raises(ValueError, match=needle) as e:
        CFG.replace(**{field: value})
    assert field in str(e.value) and repr(value) in str(e.value)


@pytest.mark.parametrize("field,value", [("dtype", "float8"), ("param_dtype", "int8"),
                                         ("attention_impl", "flash9"), ("layer_loop", "while"),
                                         ("fuse_gate_up", "yes"), ("scan_unroll", 0)])
def test_invalid_run_options_fail_naming_field_and_value(field, value):
    with pytest.raises(ValueError, match=field) as e:
        RunOptions(**{field: value})
    assert repr(value) in str(e.value)


def test_unknown_rope_type_fails():
    with pytest.raises(ValueError, match="unknown rope type 'yarn'"):
        RopeScaling(rope_type="yarn")
    with pytest.raises(ValueError, match="unknown rope type 'dynamic'"):
        config_from_hf({**hf_config_of(ModelConfig.preset("llama3-8b")),
                                    "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "rope_parameters": None})


@pytest.mark.parametrize("name", ["llama-7b", "llama-65b", "llama2-70b", "llama3-8b", "llama3.1-405b", "llama3.2-1b",
                                  "llama3.2-3b", "tiny"])
def test_meta_and_hf_configs_round_trip(name, tmp_path):
    cfg = ModelConfig.preset(name)
    meta = json.loads(json.dumps(meta_params_of(cfg)))
    back = config_from_meta(meta, max_seq_len=cfg.max_seq_len, tied=cfg.tie_word_embeddings)
    # LLaMA 1 65B's params.json reads as Llama 2 (same keys, norm_eps 1e-5): the one case to say.
    assert back == cfg or (name == "llama-65b" and back == cfg.replace(generation="2"))
    hf = json.loads(json.dumps(hf_config_of(cfg)))
    from_hf = config_from_hf(hf)
    # HF stores the FFN size, not Meta's recipe for it: the size must survive.
    assert from_hf.ffn_hidden_dim == cfg.ffn_hidden_dim
    assert from_hf.replace(multiple_of=cfg.multiple_of, ffn_dim_multiplier=cfg.ffn_dim_multiplier) == cfg
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg


def test_meta_params_json_as_shipped():
    # Llama 2 70B's params.json, vocab_size -1 ("from the tokenizer").
    shipped = {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
               "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}
    cfg = config_from_meta(shipped, vocab_size=32000, max_seq_len=4096)
    assert cfg == ModelConfig.preset("llama2-70b")
    with pytest.raises(ValueError, match="vocab_size is -1"):
        config_from_meta(shipped)
    with pytest.raises(ValueError, match="missing key 'dim'"):
        config_from_meta({"n_layers": 2})


def test_hf_config_v4_style_with_rope_scaling():
    hf = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
          "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": 128256,
          "max_position_embeddings": 131072, "tie_word_embeddings": False,
          "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    assert config_from_hf(hf) == ModelConfig.preset("llama3.1-8b")
    tied = config_from_hf({**hf, "tie_word_embeddings": True})
    assert tied.tie_word_embeddings and tied.generation.value == "3.2"


def test_run_options_stay_out_of_the_model_config(tmp_path):
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert not fields & {f.name for f in dataclasses.fields(RunOptions)}
    assert CFG.architecture == CFG.to_dict() and ModelConfig.from_dict(CFG.to_dict()) == CFG
    # model_config.json files written while run options lived in ModelConfig still load.
    old = {**CFG.to_dict(), "dtype": "bfloat16", "param_dtype": "float32", "attention_impl": "auto",
           "remat_policy": "dots", "scan_unroll": 1, "layer_loop": "scan", "fuse_gate_up": False}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert ModelConfig.load(tmp_path / "old.json") == CFG
    run = RunOptions(dtype="bfloat16", remat_policy="full", attention_impl="xla", layer_loop="unrolled")
    assert run.dtype == jnp.bfloat16 and run.remat_policy.value == "full"  # converted once, at construction
    assert RunOptions.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    assert RunOptions(dtype=jnp.bfloat16) == RunOptions(dtype="bfloat16")
