"""PyTorch state dicts (Meta and Hugging Face names) <-> our stacked params. numpy only.

A declarative name map (`RULES`, in the style of torchtitan's state_dict_adapter) plus
named transforms, each a table entry rather than a branch:
- `Transform`: torch stores Linear weights [out, in]; we store [in, out] with heads split out;
- rotary permutation: HF rotates halves, Meta (and we) rotate interleaved pairs, so HF's
  q_proj/k_proj rows are permuted per head; only this module knows it;
- `MetaSplit`: the axis Meta's model-parallel shards concatenate along, per tensor;
- layer stacking: per-layer tensors are stacked on a leading L axis (our one layout).
docs/rotary_and_layouts.md states the layouts, the permutation and the split axes.
The streaming converters call the per-tensor functions; `from_state_dict` is the
whole-model convenience that tests use.
"""
from __future__ import annotations

import dataclasses
import enum

import numpy as np

from llama_jax import generations
from llama_jax.config import ModelConfig
from llama_jax.interop.formats import Format, set_path


class Transform(enum.Enum):
    """How a tensor's torch layout maps to ours (N query heads, K kv heads, H head dim)."""
    SAME = "same"                # norms, embedding: identical
    TRANSPOSE = "transpose"      # Linear [out, in] -> [in, out]
    IN_HEADS = "in_heads"        # wq [N*H, D] -> [D, N, H]
    IN_KV_HEADS = "in_kv_heads"  # wk, wv [K*H, D] -> [D, K, H]
    HEADS_OUT = "heads_out"      # wo [D, N*H] -> [N, H, D]


class MetaSplit(enum.Enum):
    """How Meta's model-parallel shards split a tensor (the fairscale layer in Meta's model.py)."""
    REPLICATED = "replicated"  # norms: every shard holds the whole tensor
    COLUMN = "column"          # ColumnParallelLinear: output features, torch axis 0
    ROW = "row"                # RowParallelLinear: input features, torch axis 1
    EMBEDDING = "embedding"    # dim (LLaMA 1/2, ParallelEmbedding) or vocab (3+, VocabParallelEmbedding)


@dataclasses.dataclass(frozen=True)
class Rule:
    path: tuple[str, ...]    # where it lives in our params
    meta: str                # Meta name; "{i}" is the layer index
    hf: str                  # Hugging Face name
    transform: Transform     # torch layout -> ours
    meta_split: MetaSplit    # how Meta's model-parallel shards split it
    rotary: bool = False     # carries HF's rotary row permutation (over the transform's heads)

    @property
    def layered(self) -> bool:
        return "{i}" in self.meta

    def name(self, fmt: Format) -> str:
        """The name template in `fmt` ("{i}" for the layer index)."""
        return {Format.META: self.meta, Format.HF: self.hf}[fmt]


_T, _S = Transform, MetaSplit
# Per layer: our param path under "layers" (dotted), HF's module after "model.layers.{i}.",
# transform, Meta split, rotary. Meta's name is "layers.{i}." + our path, plus ".weight" for
# the linear layers (we hold their matrix as the param itself; a norm's param is its weight).
_LAYER_TABLE = (
    ("attention.wq", "self_attn.q_proj", _T.IN_HEADS, _S.COLUMN, True),
    ("attention.wk", "self_attn.k_proj", _T.IN_KV_HEADS, _S.COLUMN, True),
    ("attention.wv", "self_attn.v_proj", _T.IN_KV_HEADS, _S.COLUMN, False),
    ("attention.wo", "self_attn.o_proj", _T.HEADS_OUT, _S.ROW, False),
    ("feed_forward.w1", "mlp.gate_proj", _T.TRANSPOSE, _S.COLUMN, False),
    ("feed_forward.w2", "mlp.down_proj", _T.TRANSPOSE, _S.ROW, False),
    ("feed_forward.w3", "mlp.up_proj", _T.TRANSPOSE, _S.COLUMN, False),
    ("attention_norm.weight", "input_layernorm", _T.SAME, _S.REPLICATED, False),
    ("ffn_norm.weight", "post_attention_layernorm", _T.SAME, _S.REPLICATED, False),
)
RULES: tuple[Rule, ...] = (
    Rule(("tok_embeddings",), "tok_embeddings.weight", "model.embed_tokens.weight", _T.SAME, _S.EMBEDDING),
    *(Rule(("layers", *ours.split(".")), f"layers.{{i}}.{ours}" + ("" if ours.endswith(".weight") else ".weight"),
           f"model.layers.{{i}}.{hf}.weight", transform, split, rotary)
      for ours, hf, transform, split, rotary in _LAYER_TABLE),
    Rule(("norm", "weight"), "norm.weight", "model.norm.weight", _T.SAME, _S.REPLICATED),
    Rule(("output",), "output.weight", "lm_head.weight", _T.TRANSPOSE, _S.COLUMN),
)
EMBEDDING, OUTPUT = RULES[0], RULES[-1]

# Buffers some checkpoints carry that are not weights (recomputed from the config).
IGNORED = ("rope.freqs", "rotary_emb.inv_freq")


def param_rules(config: ModelConfig) -> tuple[Rule, ...]:
    """The rules of `config`'s params: all but `output` when the embeddings are tied."""
    return tuple(r for r in RULES if not (config.tie_word_embeddings and r is OUTPUT))


def file_rules(config: ModelConfig, fmt: Format) -> tuple[Rule, ...]:
    """The tensors a `fmt` file holds. Tied: HF writes no lm_head.weight; Meta's model always
    has an `output` layer (loaded strictly), so its files carry the embedding again there."""
    return RULES if fmt is Format.META else param_rules(config)


def stored_rule(rule: Rule, config: ModelConfig) -> Rule:
    """The rule whose param holds `rule`'s tensor: tok_embeddings for a tied output."""
    return EMBEDDING if config.tie_word_embeddings and rule is OUTPUT else rule


def tied_copy_name(config: ModelConfig, fmt: Format) -> str | None:
    """The output tensor's name that a tied model's files may carry as a copy of the embedding."""
    return OUTPUT.name(fmt) if config.tie_word_embeddings else None


def torch_shape(rule: Rule, config: ModelConfig) -> tuple[int, ...]:
    """The full (merged) torch-layout shape of one tensor of `rule`."""
    c = config
    d, v, f = c.dim, c.vocab_size, c.ffn_hidden_dim
    nh, kvh = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
    return {
        ("tok_embeddings",): (v, d), ("output",): (v, d), ("norm", "weight"): (d,),
        ("layers", "attention", "wq"): (nh, d), ("layers", "attention", "wk"): (kvh, d),
        ("layers", "attention", "wv"): (kvh, d), ("layers", "attention", "wo"): (d, nh),
        ("layers", "feed_forward", "w1"): (f, d), ("layers", "feed_forward", "w3"): (f, d),
        ("layers", "feed_forward", "w2"): (d, f),
        ("layers", "attention_norm", "weight"): (d,), ("layers", "ffn_norm", "weight"): (d,),
    }[rule.path]


# One torch-layout tensor of one layer -> ours, and back; c is the ModelConfig.
_TO_OURS = {
    Transform.SAME: lambda w, c: w,
    Transform.TRANSPOSE: lambda w, c: w.T,
    Transform.IN_HEADS: lambda w, c: w.T.reshape(c.dim, c.n_heads, c.head_dim),
    Transform.IN_KV_HEADS: lambda w, c: w.T.reshape(c.dim, c.kv_heads, c.head_dim),
    Transform.HEADS_OUT: lambda w, c: w.T.reshape(c.n_heads, c.head_dim, c.dim),
}
_TO_TORCH = {
    Transform.SAME: lambda w, c: w,
    Transform.TRANSPOSE: lambda w, c: w.T,
    Transform.IN_HEADS: lambda w, c: w.reshape(c.dim, -1).T,      # [D, N, H] -> [N*H, D]
    Transform.IN_KV_HEADS: lambda w, c: w.reshape(c.dim, -1).T,   # [D, K, H] -> [K*H, D]
    Transform.HEADS_OUT: lambda w, c: w.reshape(-1, c.dim).T,     # [N, H, D] -> [D, N*H]
}
# The heads a rotary tensor's rows are grouped in.
_ROTARY_HEADS = {Transform.IN_HEADS: lambda c: c.n_heads, Transform.IN_KV_HEADS: lambda c: c.kv_heads}


def hf_to_meta_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo HF's per-head row permutation of q_proj/k_proj ([n*H, D] rows):
    Meta row 2j + s of a head is HF row s*H/2 + j (s in {0, 1}, j < H/2)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def meta_to_hf_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's permutation: interleaved pairs -> halves, per head ([n*H, D] rows)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def tensor_to_ours(rule: Rule, w: np.ndarray, config: ModelConfig, source: Format, name: str | None = None) -> np.ndarray:
    """One full torch-layout tensor in `source` format -> our layout for one layer.

    `name` (the tensor's own name, layer index filled in) is only used in errors."""
    expected = torch_shape(rule, config)
    if tuple(w.shape) != expected:
        raise ValueError(f"{name or rule.name(source)}: shape {tuple(w.shape)} does not match the config, "
                         f"expected {expected}")
    if source is Format.HF and rule.rotary:
        w = hf_to_meta_rotary(w, _ROTARY_HEADS[rule.transform](config))
    return np.ascontiguousarray(_TO_OURS[rule.transform](w, config))


def tensor_to_torch(rule: Rule, w: np.ndarray, config: ModelConfig, target: Format) -> np.ndarray:
    """One layer's tensor in our layout -> full torch layout for `target`."""
    w = _TO_TORCH[rule.transform](w, config)
    if target is Format.HF and rule.rotary:
        w = meta_to_hf_rotary(w, _ROTARY_HEADS[rule.transform](config))
    return np.ascontiguousarray(w)


_SPLIT_AXIS = {MetaSplit.REPLICATED: None, MetaSplit.COLUMN: 0, MetaSplit.ROW: 1}


def meta_split_axis(rule: Rule, config: ModelConfig) -> int | None:
    """The torch-layout axis Meta's shards of `rule` split (None: replicated), as we write them."""
    if rule.meta_split is MetaSplit.EMBEDDING:
        return generations.embedding_split_axis(config.generation)
    return _SPLIT_AXIS[rule.meta_split]


def meta_merge_axis(rule: Rule, shard_shapes: list[tuple[int, ...]], config: ModelConfig) -> int | None:
    """The axis Meta's shards of `rule` concatenate along (None: replicated, take shard 0).

    The embedding is split along dim (LLaMA 1/2) or vocab (LLaMA 3): read it off the shapes,
    which are right even when the files' generation is not (LLaMA 1 65B reads as 2).
    """
    if len(shard_shapes) == 1:
        return None
    if rule.meta_split is MetaSplit.EMBEDDING:
        return 0 if shard_shapes[0][0] != config.vocab_size else 1
    return _SPLIT_AXIS[rule.meta_split]


def merge_meta_shards(rule: Rule, shards: list[np.ndarray], config: ModelConfig, name: str) -> np.ndarray:
    """Concatenate one tensor's model-parallel shards as Meta split them."""
    axis = meta_merge_axis(rule, [s.shape for s in shards], config)
    if axis is None:
        return shards[0]
    others = [s.shape[:axis] + s.shape[axis + 1:] for s in shards]
    if len(set(others)) != 1 or len({s.dtype for s in shards}) != 1:
        raise ValueError(f"{name}: shards disagree: shapes {[s.shape for s in shards]}, "
                         f"dtypes {[str(s.dtype) for s in shards]}")
    return np.concatenate(shards, axis=axis)


def meta_shard_shape(rule: Rule, shape: tuple[int, ...], n: int, config: ModelConfig) -> tuple[int, ...]:
    """The shape of each of `n` Meta shards of a full torch-layout tensor of `shape`."""
    axis = meta_split_axis(rule, config)
    if axis is None or n == 1:
        return tuple(shape)
    if shape[axis] % n:
        raise ValueError(f"{rule.meta}: axis {axis} of size {shape[axis]} does not split into {n} shards")
    return tuple(shape[:axis]) + (shape[axis] // n,) + tuple(shape[axis + 1:])


def split_meta_shards(rule: Rule, w: np.ndarray, n: int, config: ModelConfig) -> list[np.ndarray]:
    """Split one full torch-layout tensor into `n` Meta model-parallel shards."""
    meta_shard_shape(rule, w.shape, n, config)  # says when the axis does not divide
    axis = meta_split_axis(rule, config)
    if axis is None or n == 1:
        return [w] * n
    return [np.ascontiguousarray(s) for s in np.split(w, n, axis=axis)]


def names(rule: Rule, config: ModelConfig, fmt: Format) -> list[str]:
    """The torch names of `rule` in format `fmt`, one per layer for layered rules."""
    template = rule.name(fmt)
    if rule.layered:
        return [template.format(i=i) for i in range(config.n_layers)]
    return [template]


def rule_of(name: str, config: ModelConfig, fmt: Format) -> Rule:
    """The rule of the torch tensor `name` in a `fmt` file."""
    for rule in file_rules(config, fmt):
        if name in names(rule, config, fmt):
            return rule
    raise KeyError(name)


def expected_names(config: ModelConfig, fmt: Format) -> set[str]:
    """The names a checkpoint must hold (a tied model's output copy is optional)."""
    return {n for r in param_rules(config) for n in names(r, config, fmt)}


def from_state_dict(state_dict: dict[str, np.ndarray], config: ModelConfig, fmt: Format) -> dict:
    """A whole (merged) torch state dict of numpy arrays -> our stacked params."""
    check_names(state_dict.keys(), config, fmt, source="state dict")
    copy, emb = tied_copy_name(config, fmt), EMBEDDING.name(fmt)
    if copy in state_dict and not np.array_equal(state_dict[copy], state_dict[emb]):
        raise ValueError(f"state dict: tie_word_embeddings is true but {copy} differs from {emb}")
    params: dict = {}
    for rule in param_rules(config):
        tensors = [tensor_to_ours(rule, state_dict[n], config, fmt) for n in names(rule, config, fmt)]
        set_path(params, rule.path, np.stack(tensors) if rule.layered else tensors[0])
    return params


def check_names(found, config: ModelConfig, fmt: Format, source: str) -> None:
    """Raise naming the missing and unknown tensors of a checkpoint."""
    found = {n for n in found if not n.endswith(IGNORED) and n != tied_copy_name(config, fmt)}
    expected = expected_names(config, fmt)
    missing, unknown = sorted(expected - found), sorted(found - expected)
    if missing or unknown:
        raise ValueError(f"{source}: tensor names do not match a {config.n_layers}-layer LLaMA in "
                         f"{fmt.value} layout: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unknown {unknown[:8]}{'...' if len(unknown) > 8 else ''}")
