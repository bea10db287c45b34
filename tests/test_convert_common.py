"""Helpers for the converter tests: tiny Meta and Hugging Face checkpoints on disk, and
readers written with torch/safetensors directly (independent of llama_jax's readers)."""
import glob
import json
import os

import torch

from hf_utils import hf_model
from test_model_parity import _meta_state_dict
from llama_jax import ModelConfig, RopeScaling
from llama_jax.interop.meta_params import meta_params_of

CASES = {
    "mha": ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=1024),
    "gqa": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                       rope_theta=500000.0, max_seq_len=1024),
    "llama3.1": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                            ffn_dim_multiplier=1.3, rope_theta=500000.0, rope_scaling=RopeScaling(),
                            max_seq_len=1024),
}

# Meta model-parallel split axes (docs/rotary_and_layouts.md), written out here independently of
# interop/mapping.py.
_META_AXIS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def meta_split_axis(name: str, llama3: bool):
    """llama3: params.json has rope_theta (Meta's Llama 3 code splits the embedding by vocabulary)."""
    if name.startswith("tok_embeddings"):
        return 0 if llama3 else 1
    key = name.split(".")[-2]
    return _META_AXIS.get(key)


def write_meta(model_or_sd, cfg: ModelConfig, path: str, shards: int, dtype: torch.dtype, vocab_in_params=True):
    """params.json + consolidated.NN.pth split as Meta does, + a tokenizer.model stand-in."""
    sd = _meta_state_dict(model_or_sd.state_dict(), cfg) if hasattr(model_or_sd, "state_dict") else model_or_sd
    os.makedirs(path)
    params = meta_params_of(cfg)
    for k in range(shards):
        shard = {}
        for name, w in sd.items():
            axis = meta_split_axis(name, "rope_theta" in params)
            w = w.to(dtype)
            shard[name] = w.clone() if axis is None else torch.chunk(w, shards, dim=axis)[k].clone()
        torch.save(shard, os.path.join(path, f"consolidated.{k:02d}.pth"))
    if not vocab_in_params:
        params["vocab_size"] = -1
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params, f)
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:
        f.write(b"not a real sentencepiece model")
    return sd


def write_hf(model, path: str, dtype: torch.dtype, kind: str = "sharded"):
    """save_pretrained (safetensors: one file or sharded with index) or a pytorch_model.bin."""
    model = model.to(dtype)
    if kind == "bin":
        os.makedirs(path)
        model.config.save_pretrained(path)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(path, "pytorch_model.bin"))
    else:
        model.save_pretrained(path, max_shard_size="200KB" if kind == "sharded" else "10GB")
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write("{}")
    return model


def read_hf(path: str) -> dict:
    from safetensors import safe_open
    out = {}
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        with safe_open(f, "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    for f in glob.glob(os.path.join(path, "pytorch_model*.bin")):
        out.update(torch.load(f, weights_only=True))
    return out


def read_meta(path: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    return [torch.load(f, weights_only=True) for f in files]


def assert_same_tensors(a: dict, b: dict):
    """Same names, dtypes, shapes and bits."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        assert torch.equal(a[k].view(torch.uint8) if a[k].numel() else a[k], b[k].view(torch.uint8) if b[k].numel()
                           else b[k]), k


def tiny_model(name: str = "gqa", seed: int = 0):
    return hf_model(CASES[name], seed=seed)
