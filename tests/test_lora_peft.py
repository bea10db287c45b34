"""LoRA adapters (llama_jax.lora) and the peft format (interop/peft.py) against Hugging Face peft.

CPU, float32, a random GQA model of the "tiny" preset's shape, prompts of 600 tokens (a wrong
rotary permutation of the q/k adapters only shows after a few dozen tokens). The base goes
through our HF export (convert.from_orbax), peft loads our adapters onto it, and the way back
loads adapters peft saved.
"""
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hf_utils import hf_logits, hf_model, params_from_hf, rel_err  # noqa: E402
from llama_jax import Llama, ModelConfig, checkpoint, lora as L, sharding  # noqa: E402
from llama_jax.errors import InputError  # noqa: E402
from llama_jax.interop import convert  # noqa: E402
from llama_jax.interop import peft as P  # noqa: E402
from llama_jax.interop.safetensors_files import SafetensorsFile, SafetensorsWriter  # noqa: E402

TOL = 1e-5  # float32 logits, as tests/test_model_parity.py
CFG = ModelConfig.preset("tiny")  # dim 64, 4 heads, 2 kv heads: GQA
T = 600
ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(params, our HF export dir): random weights, exported the way users export."""
    root = tmp_path_factory.mktemp("lora")
    params = params_from_hf(hf_model(CFG, seed=3), CFG)
    checkpoint.save_params(root / "ckpt", params, CFG)
    convert.from_orbax("hf", root / "ckpt", root / "hf")
    return params, root / "hf"


def _hf_base(hf_dir):
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()


def _tokens(seed=1):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (2, T)).astype(np.int32)


def _ours(params, tokens):
    return np.asarray(jax.jit(Llama(CFG).apply)({"params": params}, tokens))


def _random_adapters(lora, seed=0):
    """init_adapters with b made non-zero, so that every adapter changes the logits."""
    adapters = L.init_adapters(CFG, lora, jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 16))
    return jax.tree.map(lambda x: x if np.any(np.asarray(x)) else 0.05 * jax.random.normal(next(keys), x.shape),
                        adapters)


def _export_state_dict(params, root):
    """Our params through the HF export path, read back as {name: array}."""
    checkpoint.save_params(root / "ckpt", params, CFG)
    convert.from_orbax("hf", root / "ckpt", root / "hf")
    f = SafetensorsFile(root / "hf" / "model.safetensors")
    return {n: f.read(n) for n in f.keys()}


def test_zero_b_merge_is_the_base_exactly(base):
    params, _ = base
    lora = L.LoraConfig(rank=4, alpha=8, targets=ALL)
    adapters = L.init_adapters(CFG, lora, jax.random.PRNGKey(0))
    merged = L.merge(params, adapters, lora)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = _tokens()
    np.testing.assert_array_equal(_ours(merged, tokens), _ours(params, tokens))


def test_merge_keeps_the_weight_dtype():
    """bf16 base weights: the sum is taken in float32 and rounded once, back to bf16."""
    lora = L.LoraConfig(rank=2, alpha=3, targets=("wv", "w2"))
    boxed = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16),  # as Llama.init gives them: boxed
                         jax.jit(Llama(CFG).init)(jax.random.PRNGKey(0), _tokens()[:, :8])["params"])
    params = nn.unbox(boxed)
    adapters = _random_adapters(lora)
    merged = L.merge(boxed, adapters, lora)
    w, f = params["layers"]["feed_forward"]["w2"], adapters["layers"]["feed_forward"]["w2"]
    want = (w.astype(np.float32) + L.delta("w2", f["a"], f["b"], 1.5)).astype(w.dtype)
    np.testing.assert_array_equal(merged["layers"]["feed_forward"]["w2"], want)
    assert merged["layers"]["attention"]["wv"].dtype == w.dtype
    assert merged["layers"]["attention"]["wq"] is params["layers"]["attention"]["wq"]  # untouched: shared


def test_init_layout_and_shardings():
    lora = L.LoraConfig(rank=4, alpha=8, targets=ALL)
    adapters = L.init_adapters(CFG, lora, jax.random.PRNGKey(0))
    q = adapters["layers"]["attention"]["wq"]
    assert q["a"].shape == (2, 64, 4) and q["b"].shape == (2, 4, 4, 16)
    assert adapters["layers"]["attention"]["wo"]["a"].shape == (2, 4, 16, 4)
    assert adapters["layers"]["feed_forward"]["w2"]["a"].shape == (2, CFG.ffn_hidden_dim, 4)
    assert not np.any(np.asarray(q["b"])) and np.max(np.abs(q["a"])) <= 1 / np.sqrt(64)
    assert np.std(np.asarray(q["a"])) == pytest.approx(1 / np.sqrt(64) / np.sqrt(3), rel=0.2)  # uniform
    mesh = sharding.make_mesh((1, 4, 2))
    sh = sharding.logical_to_shardings(L.adapter_shapes(CFG, lora), mesh)
    spec = lambda t, f: tuple(sh["layers"][t[0]][t[1]][f].spec)  # noqa: E731
    assert spec(("attention", "wq"), "a") == (None, "fsdp", None)
    assert spec(("attention", "wq"), "b") == (None, None, "tensor", None)
    assert spec(("attention", "wo"), "a") == (None, "tensor", None, None)
    assert spec(("feed_forward", "w2"), "b") == (None, None, "fsdp")


def test_forward_term_is_x_times_the_delta():
    """lora.forward (the unmerged form the model will run) == x @ delta, per target."""
    lora = L.LoraConfig(rank=4, alpha=8, targets=ALL)
    adapters = _random_adapters(lora)
    for name, t in L.TARGETS.items():
        f = adapters
        for p in t.path:
            f = f[p]
        a, b = f["a"][1], f["b"][1]
        x = jax.random.normal(jax.random.PRNGKey(5), (2, 3) + L.factor_shape(t.inputs, CFG, 4))
        want = np.einsum(f"BT{t.inputs},{t.weight}->BT{t.outputs}", x, L.delta(name, a, b, lora.scale))
        np.testing.assert_allclose(L.forward(name, x, a, b, lora.scale), want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_peft_loads_our_adapters_and_merges_like_us(base, tmp_path):
    params, hf_dir = base
    lora = L.LoraConfig(rank=4, alpha=8, targets=ALL)
    adapters = _random_adapters(lora)
    P.save_peft(adapters, lora, CFG, tmp_path / "adapter", base_model_name_or_path=str(hf_dir))
    tokens = _tokens()
    merged = L.merge(params, adapters, lora)
    ours = _ours(merged, tokens)
    assert rel_err(ours, _ours(params, tokens)) > 1e-2  # the adapters matter
    model = peft.PeftModel.from_pretrained(_hf_base(hf_dir), tmp_path / "adapter").eval()
    theirs = hf_logits(model, tokens)
    assert rel_err(ours, theirs) < TOL and rel_err(ours[:, -64:], theirs[:, -64:]) < TOL
    # peft's merge_and_unload == our merged params through our HF export, up to float32
    # rounding: W + s * (B @ A) sums its r products in whatever order each BLAS picks (XLA's
    # dot and torch's differ by an ulp on some CPUs), so both are held to peft's own merge in
    # float64, within a few float32 ulps of the weight's scale.
    merged_sd = {k: v.detach().numpy() for k, v in model.merge_and_unload().state_dict().items()}
    exact = peft.PeftModel.from_pretrained(_hf_base(hf_dir).double(), tmp_path / "adapter").merge_and_unload()
    exact = {k: v.detach().numpy() for k, v in exact.state_dict().items()}
    exported = _export_state_dict(merged, tmp_path / "merged")
    assert set(exported) == set(merged_sd) == set(exact)
    eps = np.finfo(np.float32).eps
    for name, w in exported.items():
        atol = 4 * eps * np.abs(exact[name]).max()
        np.testing.assert_allclose(w, exact[name], rtol=0, atol=atol, err_msg=name)
        np.testing.assert_allclose(merged_sd[name], exact[name], rtol=0, atol=atol, err_msg=name)


def test_peft_parity_on_the_unmerged_forward(base, tmp_path):
    """Llama(lora=...) with the adapters apart == peft on our HF base, float32, 600 tokens."""
    params, hf_dir = base
    lora = L.LoraConfig(rank=4, alpha=8, targets=ALL)
    adapters = _random_adapters(lora, seed=7)
    P.save_peft(adapters, lora, CFG, tmp_path / "adapter", base_model_name_or_path=str(hf_dir))
    tokens = _tokens(seed=4)
    ours = np.asarray(jax.jit(Llama(CFG, lora=lora).apply)({"params": params, "lora": adapters}, tokens))
    assert rel_err(ours, _ours(params, tokens)) > 1e-2  # the adapters matter
    theirs = hf_logits(peft.PeftModel.from_pretrained(_hf_base(hf_dir), tmp_path / "adapter").eval(), tokens)
    assert rel_err(ours, theirs) < TOL and rel_err(ours[:, -64:], theirs[:, -64:]) < TOL


def test_adapters_trained_elsewhere_load_onto_our_model(base, tmp_path):
    params, hf_dir = base
    torch.manual_seed(0)
    config = peft.LoraConfig(r=3, lora_alpha=5, lora_dropout=0.1, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "o_proj", "down_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(_hf_base(hf_dir), config).eval()
    model.save_pretrained(tmp_path / "theirs")
    adapters, lora = P.load_peft(tmp_path / "theirs", CFG)
    assert lora == L.LoraConfig(rank=3, alpha=5, dropout=0.1, targets=("wq", "wk", "wo", "w2"))
    tokens = _tokens(seed=2)
    ours = _ours(L.merge(params, adapters, lora), tokens)
    theirs = hf_logits(model, tokens)
    assert rel_err(theirs, _ours(params, tokens)) > 1e-2
    assert rel_err(ours, theirs) < TOL and rel_err(ours[:, -64:], theirs[:, -64:]) < TOL
    # the same through checkpoints: base checkpoint + peft folder -> merged checkpoint
    P.merge_into_checkpoint(hf_dir.parent / "ckpt", tmp_path / "theirs", tmp_path / "merged")
    config, merged = checkpoint.load_checkpoint(tmp_path / "merged")
    assert config == CFG
    np.testing.assert_array_equal(_ours(merged, tokens), ours)
    # and back out again: the same tensors, bit for bit
    P.save_peft(adapters, lora, CFG, tmp_path / "again")
    a, b = SafetensorsFile(tmp_path / "theirs" / P.WEIGHTS_FILE), SafetensorsFile(tmp_path / "again" / P.WEIGHTS_FILE)
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a.keys():
        np.testing.assert_array_equal(a.read(name), b.read(name), err_msg=name)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(targets=("wq", "wz")), "lora.targets: unknown target 'wz' (expected any of wq, wk, wv, wo, w1, w2, w3"),
    (dict(targets=("wq", "v_proj")), "lora.targets: unknown target 'v_proj' (peft's name for wv) (expected any of "
                                     "wq, wk, wv, wo, w1, w2, w3, got 'v_proj')"),
    (dict(targets="wq"), "lora.targets: must be a tuple"),
    (dict(targets=()), "lora.targets: must name each weight once"),
    (dict(rank=0), "lora.rank: must be a positive integer"),
    (dict(alpha=-1.0), "lora.alpha"),
    (dict(dropout=1.0), "lora.dropout"),
])
def test_bad_lora_config(kwargs, needle):
    with pytest.raises(InputError) as e:
        L.LoraConfig(**kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_peft_names_of_the_targets_are_the_mapping_s():
    assert L.PEFT_NAMES == {P.hf_target_name(t): t for t in L.TARGETS}


def test_rank_larger_than_a_target_names_it():
    lora = L.LoraConfig(rank=40, targets=("wq", "wk"))  # wk is 64 x 32 (2 kv heads of 16)
    with pytest.raises(InputError, match=r"lora.rank: larger than target wk of shape \(64, 2, 16\) "
                                         r"\(a 64 x 32 matrix\) allows \(expected <= 32, got 40\)"):
        L.init_adapters(CFG, lora, jax.random.PRNGKey(0))


def _saved(tmp_path, targets=("wq", "wv"), rank=2):
    lora = L.LoraConfig(rank=rank, alpha=4, targets=targets)
    d = tmp_path / "a"
    P.save_peft(_random_adapters(lora), lora, CFG, d)
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / P.CONFIG_FILE).read_text())
    cfg.update(changes)
    (d / P.CONFIG_FILE).write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, needle", [
    (dict(use_dora=True), "use_dora is not supported (expected false, got True)"),
    (dict(use_rslora=True), "use_rslora is not supported"),
    (dict(bias="all"), "bias is not supported (expected none, got 'all')"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save is not supported"),
    (dict(rank_pattern={"q_proj": 4}), "rank_pattern is not supported"),
    (dict(init_lora_weights="pissa"), "init_lora_weights is not supported"),
    (dict(peft_type="IA3"), "peft_type is not LoRA"),
    (dict(r=8), "shape does not match r=8 on this model (expected (8, 64), got (2, 64))"),
])
def test_load_refuses_what_it_cannot_represent(tmp_path, changes, needle):
    d = _saved(tmp_path)
    _edit_config(d, **changes)
    with pytest.raises(InputError) as e:
        P.load_peft(d, CFG)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_load_refuses_unknown_modules_and_missing_layers(tmp_path):
    d = _saved(tmp_path)
    f = SafetensorsFile(d / P.WEIGHTS_FILE)
    tensors = {n: f.read(n) for n in f.keys()}
    extra = dict(tensors, **{"base_model.model.lm_head.lora_A.weight": np.zeros((2, 64), np.float32)})
    _write(d, extra)
    with pytest.raises(InputError, match=r"tensor base_model.model.lm_head.lora_A.weight: not a LoRA factor"):
        P.load_peft(d, CFG)
    _write(d, {n: w for n, w in tensors.items() if ".layers.1.self_attn.v_proj" not in n})
    with pytest.raises(InputError, match=r"v_proj.lora_A is missing for layers \[1\]"):
        P.load_peft(d, CFG)


def _write(d, tensors):
    w = SafetensorsWriter(d / P.WEIGHTS_FILE, {n: (x.shape, x.dtype) for n, x in tensors.items()})
    for n, x in tensors.items():
        w.write(n, x)
    w.close()


def test_save_refuses_adapters_of_another_rank(tmp_path):
    adapters = _random_adapters(L.LoraConfig(rank=2, targets=("wo",)))
    with pytest.raises(InputError, match=r"adapters/layers/attention/wo/a: shape does not match r=3 on this model "
                                         r"\(expected \(2, 4, 16, 3\), got \(2, 4, 16, 2\)\)"):
        P.save_peft(adapters, L.LoraConfig(rank=3, targets=("wo",)), CFG, tmp_path / "x")
    assert not (tmp_path / "x").exists()
