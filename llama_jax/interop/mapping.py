"""PyTorch state dicts (Meta and Hugging Face names) <-> our stacked params. numpy only.

A declarative name map (`RULES`) plus named transforms:
- transpose: torch stores Linear weights [out, in]; we store [in, out] with heads split out;
- rotary permutation: HF rotates halves, Meta (and we) rotate interleaved pairs, so HF's
  q_proj/k_proj rows are permuted per head; only this module knows it;
- Meta model-parallel shards: concatenated along a per-tensor axis (REFERENCE.md);
- layer stacking: per-layer tensors are stacked on a leading L axis (our one layout).
The streaming converters call the per-tensor functions; `from_state_dict` and
`to_state_dict` are the whole-model conveniences that tests use.
"""
from __future__ import annotations

import dataclasses
import numpy as np

from llama_jax import generations
from llama_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Rule:
    path: tuple[str, ...]          # where it lives in our params
    meta: str                      # Meta name; "{i}" is the layer index
    hf: str                        # Hugging Face name
    kind: str                      # how its torch layout maps to ours: see _TO_OURS
    meta_shard_axis: int | None    # Meta model-parallel concat axis (torch layout); None: replicated
    rope: str | None = None        # "q" or "k": carries HF's rotary permutation

    @property
    def layered(self) -> bool:
        return "{i}" in self.meta


RULES: tuple[Rule, ...] = (
    Rule(("tok_embeddings",), "tok_embeddings.weight", "model.embed_tokens.weight", "same", 1),
    Rule(("layers", "attention", "wq"), "layers.{i}.attention.wq.weight",
         "model.layers.{i}.self_attn.q_proj.weight", "in_heads", 0, rope="q"),
    Rule(("layers", "attention", "wk"), "layers.{i}.attention.wk.weight",
         "model.layers.{i}.self_attn.k_proj.weight", "in_kv_heads", 0, rope="k"),
    Rule(("layers", "attention", "wv"), "layers.{i}.attention.wv.weight",
         "model.layers.{i}.self_attn.v_proj.weight", "in_kv_heads", 0),
    Rule(("layers", "attention", "wo"), "layers.{i}.attention.wo.weight",
         "model.layers.{i}.self_attn.o_proj.weight", "heads_out", 1),
    Rule(("layers", "feed_forward", "w1"), "layers.{i}.feed_forward.w1.weight",
         "model.layers.{i}.mlp.gate_proj.weight", "transpose", 0),
    Rule(("layers", "feed_forward", "w2"), "layers.{i}.feed_forward.w2.weight",
         "model.layers.{i}.mlp.down_proj.weight", "transpose", 1),
    Rule(("layers", "feed_forward", "w3"), "layers.{i}.feed_forward.w3.weight",
         "model.layers.{i}.mlp.up_proj.weight", "transpose", 0),
    Rule(("layers", "attention_norm", "weight"), "layers.{i}.attention_norm.weight",
         "model.layers.{i}.input_layernorm.weight", "same", None),
    Rule(("layers", "ffn_norm", "weight"), "layers.{i}.ffn_norm.weight",
         "model.layers.{i}.post_attention_layernorm.weight", "same", None),
    Rule(("norm", "weight"), "norm.weight", "model.norm.weight", "same", None),
    Rule(("output",), "output.weight", "lm_head.weight", "transpose", 0),
)

# Buffers some checkpoints carry that are not weights (recomputed from the config).
IGNORED = ("rope.freqs", "rotary_emb.inv_freq")
_OUTPUT, _EMBEDDING = ("output",), ("tok_embeddings",)


def param_rules(config: ModelConfig) -> tuple[Rule, ...]:
    """The rules of `config`'s params: all but `output` when the embeddings are tied."""
    return tuple(r for r in RULES if not (config.tie_word_embeddings and r.path == _OUTPUT))


def file_rules(config: ModelConfig, fmt: str) -> tuple[Rule, ...]:
    """The tensors a `fmt` file holds. Tied: HF writes no lm_head.weight; Meta's model always
    has an `output` layer (loaded strictly), so its files carry the embedding again there."""
    return RULES if fmt == "meta" else param_rules(config)


def stored_rule(rule: Rule, config: ModelConfig) -> Rule:
    """The rule whose param holds `rule`'s tensor: tok_embeddings for a tied output."""
    return rule_for(_EMBEDDING) if config.tie_word_embeddings and rule.path == _OUTPUT else rule


def tied_copy_name(config: ModelConfig, fmt: str) -> str | None:
    """The output tensor's name that a tied model's files may carry as a copy of the embedding."""
    return (rule_for(_OUTPUT).meta if fmt == "meta" else rule_for(_OUTPUT).hf) if config.tie_word_embeddings else None


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


def _to_ours(kind: str, w: np.ndarray, c: ModelConfig) -> np.ndarray:
    if kind == "same":
        return w
    if kind == "transpose":
        return w.T
    if kind == "in_heads":
        return w.T.reshape(c.dim, c.n_heads, c.head_dim)
    if kind == "in_kv_heads":
        return w.T.reshape(c.dim, c.kv_heads, c.head_dim)
    if kind == "heads_out":
        return w.T.reshape(c.n_heads, c.head_dim, c.dim)
    raise ValueError(kind)


def _to_torch(kind: str, w: np.ndarray, c: ModelConfig) -> np.ndarray:
    if kind == "same":
        return w
    if kind == "transpose":
        return w.T
    if kind in ("in_heads", "in_kv_heads"):
        return w.reshape(c.dim, -1).T
    if kind == "heads_out":
        return w.reshape(-1, c.dim).T
    raise ValueError(kind)


def hf_to_meta_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo HF's per-head row permutation of q_proj/k_proj ([n*H, D] rows)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def meta_to_hf_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's permutation: interleaved pairs -> halves, per head ([n*H, D] rows)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _rope_heads(rule: Rule, c: ModelConfig) -> int:
    return c.n_heads if rule.rope == "q" else c.kv_heads


def tensor_to_ours(rule: Rule, w: np.ndarray, config: ModelConfig, source: str, name: str | None = None) -> np.ndarray:
    """One full torch-layout tensor (`source` "meta" or "hf") -> our layout for one layer.

    `name` (the tensor's own name, layer index filled in) is only used in errors."""
    expected = torch_shape(rule, config)
    if tuple(w.shape) != expected:
        name = name or (rule.meta if source == "meta" else rule.hf)
        raise ValueError(f"{name}: shape {tuple(w.shape)} does not match the config, expected {expected}")
    if source == "hf" and rule.rope:
        w = hf_to_meta_rotary(w, _rope_heads(rule, config))
    return np.ascontiguousarray(_to_ours(rule.kind, w, config))


def tensor_to_torch(rule: Rule, w: np.ndarray, config: ModelConfig, target: str) -> np.ndarray:
    """One layer's tensor in our layout -> full torch layout for `target` "meta" or "hf"."""
    w = _to_torch(rule.kind, w, config)
    if target == "hf" and rule.rope:
        w = meta_to_hf_rotary(w, _rope_heads(rule, config))
    return np.ascontiguousarray(w)


def meta_merge_axis(rule: Rule, shard_shapes: list[tuple[int, ...]], config: ModelConfig) -> int | None:
    """The axis Meta's shards of `rule` concatenate along (None: replicated, take shard 0).

    The embedding is split along dim (LLaMA 1/2) or vocab (LLaMA 3): read it off the shapes.
    """
    if rule.path == ("tok_embeddings",) and len(shard_shapes) > 1:
        return 0 if shard_shapes[0][0] != config.vocab_size else 1
    return rule.meta_shard_axis


def merge_meta_shards(rule: Rule, shards: list[np.ndarray], config: ModelConfig, name: str) -> np.ndarray:
    """Concatenate one tensor's model-parallel shards as Meta split them."""
    axis = meta_merge_axis(rule, [s.shape for s in shards], config)
    if axis is None or len(shards) == 1:
        return shards[0]
    others = [s.shape[:axis] + s.shape[axis + 1:] for s in shards]
    if len(set(others)) != 1 or len({s.dtype for s in shards}) != 1:
        raise ValueError(f"{name}: shards disagree: shapes {[s.shape for s in shards]}, "
                         f"dtypes {[str(s.dtype) for s in shards]}")
    return np.concatenate(shards, axis=axis)


def embedding_split_axis(config: ModelConfig) -> int:
    """Meta splits the embedding by dim (LLaMA 1/2) or by vocab (Llama 3 on, any vocab size)."""
    return generations.embedding_split_axis(config.generation)


def split_meta_shards(rule: Rule, w: np.ndarray, n: int, config: ModelConfig) -> list[np.ndarray]:
    """Split one full torch-layout tensor into `n` Meta model-parallel shards."""
    axis = embedding_split_axis(config) if rule.path == ("tok_embeddings",) else rule.meta_shard_axis
    if axis is None or n == 1:
        return [w] * n
    if w.shape[axis] % n:
        raise ValueError(f"{rule.meta}: axis {axis} of size {w.shape[axis]} does not split into {n} shards")
    return [np.ascontiguousarray(s) for s in np.split(w, n, axis=axis)]


def names(rule: Rule, config: ModelConfig, fmt: str) -> list[str]:
    """The torch names of `rule` in format `fmt`, one per layer for layered rules."""
    template = rule.meta if fmt == "meta" else rule.hf
    if rule.layered:
        return [template.format(i=i) for i in range(config.n_layers)]
    return [template]


def expected_names(config: ModelConfig, fmt: str) -> set[str]:
    """The names a checkpoint must hold (a tied model's output copy is optional)."""
    return {n for r in param_rules(config) for n in names(r, config, fmt)}


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def from_state_dict(state_dict: dict[str, np.ndarray], config: ModelConfig, fmt: str) -> dict:
    """A whole (merged) torch state dict of numpy arrays -> our stacked params."""
    check_names(state_dict.keys(), config, fmt, source="state dict")
    copy, emb = tied_copy_name(config, fmt), names(rule_for(_EMBEDDING), config, fmt)[0]
    if copy in state_dict and not np.array_equal(state_dict[copy], state_dict[emb]):
        raise ValueError(f"state dict: tie_word_embeddings is true but {copy} differs from {emb}")
    params: dict = {}
    for rule in param_rules(config):
        tensors = [tensor_to_ours(rule, state_dict[n], config, fmt) for n in names(rule, config, fmt)]
        _set(params, rule.path, np.stack(tensors) if rule.layered else tensors[0])
    return params


def to_state_dict(params: dict, config: ModelConfig, fmt: str) -> dict[str, np.ndarray]:
    """Our stacked params -> a whole torch-layout state dict of numpy arrays."""
    out = {}
    for rule in file_rules(config, fmt):
        stored = stored_rule(rule, config)
        value = np.asarray(_get(params, stored.path))
        for i, n in enumerate(names(rule, config, fmt)):
            out[n] = tensor_to_torch(stored, value[i] if rule.layered else value, config, fmt)
    return out


def check_names(found, config: ModelConfig, fmt: str, source: str) -> None:
    """Raise naming the missing and unknown tensors of a checkpoint."""
    found = {n for n in found if not n.endswith(IGNORED) and n != tied_copy_name(config, fmt)}
    expected = expected_names(config, fmt)
    missing, unknown = sorted(expected - found), sorted(found - expected)
    if missing or unknown:
        raise ValueError(f"{source}: tensor names do not match a {config.n_layers}-layer LLaMA in "
                         f"{fmt} layout: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unknown {unknown[:8]}{'...' if len(unknown) > 8 else ''}")


def rule_for(path: tuple[str, ...]) -> Rule:
    return next(r for r in RULES if r.path == path)

