"""The one cached forward pass, on the decode runtime form of the params.

`prepare(params)` is the only place the runtime form is built: from the stored stacked
params, one tree per layer with the projections that read the same input fused, so a
decode step runs 5 weight matrix-vector products per layer instead of 7: wqkv [D,K,G+2,H]
(`model.stack_qkv`), wo, w13 [D,2,F] (`model.stack_gate_up`), w2. Per layer, because on
the GPU slicing layer l out of a stacked [L, ...] array inside a step copies it (weights
would move ~3x per token), and a stacked cache would be sliced and re-stacked every step.
It is made when generation starts, never stored: checkpoints keep the stacked layout.

`forward(config, run, weights, tokens, cache, cache_index)` runs the layers as a Python
loop over the model's shared layer math (`model.attention`, `model.swiglu_gate_up`) with
per-layer (k, v) caches from `init_cache`. `run.matmul_precision` is not read here: FP8 is a
training option, decoding runs its matmuls in `run.dtype`.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig
from llama_jax.model import (Array, LayerInputs, attention, default_positions, embed, param_shapes, project_logits,
                             rms_norm, rope_tables, split_qkv, stack_gate_up, stack_qkv, swiglu_gate_up)
from llama_jax.runtime import AttentionImpl, RunOptions

# Logical axes of one prepared layer's weights (their sharding on a mesh).
_LAYER_AXES = {"attention_norm": ("embed",), "wqkv": ("embed", "kv_heads", None, "head_dim"),
               "wo": ("heads", "head_dim", "embed"), "ffn_norm": ("embed",),
               "w13": ("embed", None, "mlp"), "w2": ("mlp", "embed")}
_TOP_AXES = {"tok_embeddings": ("vocab", "embed"), "norm": ("embed",), "output": ("embed", "vocab")}


class DecodeWeights(NamedTuple):
    """The decode runtime form (`prepare`): `layers` holds L dicts with `_LAYER_AXES`' keys."""
    tok_embeddings: Array            # [V,D]
    layers: tuple                    # L x {attention_norm, wqkv, wo, ffn_norm, w13, w2}
    norm: Array                      # [D]
    output: Array | None             # [D,V]; None when tied (tok_embeddings.T)


class KVCache(NamedTuple):
    """Keys and values per layer, (k, v) [B,S,K,H] each, and the key slots' segment ids [B,S] (0: empty)."""
    kv: tuple
    segment_ids: Array


def prepare(params) -> DecodeWeights:
    """Stored (stacked) params -> the decode runtime form (under jit, as generate runs it, a copy)."""
    params = nn.unbox(params)
    stacked = params["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    layers = []
    for i in range(n):
        a, f = (jax.tree.map(lambda x, i=i: x[i], stacked[k]) for k in ("attention", "feed_forward"))
        layers.append({"attention_norm": stacked["attention_norm"]["weight"][i],
                       "wqkv": stack_qkv(a["wq"], a["wk"], a["wv"]), "wo": a["wo"],
                       "ffn_norm": stacked["ffn_norm"]["weight"][i],
                       "w13": stack_gate_up(f["w1"], f["w3"]), "w2": f["w2"]})
    return DecodeWeights(params["tok_embeddings"], tuple(layers), params["norm"]["weight"], params.get("output"))


def weight_axes(config: ModelConfig) -> DecodeWeights:
    """The logical axis names of every leaf of `prepare`'s output, in its structure."""
    return DecodeWeights(_TOP_AXES["tok_embeddings"], (dict(_LAYER_AXES),) * config.n_layers, _TOP_AXES["norm"],
                         None if config.tie_word_embeddings else _TOP_AXES["output"])


def weight_shapes(config: ModelConfig, param_dtype=jnp.float32) -> DecodeWeights:
    """`prepare`'s output as ShapeDtypeStructs (no memory)."""
    return jax.eval_shape(prepare, nn.unbox(param_shapes(config, param_dtype)))


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache of max_len key slots for `forward`, k and v in `dtype` (the compute dtype)."""
    shape = (batch, max_len, config.kv_heads, config.head_dim)
    kv = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layers))
    return KVCache(kv, jnp.zeros((batch, max_len), jnp.int32))


def forward(config: ModelConfig, run: RunOptions, weights: DecodeWeights, tokens: Array, cache: KVCache,
            cache_index, positions=None, segment_ids=None, last_only: bool = False):
    """The cached forward -> (float32 logits, new cache).

    tokens [B,T] fill key slots cache_index .. cache_index+T-1 (positions default to those
    slots, segment ids to 1). Logits are [B,T,V], or [B,1,V] for the last position only
    with `last_only` (a long prefill then never holds [B,T,V] float32).
    """
    c = config
    b, t = tokens.shape
    if positions is None:
        positions = default_positions(b, t, cache_index)
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    kv_segment_ids = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, cache_index))
    inputs = LayerInputs(*rope_tables(positions, c), segment_ids, kv_segment_ids, cache_index)
    x = embed(weights.tok_embeddings, tokens, run.dtype)
    kv = []
    for w, layer_cache in zip(weights.layers, cache.kv, strict=True):
        x, layer_cache = _layer(c, run, w, x, inputs, layer_cache)
        kv.append(layer_cache)
    if last_only:
        x = x[:, -1:]  # the final norm and the projection act per position
    x = rms_norm(x, weights.norm, c.norm_eps)
    out = weights.tok_embeddings.T if weights.output is None else weights.output
    return project_logits(x, out), KVCache(tuple(kv), kv_segment_ids)


def _layer(c: ModelConfig, run: RunOptions, w: dict, x, inputs: LayerInputs, cache):
    """`model.Block`'s math on one prepared layer, with its (k, v) cache."""
    dt = run.dtype
    h = rms_norm(x, w["attention_norm"], c.norm_eps)
    q, k, v = split_qkv(jnp.einsum("BTD,DKJH->BTKJH", h, w["wqkv"].astype(dt)), c.n_heads)
    # Cached attention always takes the XLA path (a query block against a longer cache).
    y, cache = attention(q, k, v, w["wo"], inputs, AttentionImpl.XLA, cache)
    x = x + y
    h = rms_norm(x, w["ffn_norm"], c.norm_eps)
    x = x + swiglu_gate_up(jnp.einsum("BTD,DJF->BTJF", h, w["w13"].astype(dt)), w["w2"], run.interpret_kernels)
    return nn.with_logical_constraint(x, ("batch", "seq", "embed")), cache
