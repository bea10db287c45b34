"""The LLaMA generation as a recorded fact: params.json keys per generation (loaded by Meta's
own ModelArgs), the embedding's shard axis, special and stop ids, the CLI override."""
import dataclasses
import json

import jax
import numpy as np
import pytest
import torch

from reference.meta_model_args import MODEL_ARGS, PUBLISHED_PARAMS
from llama_jax import ModelConfig, RopeScaling, generate
from llama_jax.interop import convert as conversion
from llama_jax.checkpoint import abstract_params, save_params
from llama_jax.errors import InputError
from llama_jax.inference.generate import default_stop_ids
from llama_jax.inference.text import generate_text
from llama_jax.generations import Generation
from llama_jax.interop.meta_params import meta_params_of
from llama_jax.interop.meta_params import config_from_meta
from llama_jax.interop.hf_config import hf_config_of
from llama_jax.interop.hf_config import config_from_hf

PRESET_OF = {"1": "llama-7b", "2": "llama2-70b", "3": "llama3-8b", "3.1": "llama3.1-8b", "3.2": "llama3.2-1b",
             "3.3": "llama3.3-70b"}
_TINY = dict(dim=64, n_layers=1, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=64)
_L3 = dict(_TINY, n_kv_heads=2, ffn_dim_multiplier=1.3, rope_theta=500000.0)
TINY = {  # one small model per generation, with that generation's architecture features
    "1": ModelConfig(**_TINY, norm_eps=1e-6, generation="1"),
    "2": ModelConfig(**_TINY, n_kv_heads=2, ffn_dim_multiplier=1.3, generation="2"),  # 70B-like
    "3": ModelConfig(**_L3, generation="3"),
    "3.1": ModelConfig(**_L3, rope_scaling=RopeScaling(factor=8.0), generation="3.1"),
    "3.2": ModelConfig(**_L3, rope_scaling=RopeScaling(factor=32.0), generation="3.2", tie_word_embeddings=True),
    "3.3": ModelConfig(**_L3, rope_scaling=RopeScaling(factor=8.0), generation="3.3"),
}


def _published_without_vocab(p):
    return {k: v for k, v in p.items() if k != "vocab_size"}


@pytest.mark.parametrize("gen", sorted(PRESET_OF))
def test_presets_write_the_published_params_json(gen):
    """Our preset's params.json has Meta's published keys and values (vocab_size: -1 in 1/2)."""
    ours = meta_params_of(ModelConfig.preset(PRESET_OF[gen]))
    assert _published_without_vocab(ours) == _published_without_vocab(PUBLISHED_PARAMS[gen])
    assert ModelConfig.preset(PRESET_OF[gen]).generation.value == gen
    if gen == "2":  # 7B/13B: no GQA, no multiplier, so no keys for them (LLaMA 1's set)
        assert set(meta_params_of(ModelConfig.preset("llama2-7b"))) == set(PUBLISHED_PARAMS["1"])


@pytest.mark.parametrize("gen", sorted(PRESET_OF))
def test_published_params_json_reads_as_the_preset(gen):
    p = PUBLISHED_PARAMS[gen]
    cfg = config_from_meta(p, vocab_size=32000 if p["vocab_size"] < 0 else None,
                                       tied=gen == "3.2", generation="3.3" if gen == "3.3" else None)
    assert cfg == ModelConfig.preset(PRESET_OF[gen])
    if gen == "3.2":  # rope factor 32: from the generation, as params.json only says use_scaled_rope
        assert cfg.rope_scaling.factor == 32.0


def _random_params(cfg, fill=None):
    """numpy params of `cfg`'s shapes (from eval_shape: no slow eager init)."""
    rng = np.random.default_rng(0)
    make = (lambda s: np.full(s, fill, np.float32)) if fill is not None else (
        lambda s: rng.standard_normal(s).astype(np.float32))
    return jax.tree.map(lambda s: make(s[0]), abstract_params(cfg), is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each generation's tiny model, saved and exported to Meta files with 2 shards."""
    out = {}
    for gen, cfg in TINY.items():
        d = tmp_path_factory.mktemp(f"gen{gen}")
        save_params(d / "ckpt", _random_params(cfg), cfg)
        conversion.from_orbax("meta", d / "ckpt", d / "meta", shards=2)
        out[gen] = d
    return out


@pytest.mark.parametrize("gen", sorted(TINY))
def test_meta_export_loads_in_metas_model_args(gen, exports):
    params = json.loads((exports[gen] / "meta" / "params.json").read_text())
    published = set(PUBLISHED_PARAMS[gen])
    assert set(params) == published, (sorted(params), sorted(published))
    args = MODEL_ARGS[gen](max_seq_len=64, max_batch_size=1, **params)  # Meta's own loader call
    cfg = TINY[gen]
    assert (args.dim, args.n_layers, args.n_heads, args.vocab_size) == (cfg.dim, cfg.n_layers, cfg.n_heads, 256)
    assert getattr(args, "n_kv_heads", None) in (None, cfg.n_kv_heads) and args.norm_eps == cfg.norm_eps
    fields = {f.name for f in dataclasses.fields(MODEL_ARGS[gen])}
    assert set(params) <= fields


def test_plain_model_args_reject_keys_of_later_generations():
    """Why the key sets matter: LLaMA 1/2's ModelArgs raise on rope_theta."""
    with pytest.raises(TypeError, match="rope_theta"):
        MODEL_ARGS["2"](**PUBLISHED_PARAMS["3"])


@pytest.mark.parametrize("gen", sorted(TINY))
def test_meta_export_splits_the_embedding_by_generation(gen, exports):
    """Llama 3 on: by vocabulary, whatever its size (Meta's llama3 code); LLaMA 1/2: by dim."""
    shards = [torch.load(exports[gen] / "meta" / f"consolidated.0{k}.pth", weights_only=True) for k in (0, 1)]
    shape = tuple(shards[0]["tok_embeddings.weight"].shape)
    assert shape == ((128, 64) if Generation(gen).llama3_family else (256, 32))
    if gen not in ("2", "3"):
        return  # reading back: once per split axis is enough
    back = conversion.to_orbax("meta", exports[gen] / "meta", exports[gen] / "back", generation=gen)
    assert back.architecture == TINY[gen].replace(max_seq_len=back.max_seq_len).architecture


def test_generation_is_recorded_and_settable_on_the_cli(exports, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("from_orbax", "convert/from_orbax.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    saved = json.loads((exports["2"] / "ckpt" / "model_config.json").read_text())
    assert saved["generation"] == "2"
    cli.main(["--target", "meta", "--input", str(exports["2"] / "ckpt"), "--output", str(tmp_path / "as3"),
              "--shards", "2", "--generation", "3"])
    shard0 = torch.load(tmp_path / "as3" / "consolidated.00.pth", weights_only=True)
    assert tuple(shard0["tok_embeddings.weight"].shape) == (128, 64)
    assert "rope_theta" in json.loads((tmp_path / "as3" / "params.json").read_text())
    legacy = {k: v for k, v in saved.items() if k != "generation"}  # written before the field existed
    assert ModelConfig.from_dict(legacy).generation is Generation.LLAMA2


@pytest.mark.parametrize("gen, stops", [("1", (2,)), ("2", (2,)), ("3", (128001, 128009)),
                                        ("3.1", (128001, 128008, 128009)), ("3.2", (128001, 128008, 128009)),
                                        ("3.3", (128001, 128008, 128009))])
def test_default_stop_ids_by_generation(gen, stops):
    cfg = ModelConfig.preset(PRESET_OF[gen])
    assert default_stop_ids(cfg) == stops
    assert default_stop_ids(cfg.replace(vocab_size=256000)) == stops  # not read off the vocab size


def test_generation_stops_on_eom_for_31():
    """<|eom_id|> 128008 ends a Llama 3.1 generation (Meta's 3.1 stop tokens), not a Llama 3 one."""
    cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, vocab_size=128256, multiple_of=16, rope_theta=500000.0,
                      max_seq_len=64, generation="3.1", rope_scaling=RopeScaling(factor=8.0))
    params = _random_params(cfg, fill=0.0)
    # Layers contribute nothing; every embedding is e_0, so the output column 128008 wins.
    params["tok_embeddings"][:, 0] = 1.0
    params["norm"]["weight"][:] = 1.0
    params["output"][0, 128008] = 1.0
    assert generate(cfg, params, [[128000, 9]], max_new_tokens=4) == [[128008]]
    assert generate(cfg.replace(generation="3"), params, [[128000, 9]], max_new_tokens=4) == [[128008] * 4]

    class Llama3Tokenizer:  # the duck type generate_text takes: eos 128001, 128256 ids
        eos_id, vocab_size = 128001, 128256
        encode = staticmethod(lambda text, bos=True: [128000, 9])
        decode = staticmethod(lambda ids: "".join(f"<{i}>" for i in ids))
    assert generate_text(cfg, params, Llama3Tokenizer(), "x", 4) == ["<128008>"]


def test_unknown_params_json_key_is_one_error_and_writes_nothing(exports, tmp_path):
    import shutil
    src = tmp_path / "meta"
    shutil.copytree(exports["3.1"] / "meta", src)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "rope_scaling_type": "yarn"}))
    with pytest.raises(InputError, match=r"params\.json: unknown key 'rope_scaling_type'") as e:
        conversion.to_orbax("meta", src, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["meta"]  # no temporary directory left either


def test_meta_source_params_json_is_kept_only_for_its_generation(exports, tmp_path):
    src = tmp_path / "meta"
    import shutil
    shutil.copytree(exports["2"] / "meta", src)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))  # as Meta shipped
    conversion.to_orbax("meta", src, tmp_path / "ckpt")
    conversion.from_orbax("meta", tmp_path / "ckpt", tmp_path / "same", shards=2)
    assert (tmp_path / "same" / "params.json").read_bytes() == (src / "params.json").read_bytes()
    conversion.from_orbax("meta", tmp_path / "ckpt", tmp_path / "as3", shards=2, generation="3")
    as3 = json.loads((tmp_path / "as3" / "params.json").read_text())
    assert set(as3) == set(PUBLISHED_PARAMS["3"]) and as3["vocab_size"] == 256


@pytest.mark.parametrize("name, count", [("llama3.2-1b", 1_235_814_400), ("llama3.2-3b", 3_212_749_824),
                                         ("llama3.3-70b", 70_553_706_496), ("llama3.1-8b", 8_030_261_248)])
def test_new_presets_have_the_published_parameter_counts(name, count):
    """Shapes only (eval_shape): the tied 1B/3B count their one embedding matrix once."""
    cfg = ModelConfig.preset(name)
    leaves = jax.tree.leaves(abstract_params(cfg), is_leaf=lambda x: isinstance(x, tuple))
    assert sum(int(np.prod(shape)) for shape, _ in leaves) == cfg.num_params() == count


def test_rope_factor_comes_from_the_files():
    p31 = PUBLISHED_PARAMS["3.1"]
    assert config_from_meta(p31).rope_scaling.factor == 8.0
    # Llama 4's ModelArgs name for it, when a params.json carries one.
    assert config_from_meta({**p31, "rope_scaling_factor": 16.0}).rope_scaling.factor == 16.0
    hf = hf_config_of(ModelConfig.preset("llama3.2-1b"))
    hf["rope_scaling"]["factor"] = hf["rope_parameters"]["factor"] = 4.0
    assert config_from_hf(hf).rope_scaling.factor == 4.0
    with pytest.raises(InputError, match="can only say use_scaled_rope"):  # params.json cannot say 4
        meta_params_of(config_from_hf(hf))
