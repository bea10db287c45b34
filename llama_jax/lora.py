"""LoRA adapters for our stacked parameters: config, layout, init, delta and merge.

A target weight W (one of wq wk wv wo w1 w2 w3) gets two factors, `a` on W's input axes and
`b` on its output axes, so that the adapted weight is W + scale * (a @ b) with
scale = alpha / rank (peft's default; rsLoRA is not supported). Like the params, the
factors are stacked on a leading L axis and live at the weight's own path:

    adapters = {"layers": {"attention": {"wq": {"a": [L,D,R], "b": [L,R,N,H]}, ...},
                           "feed_forward": {"w2": {"a": [L,F,R], "b": [L,R,D]}, ...}}}

Letters as in model.py, plus R for the rank. Each factor's logical axes are its weight's
(so adapters shard by the same rules in sharding.py), the rank axis unsharded.
docs/peft.md states the layout and how it maps to peft's lora_A / lora_B.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np

# jax and flax are imported inside the functions that compute: training config files
# (train.py --config F --help) read LoraConfig without loading jax.

from llama_jax.config import ModelConfig
from llama_jax.errors import input_error

Array = Any


@dataclasses.dataclass(frozen=True)
class Target:
    """One adaptable weight: where it lives and the letters of its input and output axes."""
    path: tuple[str, ...]
    inputs: str   # W's input axes (what x contracts with), e.g. "D"
    outputs: str  # W's output axes, e.g. "NH"

    @property
    def weight(self) -> str:
        return self.inputs + self.outputs

    @property
    def a(self) -> str:
        return self.inputs + "R"

    @property
    def b(self) -> str:
        return "R" + self.outputs


TARGETS: dict[str, Target] = {
    "wq": Target(("layers", "attention", "wq"), "D", "NH"),
    "wk": Target(("layers", "attention", "wk"), "D", "KH"),
    "wv": Target(("layers", "attention", "wv"), "D", "KH"),
    "wo": Target(("layers", "attention", "wo"), "NH", "D"),
    "w1": Target(("layers", "feed_forward", "w1"), "D", "F"),
    "w2": Target(("layers", "feed_forward", "w2"), "F", "D"),
    "w3": Target(("layers", "feed_forward", "w3"), "D", "F"),
}
# transformers' module names of the targets (peft's target_modules), to point a user who
# writes them at ours; interop/peft.py derives the same from interop/mapping.py.
PEFT_NAMES = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w1", "down_proj": "w2",
              "up_proj": "w3"}
# Logical axis names of the letters (model.py's parameter axes); the rank stays unsharded.
AXIS_NAMES = {"L": "layers", "D": "embed", "N": "heads", "K": "kv_heads", "H": "head_dim", "F": "mlp", "R": None}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters; `targets` are our weight names (any of TARGETS)."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wv")

    def __post_init__(self):
        if not isinstance(self.targets, (tuple, list)) or not all(isinstance(t, str) for t in self.targets):
            raise input_error("lora.targets", "must be a tuple of weight names", tuple(TARGETS), self.targets)
        object.__setattr__(self, "targets", tuple(self.targets))
        for t in self.targets:
            if t not in TARGETS:
                hint = f" (peft's name for {PEFT_NAMES[t]})" if t in PEFT_NAMES else ""
                raise input_error("lora.targets", f"unknown target {t!r}{hint}", f"any of {', '.join(TARGETS)}", t)
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise input_error("lora.targets", "must name each weight once, at least one", tuple(TARGETS),
                              self.targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral) or self.rank < 1:
            raise input_error("lora.rank", "must be a positive integer", ">= 1", self.rank)
        object.__setattr__(self, "rank", int(self.rank))
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or not np.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise input_error("lora.alpha", "must be a positive number", "> 0", self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) \
                or not 0 <= self.dropout < 1:
            raise input_error("lora.dropout", "must be a probability below 1", "0 <= dropout < 1", self.dropout)
        object.__setattr__(self, "alpha", float(self.alpha))  # (JSON-writable, equal however given)
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scale(self) -> float:
        """alpha / rank: the factor on a @ b (peft's default scaling)."""
        return self.alpha / self.rank

    def check(self, config: ModelConfig) -> None:
        """Raise naming the first target whose matrix is smaller than the rank in either direction."""
        for t in self.targets:
            n_in, n_out = _size(TARGETS[t].inputs, config), _size(TARGETS[t].outputs, config)
            if self.rank > min(n_in, n_out):
                shape = tuple(_sizes(config)[c] for c in TARGETS[t].weight)
                raise input_error("lora.rank", f"larger than target {t} of shape {shape} "
                                  f"(a {n_in} x {n_out} matrix) allows", f"<= {min(n_in, n_out)}", self.rank)


def _sizes(config: ModelConfig) -> dict[str, int]:
    c = config
    return {"L": c.n_layers, "D": c.dim, "N": c.n_heads, "K": c.kv_heads, "H": c.head_dim, "F": c.ffn_hidden_dim}


def _size(letters: str, config: ModelConfig) -> int:
    return int(np.prod([_sizes(config)[c] for c in letters]))


def factor_shape(letters: str, config: ModelConfig, rank: int) -> tuple[int, ...]:
    """The shape of a factor (or weight) with these axis letters, R being `rank`."""
    sizes = {**_sizes(config), "R": rank}
    return tuple(sizes[c] for c in letters)


def num_params(config: ModelConfig, lora: LoraConfig) -> int:
    """How many adapter parameters (the trained ones) `lora` gives `config`, every layer."""
    return sum(int(np.prod(factor_shape("L" + letters, config, lora.rank)))
               for t in lora.targets for letters in (TARGETS[t].a, TARGETS[t].b))


def factor_axes(letters: str) -> tuple[str | None, ...]:
    """The logical axis names of a factor with these axis letters."""
    return tuple(AXIS_NAMES[c] for c in letters)


def _tree(lora: LoraConfig, leaf) -> dict:
    """{path...: {"a": leaf(target, "a"), "b": leaf(target, "b")}} over the targets."""
    tree: dict = {}
    for name in lora.targets:
        t = TARGETS[name]
        node = tree
        for p in t.path[:-1]:
            node = node.setdefault(p, {})
        node[t.path[-1]] = {"a": leaf(t, "L" + t.a), "b": leaf(t, "L" + t.b)}
    return tree


def adapter_axes(lora: LoraConfig) -> dict:
    """The adapters' logical axis names, as a tree like `init_adapters`' result."""
    return _tree(lora, lambda t, letters: factor_axes(letters))


def adapter_shapes(config: ModelConfig, lora: LoraConfig, dtype="float32") -> dict:
    """Abstract adapters in LogicallyPartitioned boxes: `sharding.logical_to_shardings` takes them."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    lora.check(config)
    return _tree(lora, lambda t, letters: nn.LogicallyPartitioned(
        jax.ShapeDtypeStruct(factor_shape(letters, config, lora.rank), jnp.dtype(dtype)), factor_axes(letters)))


def init_adapters(config: ModelConfig, lora: LoraConfig, rng, dtype="float32") -> dict:
    """Fresh adapters: b zero (so the adapted model starts as the base); a as peft's
    default, torch's Linear init (kaiming_uniform, a=sqrt(5)): uniform(+-1/sqrt(fan_in))."""
    import jax
    import jax.numpy as jnp
    lora.check(config)
    keys = iter(jax.random.split(rng, len(lora.targets)))

    def leaf(t: Target, letters: str):
        shape = factor_shape(letters, config, lora.rank)
        if letters[1] == "R":  # b
            return jnp.zeros(shape, dtype)
        bound = 1.0 / np.sqrt(_size(t.inputs, config))
        return jax.random.uniform(next(keys), shape, jnp.float32, -bound, bound).astype(dtype)
    return _tree(lora, leaf)


def delta(target: str, a: Array, b: Array, scale: float) -> Array:
    """scale * (a @ b) in the weight's layout, float32; any leading axes (L) are kept."""
    import jax
    import jax.numpy as jnp
    t = TARGETS[target]
    d = jnp.einsum(f"...{t.a},...{t.b}->...{t.weight}", a.astype(jnp.float32), b.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    return d * jnp.float32(scale)


def forward(target: str, x: Array, a: Array, b: Array, scale: float) -> Array:
    """The adapter's term of one layer's projection: scale * (x @ a) @ b, in x's dtype
    (x [B,T,<inputs>], a and b without the L axis); dropout on x is the caller's."""
    import jax.numpy as jnp
    t = TARGETS[target]
    h = jnp.einsum(f"BT{t.inputs},{t.a}->BTR", x, a.astype(x.dtype))
    return jnp.einsum(f"BTR,{t.b}->BT{t.outputs}", h, b.astype(x.dtype)) * jnp.asarray(scale, x.dtype)


def merge(params: dict, adapters: dict, lora: LoraConfig) -> dict:
    """Params with every adapted weight replaced by W + scale * (a @ b), computed in float32
    and cast back to W's dtype. `params` is not modified (untouched leaves are shared)."""
    import flax.linen as nn
    import jax.numpy as jnp
    out = _copy_dicts(nn.unbox(params))  # (Llama.init's params come in partitioning boxes)
    for name in lora.targets:
        t = TARGETS[name]
        node, ad = out, adapters
        for p in t.path[:-1]:
            node, ad = node[p], ad[p]
        w, f = node[t.path[-1]], ad[t.path[-1]]
        if f["a"].shape[0] != w.shape[0] or f["b"].shape[0] != w.shape[0]:
            raise input_error(f"adapters/{'/'.join(t.path)}", "layer count differs from the params'",
                              w.shape[0], (f["a"].shape[0], f["b"].shape[0]))
        node[t.path[-1]] = (w.astype(jnp.float32) + delta(name, f["a"], f["b"], lora.scale)).astype(w.dtype)
    return out


def _copy_dicts(tree):
    """The nested dicts copied, the leaves shared."""
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree
