"""Bit-exact round trips through the Orbax checkpoint, dtype included, on tiny random models."""
import json
import os

import numpy as np
import torch

from test_convert_common import (CASES, assert_same_tensors, read_hf, read_meta, tiny_model, write_hf,
                                 write_meta)
from llama_jax import ModelConfig, load_checkpoint
from llama_jax.interop import convert as conversion


def test_meta_two_shards_float16_round_trip(tmp_path):
    cfg = CASES["gqa"]
    write_meta(tiny_model("gqa"), cfg, str(tmp_path / "meta"), shards=2, dtype=torch.float16, vocab_in_params=False)
    conversion.to_orbax("meta", tmp_path / "meta", tmp_path / "orbax")
    loaded_cfg, params = load_checkpoint(tmp_path / "orbax")
    assert loaded_cfg.vocab_size == cfg.vocab_size
    assert {np.dtype(x.dtype) for x in __import__("jax").tree.leaves(params)} == {np.dtype(np.float16)}
    assert (tmp_path / "orbax" / "tokenizer.model").is_file()
    conversion.from_orbax("meta", tmp_path / "orbax", tmp_path / "back", shards=2)
    before, after = read_meta(str(tmp_path / "meta")), read_meta(str(tmp_path / "back"))
    assert len(after) == 2
    for a, b in zip(before, after):
        assert_same_tensors(a, b)
    params_json = json.loads((tmp_path / "back" / "params.json").read_text())
    assert params_json["n_kv_heads"] == 2 and params_json["vocab_size"] == -1  # the source's, kept
    assert (tmp_path / "back" / "params.json").read_bytes() == (tmp_path / "meta" / "params.json").read_bytes()
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == (tmp_path / "meta" / "tokenizer.model").read_bytes()


def test_meta_reshard_two_to_one_and_four(tmp_path):
    cfg = CASES["mha"]
    write_meta(tiny_model("mha"), cfg, str(tmp_path / "meta"), shards=2, dtype=torch.bfloat16)
    conversion.to_orbax("meta", tmp_path / "meta", tmp_path / "orbax")
    conversion.from_orbax("meta", tmp_path / "orbax", tmp_path / "one", shards=1)
    conversion.from_orbax("meta", tmp_path / "orbax", tmp_path / "four", shards=4)
    conversion.to_orbax("meta", tmp_path / "four", tmp_path / "orbax4")
    (one,) = read_meta(str(tmp_path / "one"))
    assert one["layers.0.attention.wq.weight"].shape == (cfg.dim, cfg.dim)
    _, p2 = load_checkpoint(tmp_path / "orbax")
    _, p4 = load_checkpoint(tmp_path / "orbax4")
    import jax
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), p2, p4)))


def test_llama3_vocab_split_embedding(tmp_path):
    """LLaMA 3 shards split the embedding along the vocabulary (dim 0), not along dim."""
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=128256, multiple_of=32, rope_theta=500000.0)
    rng = torch.Generator().manual_seed(0)
    sd = {n: torch.randn(s, generator=rng) for n, s in _meta_shapes(cfg).items()}
    write_meta(sd, cfg, str(tmp_path / "meta"), shards=2, dtype=torch.bfloat16, vocab_in_params=False)
    shard0 = read_meta(str(tmp_path / "meta"))[0]
    assert shard0["tok_embeddings.weight"].shape == (cfg.vocab_size // 2, cfg.dim)
    conversion.to_orbax("meta", tmp_path / "meta", tmp_path / "orbax")
    got_cfg, params = load_checkpoint(tmp_path / "orbax")
    assert got_cfg.vocab_size == 128256
    emb = np.asarray(params["tok_embeddings"].astype("float32"))
    np.testing.assert_array_equal(emb, sd["tok_embeddings.weight"].to(torch.bfloat16).float().numpy())
    conversion.from_orbax("meta", tmp_path / "orbax", tmp_path / "back", shards=2)
    for a, b in zip(read_meta(str(tmp_path / "meta")), read_meta(str(tmp_path / "back"))):
        assert_same_tensors(a, b)


def _meta_shapes(cfg):
    from llama_jax.interop import mapping as weights
    from llama_jax.interop.formats import Format
    return {n: weights.torch_shape(r, cfg) for r in weights.RULES for n in weights.names(r, cfg, Format.META)}


def test_hf_bfloat16_sharded_round_trip(tmp_path):
    model = write_hf(tiny_model("llama3.1"), str(tmp_path / "hf"), torch.bfloat16, kind="sharded")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    conversion.to_orbax("hf", tmp_path / "hf", tmp_path / "orbax")
    conversion.from_orbax("hf", tmp_path / "orbax", tmp_path / "back", max_shard_size="150KB")
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    sizes = sum(os.path.getsize(tmp_path / "back" / f) for f in set(index["weight_map"].values()))
    assert index["metadata"]["total_size"] < sizes  # tensor bytes, without the headers
    assert_same_tensors(read_hf(str(tmp_path / "hf")), read_hf(str(tmp_path / "back")))
    assert_same_tensors(model.state_dict(), read_hf(str(tmp_path / "back")))
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["dtype"] == "bfloat16"
    assert (tmp_path / "back" / "generation_config.json").is_file()
    assert (tmp_path / "back" / "tokenizer.json").is_file()


def test_hf_float32_bin_round_trip(tmp_path):
    write_hf(tiny_model("mha"), str(tmp_path / "hf"), torch.float32, kind="bin")
    conversion.to_orbax("hf", tmp_path / "hf", tmp_path / "orbax")
    conversion.from_orbax("hf", tmp_path / "orbax", tmp_path / "back")
    assert (tmp_path / "back" / "model.safetensors").is_file()
    assert not (tmp_path / "back" / "model.safetensors.index.json").exists()
    assert_same_tensors(read_hf(str(tmp_path / "hf")), read_hf(str(tmp_path / "back")))


def test_dtype_option_casts(tmp_path):
    model = write_hf(tiny_model("mha"), str(tmp_path / "hf"), torch.float32, kind="single")
    conversion.to_orbax("hf", tmp_path / "hf", tmp_path / "orbax", dtype="bfloat16")
    cfg, params = load_checkpoint(tmp_path / "orbax")
    assert params["output"].dtype == np.dtype("bfloat16")
    conversion.from_orbax("hf", tmp_path / "orbax", tmp_path / "back", dtype="float32")
    back = read_hf(str(tmp_path / "back"))
    want = model.state_dict()["lm_head.weight"].to(torch.bfloat16).float()
    assert back["lm_head.weight"].dtype == torch.float32 and torch.equal(back["lm_head.weight"], want)
