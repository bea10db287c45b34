"""Is a Hugging Face config.json a LLaMA? Refuse look-alikes, naming the field that differs.

Mistral, Qwen2, Gemma, Mixtral and others store config.json files with the same key names
(hidden_size, num_attention_heads, ...) and weights with the same tensor names, so they
would convert without complaint and then run as the wrong model: a sliding attention window
ignored, biases dropped, another activation. `check_llama_hf_config` accepts a config only
where every such field has LLaMA's value (`tie_word_embeddings` and `rope_scaling` are
checked where they are read, in `ModelConfig.from_hf_config`).
"""
from __future__ import annotations

from typing import Any

from llama_jax.errors import input_error

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
