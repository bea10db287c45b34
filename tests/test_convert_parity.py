"""After conversion from either format, our logits equal transformers' on the same weights,
and transformers loads our Hugging Face export and gives the original model's logits.

float32, 600-token prompts (a wrong rotary permutation shows only after a few dozen tokens),
MHA, GQA and LLaMA 3.1 rope scaling.
"""
import jax
import numpy as np
import pytest
import torch
import transformers

from hf_utils import hf_logits, rel_err
from test_convert_common import CASES, tiny_model, write_hf, write_meta
from llama_jax import Llama, load_checkpoint
from llama_jax.interop import convert as conversion

TOL = 1e-5  # as tests/test_model_parity.py: float32, max |diff| / max |logit|
T = 600


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    cfg = CASES[request.param]
    model = tiny_model(request.param)
    tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (1, T)).astype(np.int32)
    return cfg, model, tokens, hf_logits(model, tokens), tmp_path_factory.mktemp(request.param)


def _our_logits(path, tokens):
    cfg, params = load_checkpoint(path)
    return np.asarray(jax.jit(Llama(cfg).apply)({"params": params}, tokens))


def test_hf_conversion_matches_transformers(case):
    cfg, model, tokens, theirs, tmp = case
    write_hf(model, str(tmp / "hf"), torch.float32, kind="single")
    conversion.to_orbax("hf", tmp / "hf", tmp / "orbax_hf")
    ours = _our_logits(tmp / "orbax_hf", tokens)
    assert rel_err(ours, theirs) < TOL
    assert rel_err(ours[:, -64:], theirs[:, -64:]) < TOL  # late positions: where rotary errors show


def test_meta_conversion_matches_transformers(case):
    cfg, model, tokens, theirs, tmp = case
    write_meta(model, cfg, str(tmp / "meta"), shards=2, dtype=torch.float32)
    conversion.to_orbax("meta", tmp / "meta", tmp / "orbax_meta")
    ours = _our_logits(tmp / "orbax_meta", tokens)
    assert rel_err(ours, theirs) < TOL
    assert rel_err(ours[:, -64:], theirs[:, -64:]) < TOL


def test_transformers_loads_our_hf_export(case):
    cfg, model, tokens, theirs, tmp = case
    if not (tmp / "orbax_meta").exists():  # export what came in through Meta's layout
        write_meta(model, cfg, str(tmp / "meta"), shards=2, dtype=torch.float32)
        conversion.to_orbax("meta", tmp / "meta", tmp / "orbax_meta")
    conversion.from_orbax("hf", tmp / "orbax_meta", tmp / "export", max_shard_size="300KB")
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(
        tmp / "export", output_loading_info=True, attn_implementation="eager", dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    # Same weights, same code: transformers' logits are identical to the original's.
    np.testing.assert_array_equal(hf_logits(loaded.eval(), tokens), theirs)
