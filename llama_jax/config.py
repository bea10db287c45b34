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

from llama_jax import generations
from llama_jax.errors import input_error, read_json
from llama_jax.generations import Generation
from llama_jax.interop.hf_config import check_llama_hf_config


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
    # Which LLaMA release this is (tokenizer ids, stop ids, Meta file layout: generations.py).
    # None: read off rope_theta/rope_scaling (configs written before the field existed).
    generation: Generation | None = None
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B: the output projection is tok_embeddings.T
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
        if not isinstance(self.tie_word_embeddings, (bool, np.bool_)):
            bad("tie_word_embeddings", "must be True or False")
        if self.generation is None:
            object.__setattr__(self, "generation", generations.from_architecture(
                self.rope_theta, self.rope_scaling and self.rope_scaling.factor, bool(self.tie_word_embeddings)))
        try:
            object.__setattr__(self, "generation", generations.parse(self.generation))
        except ValueError as e:
            bad("generation", str(e))
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
        n = self.n_layers * per_layer + d  # + final norm
        n += 0 if self.tie_word_embeddings else self.vocab_size * d  # output
        return n + (self.vocab_size * d if embeddings or self.tie_word_embeddings else 0)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def architecture(self) -> dict:
        """The fields that define the weights (what a checkpoint stores)."""
        arch = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in _ARCH_FIELDS}
        if self.rope_scaling is not None:
            arch["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        arch["generation"] = self.generation.value
        arch["tie_word_embeddings"] = bool(self.tie_word_embeddings)
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
                         generation: Generation | str | None = None, tied: bool = False,
                         **execution: Any) -> "ModelConfig":
        """Read Meta's params.json; `vocab_size` fills in its -1 ("from the tokenizer").

        `generation` overrides the one the keys say (generations.from_meta_params); `tied`
        says the weights have one embedding matrix for input and output.
        """
        p = dict(params)
        for k in ("dim", "n_layers", "n_heads", "norm_eps"):
            if k not in p:
                raise input_error(source, f"missing key {k!r}")
        known = set(generations.META_KEYS[Generation.LLAMA3_1]) | set(generations.META_ROPE_KEYS) | set(
            generations.META_IGNORED_KEYS)
        unknown = sorted(set(p) - known)
        if unknown:
            raise input_error(source, f"unknown key {unknown[0]!r}", f"one of Meta's keys {sorted(known)}")
        gen = generations.parse(generation) if generation is not None else generations.from_meta_params(p, tied)
        v = p.pop("vocab_size", -1)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise input_error(f"{source}: vocab_size", "must be an integer (-1: from the tokenizer)", "an integer", v)
        if v is None or v < 0:
            v = vocab_size
        if v is None:
            raise input_error(source, "vocab_size is -1 (from the tokenizer): pass vocab_size")
        if vocab_size is not None and v != vocab_size:
            raise input_error(source, "vocab_size differs from the tokenizer/weights", vocab_size, v)
        factor, high = p.pop("rope_scaling_factor", None), p.pop("rope_high_freq_factor", None)
        if p.pop("use_scaled_rope", False):
            factor = factor or generations.ROPE_FACTOR.get(gen)
            if factor is None:
                raise input_error(source, f"use_scaled_rope is true but generation {gen.value} has no scaled "
                                          f"rope", "generation 3.1, 3.2 or 3.3")
            p["rope_scaling"] = RopeScaling(factor=float(factor), **({"high_freq_factor": float(high)} if high else {}))
        p.pop("max_batch_size", None)
        kw = {"max_seq_len": generations.CONTEXT[gen], **p, **execution}
        return _named(source, cls, dict(vocab_size=v, generation=gen, tie_word_embeddings=tied, **kw))

    def to_meta_params(self) -> dict:
        """params.json with exactly the keys Meta shipped for `generation` (generations.META_KEYS)."""
        g, where = self.generation, f"Meta params.json of generation {self.generation.value}"
        keys = generations.META_KEYS[g]
        if not g.llama3_family and self.rope_theta != 10000.0:
            raise input_error(where, "has no rope_theta key: export as generation 3 or later", 10000.0,
                              self.rope_theta)
        if g is Generation.LLAMA1 and (self.n_kv_heads is not None or self.ffn_dim_multiplier is not None):
            raise input_error(where, "has no n_kv_heads/ffn_dim_multiplier: export as generation 2 or later")
        p = {k: getattr(self, k) for k in keys if k != "use_scaled_rope"}
        if g is Generation.LLAMA2:  # its optional keys, where used (70B)
            p.update({k: getattr(self, k) for k in generations.META_OPTIONAL_KEYS if getattr(self, k) is not None})
        if g.llama3_family:
            p["n_kv_heads"] = self.kv_heads
            if self.ffn_dim_multiplier is None:
                del p["ffn_dim_multiplier"]
        if self.rope_scaling is not None:
            if not g.scaled_rope or self.rope_scaling != RopeScaling(factor=generations.ROPE_FACTOR[g]):
                raise input_error(where, "can only say use_scaled_rope (llama3 scaling with the generation's "
                                  "factor); pass the right --generation", generations.ROPE_FACTOR.get(g),
                                  self.rope_scaling)
        if g.scaled_rope:
            p["use_scaled_rope"] = self.rope_scaling is not None
        return p

    # Hugging Face config.json.
    @classmethod
    def from_hf_config(cls, c: dict, source: str = "config.json", generation: Generation | str | None = None,
                       **execution: Any) -> "ModelConfig":
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
        return cls(generation=gen, tie_word_embeddings=tied, dim=d, n_layers=c["num_hidden_layers"], n_heads=h,
                   n_kv_heads=None if kv == h else kv,
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
            "rope_parameters": rope, "hidden_act": "silu", "tie_word_embeddings": bool(self.tie_word_embeddings),
            "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
            "bos_token_id": generations.special_ids(self.generation).bos,
            "eos_token_id": generations.special_ids(self.generation).eos,
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
                "ffn_dim_multiplier", "norm_eps", "rope_theta", "rope_scaling", "max_seq_len",
                "generation", "tie_word_embeddings")

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
