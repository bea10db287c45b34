"""ModelConfig: the LLaMA architecture under Meta's names (what a checkpoint is).

How a run executes it (dtypes, attention kernel, remat, layer loop) is `runtime.RunOptions`,
never part of this config nor of the model_config.json written from it.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
from typing import Any

import numpy as np

from llama_jax import generations
from llama_jax.errors import input_error, read_json
from llama_jax.generations import Generation


def _positive_number(v) -> bool:
    """A finite number > 0 (not a string from a hand-edited JSON file, not a bool, not nan/inf)."""
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and bool(np.isfinite(v)) and v > 0


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """LLaMA 3.1 ("llama3") frequency scaling of the rotary embedding."""
    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type != "llama3":
            raise ValueError(f"RopeScaling.rope_type: unknown rope type {self.rope_type!r}; known: 'llama3'")
        if self.factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"RopeScaling: need factor > 0 and high_freq_factor > low_freq_factor, got {self}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Architecture (Meta's params.json names).
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None   # None: equal to n_heads (multi-head attention)
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    # Which LLaMA release this is (tokenizer ids, stop ids, Meta file layout: generations.py).
    # None: read off rope_theta/rope_scaling (configs written before the field existed).
    generation: Generation | None = None
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B: the output projection is tok_embeddings.T

    def __post_init__(self):
        def bad(field, msg):
            raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: {msg}")

        for f in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                bad(f, "must be a positive integer")
        if self.n_kv_heads is not None and (not isinstance(self.n_kv_heads, (int, np.integer)) or self.n_kv_heads <= 0):
            bad("n_kv_heads", "must be a positive integer or None")
        if self.dim % self.n_heads:
            bad("dim", f"must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            bad("n_heads", f"must be a multiple of n_kv_heads={self.kv_heads}")
        if self.head_dim % 2:
            bad("dim", f"gives an odd head_dim={self.head_dim} (dim / n_heads); rotary needs it even")
        if not _positive_number(self.norm_eps):
            bad("norm_eps", "must be a number > 0")
        if not _positive_number(self.rope_theta):
            bad("rope_theta", "must be a number > 0")
        if self.ffn_dim_multiplier is not None and not _positive_number(self.ffn_dim_multiplier):
            bad("ffn_dim_multiplier", "must be > 0 or None")
        if isinstance(self.rope_scaling, dict):  # accept the JSON form
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            bad("rope_scaling", "must be a RopeScaling, a dict of its fields, or None")
        if not isinstance(self.tie_word_embeddings, (bool, np.bool_)):
            bad("tie_word_embeddings", "must be True or False")
        if self.generation is None:
            object.__setattr__(self, "generation", generations.from_architecture(
                self.rope_theta, self.rope_scaling and self.rope_scaling.factor, bool(self.tie_word_embeddings)))
        try:
            object.__setattr__(self, "generation", generations.parse(self.generation))
        except ValueError as e:
            bad("generation", str(e))

    # Derived sizes.
    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's FeedForward hidden size: 2/3 of 4*dim, times the multiplier, rounded up."""
        h = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)

    def num_params(self, embeddings: bool = True) -> int:
        d, f, kv = self.dim, self.ffn_hidden_dim, self.kv_heads * self.head_dim
        per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
        n = self.n_layers * per_layer + d  # + final norm
        n += 0 if self.tie_word_embeddings else self.vocab_size * d  # output
        return n + (self.vocab_size * d if embeddings or self.tie_word_embeddings else 0)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Our own JSON (model_config.json): every field, enums by value, rope_scaling as a dict."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, enum.Enum):
                v = v.value
            elif dataclasses.is_dataclass(v):
                v = dataclasses.asdict(v)
            elif isinstance(v, np.generic):
                v = v.item()
            out[f.name] = v
        return out

    @property
    def architecture(self) -> dict:
        """The same as `to_dict()`: every field is architecture."""
        return self.to_dict()

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        # model_config.json files written before run options left ModelConfig carry them:
        # they said how that run executed, not what the weights are, and are ignored.
        d = {k: v for k, v in d.items() if k not in _OLD_RUN_KEYS}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown ModelConfig keys {unknown}; known: {sorted(known)}")
        return _named(source, cls, d)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelConfig":
        d = read_json(path)
        if not isinstance(d, dict):
            raise input_error(path, "not a JSON object", "{field: value}", type(d).__name__)
        return cls.from_dict(d, source=str(path))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


def _named(source: str, cls, kwargs: dict) -> "ModelConfig":
    """cls(**kwargs), a bad value reported with the file it came from."""
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise input_error(source, str(e)) from None


_OLD_RUN_KEYS = frozenset({"dtype", "param_dtype", "attention_impl", "remat_policy", "scan_unroll",
                           "layer_loop", "fuse_gate_up"})

_G = Generation
_llama1 = dict(multiple_of=256, norm_eps=1e-6, rope_theta=10000.0, vocab_size=32000, max_seq_len=2048,
               generation=_G.LLAMA1)
_llama2 = dict(multiple_of=256, norm_eps=1e-5, rope_theta=10000.0, vocab_size=32000, max_seq_len=4096,
               generation=_G.LLAMA2)
_llama3 = dict(multiple_of=1024, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
               vocab_size=128256, max_seq_len=8192, generation=_G.LLAMA3)


def _scaled(generation: Generation) -> dict:
    """Llama 3.1+: 131072 context, llama3 rope scaling with the generation's factor."""
    return dict(_llama3, generation=generation, max_seq_len=generations.CONTEXT[generation],
                rope_scaling=RopeScaling(factor=generations.ROPE_FACTOR[generation]))


_l31, _l32, _l33 = _scaled(_G.LLAMA3_1), _scaled(_G.LLAMA3_2), _scaled(_G.LLAMA3_3)

PRESETS: dict[str, ModelConfig] = {
    "llama-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, **_llama1),
    "llama-13b": ModelConfig(dim=5120, n_layers=40, n_heads=40, **_llama1),
    "llama-33b": ModelConfig(dim=6656, n_layers=60, n_heads=52, **_llama1),
    # 65B: Meta's params.json says 1e-5 (the paper's code default is 1e-6).
    "llama-65b": ModelConfig(dim=8192, n_layers=80, n_heads=64, **{**_llama1, "norm_eps": 1e-5}),
    "llama2-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, **_llama2),
    "llama2-13b": ModelConfig(dim=5120, n_layers=40, n_heads=40, **_llama2),
    "llama2-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                              **{**_llama2, "multiple_of": 4096, "ffn_dim_multiplier": 1.3}),
    "llama3-8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, **_llama3),
    "llama3-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, **{**_llama3, "multiple_of": 4096}),
    "llama3.1-8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, **_l31),
    "llama3.1-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, **{**_l31, "multiple_of": 4096}),
    "llama3.1-405b": ModelConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8,
                                 **{**_l31, "ffn_dim_multiplier": 1.2}),
    # Llama 3.2 1B/3B (Meta's params.json; HF config.json: tie_word_embeddings, rope factor 32).
    "llama3.2-1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, tie_word_embeddings=True,
                               **{**_l32, "multiple_of": 256, "ffn_dim_multiplier": 1.5}),
    "llama3.2-3b": ModelConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, tie_word_embeddings=True,
                               **{**_l32, "multiple_of": 256, "ffn_dim_multiplier": 1.0}),
    "llama3.3-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, **{**_l33, "multiple_of": 4096}),
    # Tests and CPU demos: GQA, a byte-sized vocabulary, room for 512+ token prompts.
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                        norm_eps=1e-5, rope_theta=10000.0, max_seq_len=1024, generation=_G.LLAMA2),
}
