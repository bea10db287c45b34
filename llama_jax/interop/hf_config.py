"""Hugging Face's config.json: read (`config_from_hf`) and written (`hf_config_of`).

Is a config.json a LLaMA? Refuse look-alikes, naming the field that differs.
Mistral, Qwen2, Gemma, Mixtral and others store config.json files with the same key names
(hidden_size, num_attention_heads, ...) and weights with the same tensor names, so they
would convert without complaint and then run as the wrong model: a sliding attention window
ignored, biases dropped, another activation. `check_llama_hf_config` accepts a config only
where every such field has LLaMA's value (`tie_word_embeddings` and `rope_scaling` are
checked where they are read, in `config_from_hf`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from llama_jax import generations
from llama_jax.config import ModelConfig, RopeScaling
from llama_jax.errors import input_error
from llama_jax.generations import Generation

_ARCHITECTURES = ("LlamaForCausalLM", "LlamaModel", "LLaMAForCausalLM")  # the last: early conversions
# Fields a LLaMA either lacks or sets to one value: (key, allowed values, what LLaMA has).
_MUST_BE: tuple[tuple[str, tuple[Any, ...], str], ...] = (
    ("model_type", ("llama",), "'llama'"),
    ("hidden_act", ("silu",), "'silu' (SwiGLU)"),
    ("hidden_activation", ("silu",), "'silu' (SwiGLU)"),
    ("attention_bias", (False,), "false (no biases)"),
    ("mlp_bias", (False,), "false (no biases)"),
    ("sliding_window", (None,), "null (full causal attention)"),
    ("use_sliding_window", (False,), "false (full causal attention)"),
    ("partial_rotary_factor", (1, 1.0), "1.0 (rotary on the whole head)"),
    ("num_local_experts", (None, 0, 1), "absent (a dense feed-forward)"),
    ("num_experts", (None, 0, 1), "absent (a dense feed-forward)"),
    ("n_routed_experts", (None, 0), "absent (a dense feed-forward)"),
)


def check_llama_hf_config(c: dict, source: str = "config.json") -> None:
    """Raise InputError unless `c` describes a LLaMA (see the module docstring)."""
    if not isinstance(c, dict):
        raise input_error(source, "not a JSON object", "a config.json object", type(c).__name__)
    for key, allowed, llama in _MUST_BE:
        if key in c and not any(c[key] is v or (type(c[key]) is type(v) and c[key] == v) for v in allowed):
            raise input_error(f"{source}: {key}", "not a LLaMA config", llama, c[key])
    arch = c.get("architectures")
    if arch is not None and (not isinstance(arch, list) or any(a not in _ARCHITECTURES for a in arch)):
        raise input_error(f"{source}: architectures", "not a LLaMA config", list(_ARCHITECTURES), arch)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "num_key_value_heads", "max_position_embeddings"):
        v = c.get(key)
        if v is not None and (type(v) is not int or v <= 0):
            raise input_error(f"{source}: {key}", "must be a positive integer", "an integer > 0", v)
    for key in ("rms_norm_eps", "rope_theta"):
        v = c.get(key)
        if v is not None and (type(v) not in (int, float) or not v > 0):
            raise input_error(f"{source}: {key}", "must be a positive number", "a number > 0", v)
    head_dim = c.get("head_dim")
    if head_dim is not None and isinstance(c.get("hidden_size"), int) and isinstance(c.get("num_attention_heads"), int):
        if head_dim != c["hidden_size"] // c["num_attention_heads"]:
            raise input_error(f"{source}: head_dim", "must be hidden_size / num_attention_heads in LLaMA",
                              c["hidden_size"] // c["num_attention_heads"], head_dim)


def config_from_hf(c: dict, source: str = "config.json", generation: Generation | str | None = None,
                   **execution: Any) -> ModelConfig:
    """A ModelConfig from a LLaMA config.json; `generation` overrides the one it says."""
    check_llama_hf_config(c, source)  # refuses other architectures, naming the field (biases, head_dim, ...)
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if k not in c:
            raise input_error(source, f"missing key {k!r}")
    rope = dict(c.get("rope_parameters") or {})  # transformers v5 puts theta and scaling here
    theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
    scaling = c.get("rope_scaling") or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    rope_scaling = None
    if rope_type == "llama3":
        rope_scaling = RopeScaling(**{k: scaling[k] for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")})
    elif rope_type != "default":
        raise input_error(source, f"unknown rope type {rope_type!r} in rope_scaling", "'default' or 'llama3'")
    d, h = c["hidden_size"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or h
    multiple_of, multiplier = _ffn_recipe_for(d, c["intermediate_size"])
    tied = bool(c.get("tie_word_embeddings", False))  # transformers' LlamaConfig default: untied
    gen = generations.parse(generation) if generation is not None else generations.from_hf_config(
        c, rope_scaling and rope_scaling.factor, tied)
    return ModelConfig(generation=gen, tie_word_embeddings=tied, dim=d, n_layers=c["num_hidden_layers"], n_heads=h,
               n_kv_heads=None if kv == h else kv,
               vocab_size=c["vocab_size"], multiple_of=multiple_of, ffn_dim_multiplier=multiplier,
               norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=rope_scaling,
               max_seq_len=c.get("max_position_embeddings", 2048), **execution)


def hf_config_of(config: ModelConfig, dtype: str = "float32") -> dict:
    """`config` as transformers' LlamaConfig JSON; `dtype`: the stored weights' dtype name."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {"rope_theta": config.rope_theta, **dataclasses.asdict(config.rope_scaling)}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.dim, "intermediate_size": config.ffn_hidden_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim,
        "vocab_size": config.vocab_size, "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
        "rope_parameters": rope, "hidden_act": "silu", "tie_word_embeddings": bool(config.tie_word_embeddings),
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "bos_token_id": generations.special_ids(config.generation).bos,
        "eos_token_id": generations.special_ids(config.generation).eos,
        "dtype": dtype,
    }


def _ffn_recipe_for(dim: int, hidden: int) -> tuple[int, float | None]:
    """Meta's (multiple_of, ffn_dim_multiplier) that give HF's stored intermediate_size.

    HF keeps only the result, so the recipe is not unique (Llama 2 70B's 28672 is both
    4096 x 7 and 1024 x 28): known recipes first, else a multiplier that lands on `hidden`.
    """
    base = int(2 * 4 * dim / 3)
    for m in (4096, 1024, 256, 128, 64, 32, 16, 8):
        for mult in (None, 1.3, 1.2, 1.5, 2.0):
            h = base if mult is None else int(mult * base)
            if m * ((h + m - 1) // m) == hidden:
                return m, mult
    return 1, (hidden + 0.5) / base
