"""Decoding's per-layer runtime form of the params and its cached forward pass.

`decode_forward` runs `Llama`'s cached forward as a Python loop over `Block` with
per-layer weights and per-layer (k, v) caches, instead of the scan. On the GPU, slicing
layer l out of a stacked [L, ...] array inside a step copies it (weights would move ~3x
per token), and a stacked cache would be sliced and re-stacked every step.
`split_layers(params)` makes the per-layer form: the same tree with `layers` a tuple of L
per-layer trees whose q/k/v and w1/w3 projections are fused (`Block(fused=True)` reads
them). It is a runtime form only (made when generation starts), never stored:
checkpoints keep the stacked layout.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.model import (Array, Block, RMSNorm, cache_segment_ids, default_positions, embed, output_matrix,
                             project_logits, rope_tables)


def split_layers(params) -> dict:
    """The per-layer runtime form for `decode_forward`: `layers` as a tuple of L trees.

    Not a second layout: made from the stacked params when decoding starts, never stored.
    Each layer's projections that read the same input are fused, so a decode step runs 5
    weight matrix-vector products per layer instead of 7: attention {wqkv [D,K,G+2,H], wo}
    (per kv head k its G query heads, then its key and value head) and feed_forward
    {w13 [D,2,F] (w1 | w3), w2}. Every weight is copied (on numpy arrays as well).
    """
    params = nn.unbox(params)
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    layers = tuple(fuse_layer(jax.tree.map(lambda x, i=i: x[i], params["layers"])) for i in range(n))
    return {**params, "layers": layers}


def fuse_layer(layer) -> dict:
    """One stacked-form layer's params -> the fused form `Block(config, fused=True)` takes."""
    a, f = layer["attention"], layer["feed_forward"]
    xp = np if isinstance(a["wq"], np.ndarray) else jnp
    d, n, h = a["wq"].shape
    kh = a["wk"].shape[1]
    wqkv = xp.concatenate([a["wq"].reshape(d, kh, n // kh, h), a["wk"][:, :, None], a["wv"][:, :, None]], axis=2)
    w13 = xp.stack([f["w1"], f["w3"]], axis=1)
    return {**layer, "attention": {"wqkv": wqkv, "wo": a["wo"]},
            "feed_forward": {"w13": w13, "w2": f["w2"]}}


def decode_layer_shapes(config: ModelConfig):
    """One fused decode layer's abstract params (with logical partitioning boxes)."""
    x = jax.ShapeDtypeStruct((1, 1, config.dim), jnp.dtype(config.dtype))
    sc = jax.ShapeDtypeStruct((1, 1, config.head_dim // 2), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda r, x, s, c, g: Block(config, fused=True).init(r, x, None, s, c, g, None, None),
                          jax.random.PRNGKey(0), x, sc, sc, seg)["params"]


def is_split(params) -> bool:
    """Whether `params` is the per-layer runtime form of `split_layers`."""
    return isinstance(params, dict) and isinstance(params.get("layers"), (tuple, list))


def init_decode_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty cache for `decode_forward`: "kv", L pairs (k, v) [B,S,K,H], and "segment_ids" [B,S]."""
    shape = (batch, max_len, config.kv_heads, config.head_dim)
    dt = jnp.dtype(dtype or config.dtype)
    kv = tuple((jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(config.n_layers))
    return {"kv": kv, "segment_ids": jnp.zeros((batch, max_len), jnp.int32)}


def decode_forward(config: ModelConfig, params: dict, tokens: Array, cache: dict, cache_index,
                   positions=None, segment_ids=None, last_only: bool = False):
    """`Llama`'s cached forward, one Python-level `Block` per layer -> (float32 logits, new cache).

    `params`: the form of `split_layers`; `cache`: from `init_decode_cache`; tokens [B,T]
    fill key slots cache_index .. cache_index+T-1. Logits are [B,T,V], or [B,1,V] for the
    last position only with `last_only` (a long prefill then never holds [B,T,V] float32).
    """
    c = config
    b, t = tokens.shape
    if positions is None:
        positions = default_positions(b, t, cache_index)
    segment_ids, kv_segment_ids = cache_segment_ids(cache["segment_ids"], segment_ids, cache_index, b, t)
    x = embed(params["tok_embeddings"], tokens, c)
    sin, cos = rope_tables(positions, c)
    kv = []
    for layer, layer_cache in zip(params["layers"], cache["kv"], strict=True):
        x, new_layer_cache = Block(c, fused=True).apply({"params": layer}, x, layer_cache, sin, cos,
                                                        segment_ids, cache_index, kv_segment_ids)
        kv.append(new_layer_cache)
    if last_only:
        x = x[:, -1:]  # the final norm and the projection act per position
    x = RMSNorm(c.dim, c.norm_eps, c.param_dtype).apply({"params": params["norm"]}, x)
    return project_logits(x, output_matrix(params, c)), {"kv": tuple(kv), "segment_ids": kv_segment_ids}
