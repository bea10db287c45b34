"""Llama 3.2: tied embeddings and rope factor 32, through both converters and back.

A random Llama-3.2-shaped model (tiny dims, the real 128256 vocabulary, tied, llama3 rope
factor 32) saved by transformers, converted HF -> Orbax -> HF and -> Meta -> Orbax -> HF:
logits equal transformers' (float32, 600 tokens, 1e-5 relative), tensors bit-exact.
"""
import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from hf_utils import hf_logits, hf_model, rel_err
from test_convert_common import assert_same_tensors, read_hf, read_meta, write_hf
from llama_jax import Llama, ModelConfig, RopeScaling, load_checkpoint
from llama_jax.interop import convert as conversion
from llama_jax.errors import InputError

TOL, T = 1e-5, 600
CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                  ffn_dim_multiplier=1.5, rope_theta=500000.0, rope_scaling=RopeScaling(factor=32.0),
                  max_seq_len=1024, generation="3.2", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tied")
    model = hf_model(CFG, seed=3)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # transformers ties them
    write_hf(model, str(tmp / "hf"), torch.float32, kind="single")
    assert "lm_head.weight" not in read_hf(str(tmp / "hf"))
    tokens = np.random.default_rng(5).integers(0, CFG.vocab_size, (1, T)).astype(np.int32)
    return tmp, model, tokens, hf_logits(model, tokens)


def _ours(path, tokens):
    cfg, params = load_checkpoint(path)
    return cfg, params, np.asarray(jax.jit(Llama(cfg).apply)({"params": params}, tokens))


def test_hf_tied_model_converts_with_logits_equal_to_transformers(src):
    tmp, model, tokens, theirs = src
    conversion.to_orbax("hf", tmp / "hf", tmp / "orbax")
    cfg, params, ours = _ours(tmp / "orbax", tokens)
    assert cfg.tie_word_embeddings and cfg.generation.value == "3.2" and cfg.rope_scaling.factor == 32.0
    assert "output" not in params  # one stored matrix
    assert rel_err(ours, theirs) < TOL and rel_err(ours[:, -64:], theirs[:, -64:]) < TOL
    # The factor matters at these lengths: read as 8 (Meta's hard-coded value) it would fail.
    wrong = np.asarray(Llama(cfg.replace(rope_scaling=RopeScaling(factor=8.0))).apply({"params": params}, tokens))
    assert rel_err(wrong, theirs) > 100 * TOL


def test_hf_round_trip_is_bit_exact_and_loads_in_transformers(src):
    tmp, model, tokens, theirs = src
    if not (tmp / "orbax").exists():
        conversion.to_orbax("hf", tmp / "hf", tmp / "orbax")
    conversion.from_orbax("hf", tmp / "orbax", tmp / "hf_back")
    assert_same_tensors(read_hf(str(tmp / "hf")), read_hf(str(tmp / "hf_back")))
    config = json.loads((tmp / "hf_back" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["rope_scaling"]["factor"] == 32.0
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(
        tmp / "hf_back", output_loading_info=True, attn_implementation="eager", dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert rel_err(hf_logits(loaded, tokens), theirs) < TOL


def test_meta_export_carries_the_embedding_twice_and_comes_back_tied(src):
    tmp, model, tokens, theirs = src
    if not (tmp / "orbax").exists():
        conversion.to_orbax("hf", tmp / "hf", tmp / "orbax")
    conversion.from_orbax("meta", tmp / "orbax", tmp / "meta", shards=2)
    shards = read_meta(str(tmp / "meta"))
    for s in shards:  # Meta's model always has `output`, loaded strictly: the same matrix again
        assert torch.equal(s["output.weight"], s["tok_embeddings.weight"])
        assert s["tok_embeddings.weight"].shape == (CFG.vocab_size // 2, CFG.dim)  # split by vocabulary
    params = json.loads((tmp / "meta" / "params.json").read_text())
    assert params["use_scaled_rope"] is True and "rope_scaling_factor" not in params
    conversion.to_orbax("meta", tmp / "meta", tmp / "orbax_meta")
    cfg, _, ours = _ours(tmp / "orbax_meta", tokens)
    via_hf = ModelConfig.load(tmp / "orbax" / "model_config.json")
    # Tied, 3.2, factor 32: read back from the files (Meta's have no context length: 3.2's).
    assert cfg.architecture == via_hf.replace(max_seq_len=131072).architecture
    assert rel_err(ours, theirs) < TOL
    conversion.from_orbax("hf", tmp / "orbax_meta", tmp / "hf_again")
    assert_same_tensors(read_hf(str(tmp / "hf")), read_hf(str(tmp / "hf_again")))


def test_tied_config_with_a_different_lm_head_is_one_error(src, tmp_path):
    tmp = src[0]
    bad = tmp_path / "bad"
    shutil.copytree(tmp / "hf", bad)
    sd = load_file(bad / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + 1.0
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"model\.safetensors: .*tie_word_embeddings.*lm_head\.weight") as e:
        conversion.to_orbax("hf", bad, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # an equal copy is fine
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    assert conversion.to_orbax("hf", bad, tmp_path / "ok").tie_word_embeddings


def test_meta_said_to_be_32_with_a_different_output_is_one_error(src, tmp_path):
    tmp = src[0]
    if not (tmp / "meta").exists():
        pytest.skip("needs the Meta export of the test above")
    bad = tmp_path / "bad"
    shutil.copytree(tmp / "meta", bad)
    for f in sorted(bad.glob("consolidated.*.pth")):
        sd = torch.load(f, weights_only=True)
        sd["output.weight"] = sd["output.weight"] + 1.0
        torch.save(sd, f)
    with pytest.raises(InputError, match=r"consolidated\.\*\.pth: generation 3\.2 ties .*output\.weight differs"):
        conversion.to_orbax("meta", bad, tmp_path / "out", generation="3.2")
    assert not (tmp_path / "out").exists()
    untied = conversion.to_orbax("meta", bad, tmp_path / "untied")  # unsaid: an untied 3.1 model
    assert not untied.tie_word_embeddings and untied.generation.value == "3.1"


def test_unknown_rope_type_names_file_and_key(src, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(src[0] / "hf", bad)
    config = json.loads((bad / "config.json").read_text())
    config["rope_scaling"] = {**(config.get("rope_scaling") or {}), "rope_type": "yarn"}
    config.pop("rope_parameters", None)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"config\.json: unknown rope type 'yarn' in rope_scaling"):
        conversion.to_orbax("hf", bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
