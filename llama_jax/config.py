"""ModelConfig: the LLaMA architecture under Meta's names, plus how to run it.

Architecture fields carry Meta's `params.json` names. The execution fields (dtypes,
attention kernel, remat policy) are separate: they never reach a checkpoint's
params.json or config.json, and two configs that differ only in them describe the
same weights.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
from typing import Any

import numpy as np

from llama_jax.errors import input_error, read_json
from llama_jax.hf_config_check import check_llama_hf_config


class AttentionImpl(enum.Enum):
    AUTO = "auto"      # cudnn on NVIDIA GPUs, splash on TPU, xla elsewhere
    XLA = "xla"        # plain einsums + softmax, any platform
    CUDNN = "cudnn"    # jax.nn.dot_product_attention(implementation="cudnn")
    SPLASH = "splash"  # Pallas splash attention (TPU; interpret mode on CPU)


class RematPolicy(enum.Enum):
    NONE = "none"          # keep every activation
    FULL = "full"          # keep only the layer input, recompute the rest
    DOTS = "dots"          # keep matmul outputs (the paper's recipe), recompute the rest
    DOTS_NO_BATCH = "dots_no_batch"  # keep weight matmuls only (not attention's batched dots)
    MINIMAL = "minimal"    # keep the named projections (q, k, v, attention out, w1, w3)
    DOTS_FLASH = "dots_flash"  # dots_no_batch + the fused attention kernel's outputs (no re-run)


class LayerLoop(enum.Enum):
    SCAN = "scan"          # nn.scan over the stacked layers: compile time independent of depth
    UNROLLED = "unrolled"  # the same stacked params, one layer after another in the program:
    #                        no per-layer stacking of saved activations (faster on GPUs)


_DTYPES = ("float32", "bfloat16", "float16")


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
    # Execution: not part of the architecture.
    dtype: str = "float32"          # compute dtype of activations
    param_dtype: str = "float32"    # dtype parameters are created in
    attention_impl: AttentionImpl = AttentionImpl.AUTO
    remat_policy: RematPolicy = RematPolicy.NONE
    scan_unroll: int = 1            # layers per nn.scan iteration
    layer_loop: LayerLoop = LayerLoop.SCAN  # how training/eval forward passes run the layers
    fuse_gate_up: bool = False      # w1 and w3 as one matmul (stacked at run time), SwiGLU's
    #                                 backward as one kernel on GPUs (model.FeedForward)

    def __post_init__(self):
        def bad(field, msg):
            raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: {msg}")

        for f in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len", "scan_unroll"):
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
        if not isinstance(self.fuse_gate_up, (bool, np.bool_)):
            bad("fuse_gate_up", "must be True or False")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in _DTYPES:
                bad(f, f"must be one of {_DTYPES}")
        for f, enum_cls in (("attention_impl", AttentionImpl), ("remat_policy", RematPolicy),
                            ("layer_loop", LayerLoop)):
            v = getattr(self, f)
            if not isinstance(v, enum_cls):
                try:
                    object.__setattr__(self, f, enum_cls(v))
                except ValueError:
                    bad(f, f"must be one of {[e.value for e in enum_cls]}")

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
        n = self.n_layers * per_layer + d + self.vocab_size * d  # + final norm + output
        return n + (self.vocab_size * d if embeddings else 0)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def architecture(self) -> dict:
        """The fields that define the weights (what a checkpoint stores)."""
        arch = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in _ARCH_FIELDS}
        if self.rope_scaling is not None:
            arch["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        return arch

    # Our own JSON (stored beside checkpoints): architecture + execution fields.
    def to_dict(self) -> dict:
        d = self.architecture
        d.update(dtype=self.dtype, param_dtype=self.param_dtype,
                 attention_impl=self.attention_impl.value, remat_policy=self.remat_policy.value,
                 scan_unroll=self.scan_unroll, layer_loop=self.layer_loop.value,
                 fuse_gate_up=bool(self.fuse_gate_up))
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
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

    # Meta params.json.
    @classmethod
    def from_meta_params(cls, params: dict, vocab_size: int | None = None, source: str = "params.json",
                         **execution: Any) -> "ModelConfig":
        """Read Meta's params.json; `vocab_size` fills in its -1 ("from the tokenizer")."""
        p = dict(params)
        for k in ("dim", "n_layers", "n_heads", "norm_eps"):
            if k not in p:
                raise ValueError(f"{source}: missing key {k!r}")
        v = p.pop("vocab_size", -1)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise input_error(f"{source}: vocab_size", "must be an integer (-1: from the tokenizer)", "an integer", v)
        if v is None or v < 0:
            v = vocab_size
        if v is None:
            raise ValueError(f"{source}: vocab_size is -1 (from the tokenizer): pass vocab_size")
        if vocab_size is not None and v != vocab_size:
            raise ValueError(f"{source}: vocab_size={v} but the tokenizer/weights have {vocab_size}")
        scaling = p.pop("use_scaled_rope", False)
        if scaling:
            p["rope_scaling"] = RopeScaling()
        p.pop("max_batch_size", None)
        unknown = sorted(set(p) - set(_ARCH_FIELDS))
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; known: {sorted(_ARCH_FIELDS)}")
        return _named(source, cls, dict(vocab_size=v, **p, **execution))

    def to_meta_params(self) -> dict:
        p = {k: getattr(self, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                           "multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_theta")}
        if self.n_kv_heads is None:
            del p["n_kv_heads"]
        if self.ffn_dim_multiplier is None:
            del p["ffn_dim_multiplier"]
        if self.rope_scaling is not None:
            if self.rope_scaling != RopeScaling():
                raise ValueError(f"Meta params.json can only say use_scaled_rope (the default llama3 "
                                 f"scaling); this config has {self.rope_scaling}")
            p["use_scaled_rope"] = True
        return p

    # Hugging Face config.json.
    @classmethod
    def from_hf_config(cls, c: dict, source: str = "config.json", **execution: Any) -> "ModelConfig":
        check_llama_hf_config(c, source)
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            if k not in c:
                raise ValueError(f"{source}: missing key {k!r}")
        if c.get("tie_word_embeddings"):
            raise ValueError(f"{source}: tie_word_embeddings=true; LLaMA's output projection is untied")
        rope = dict(c.get("rope_parameters") or {})  # transformers v5 puts theta and scaling here
        theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
        scaling = c.get("rope_scaling") or rope
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        rope_scaling = None
        if rope_type == "llama3":
            rope_scaling = RopeScaling(**{k: scaling[k] for k in (
                "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")})
        elif rope_type != "default":
            raise ValueError(f"{source}: unknown rope type {rope_type!r}; known: 'default', 'llama3'")
        d, h = c["hidden_size"], c["num_attention_heads"]
        kv = c.get("num_key_value_heads") or h
        multiple_of, multiplier = _ffn_recipe_for(d, c["intermediate_size"])
        return cls(dim=d, n_layers=c["num_hidden_layers"], n_heads=h, n_kv_heads=None if kv == h else kv,
                   vocab_size=c["vocab_size"], multiple_of=multiple_of, ffn_dim_multiplier=multiplier,
                   norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=rope_scaling,
                   max_seq_len=c.get("max_position_embeddings", 2048), **execution)

    def to_hf_config(self) -> dict:
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_theta": self.rope_theta, **dataclasses.asdict(self.rope_scaling)}
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.dim, "intermediate_size": self.ffn_hidden_dim,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
            "rope_parameters": rope, "hidden_act": "silu", "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
            "bos_token_id": 1 if self.vocab_size <= 32000 else 128000,
            "eos_token_id": 2 if self.vocab_size <= 32000 else 128001,
            "dtype": self.param_dtype,
        }


def _named(source: str, cls, kwargs: dict) -> "ModelConfig":
    """cls(**kwargs), a bad value reported with the file it came from."""
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise input_error(source, str(e)) from None


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


_ARCH_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                "ffn_dim_multiplier", "norm_eps", "rope_theta", "rope_scaling", "max_seq_len")

_L3_SCALING = RopeScaling()
_llama1 = dict(multiple_of=256, norm_eps=1e-6, rope_theta=10000.0, vocab_size=32000, max_seq_len=2048)
_llama2 = dict(multiple_of=256, norm_eps=1e-5, rope_theta=10000.0, vocab_size=32000, max_seq_len=4096)
_llama3 = dict(multiple_of=1024, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
               vocab_size=128256, max_seq_len=8192)

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
    "llama3.1-8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, rope_scaling=_L3_SCALING,
                               **{**_llama3, "max_seq_len": 131072}),
    "llama3.1-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, rope_scaling=_L3_SCALING,
                                **{**_llama3, "multiple_of": 4096, "max_seq_len": 131072}),
    "llama3.1-405b": ModelConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, rope_scaling=_L3_SCALING,
                                 **{**_llama3, "ffn_dim_multiplier": 1.2, "max_seq_len": 131072}),
    # Tests and CPU demos: GQA, a byte-sized vocabulary, room for 512+ token prompts.
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                        norm_eps=1e-5, rope_theta=10000.0, max_seq_len=1024),
}
