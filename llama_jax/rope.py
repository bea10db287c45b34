"""Rotary position embeddings, in Meta's convention: interleaved pairs (x[2i], x[2i+1])
rotated by position * inv_freq[i]; LLaMA 3.1's frequency scaling. Hugging Face's rotate-half
layout differs only by a row permutation of q and k, which the converters apply
(docs/rotary_and_layouts.md)."""
from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from llama_jax.config import ModelConfig, RopeScaling

Array = Any


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Rotary inverse frequencies [H/2], float32, computed as the reference code does."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    # theta**exponent correctly rounded to float32, then a float32 reciprocal: bit for bit
    # what the reference code computes (angles reach 1e3+ rad, so ulps matter).
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    inv_freq = np.float32(1.0) / power
    if scaling is None:
        return inv_freq
    # LLaMA 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    # float32 throughout, with `c / x` as reciprocal(x) * c, the way the reference evaluates it.
    f32, s = np.float32, scaling
    orig = s.original_max_position_embeddings
    wavelen = (f32(1) / inv_freq) * f32(2 * math.pi)
    scaled = np.where(wavelen > orig / s.low_freq_factor, inv_freq / f32(s.factor), inv_freq).astype(f32)
    smooth = ((f32(1) / wavelen) * f32(orig) - f32(s.low_freq_factor)) / f32(s.high_freq_factor - s.low_freq_factor)
    blended = (f32(1) - smooth) * scaled / f32(s.factor) + smooth * scaled
    medium = ~(wavelen < orig / s.high_freq_factor) & ~(wavelen > orig / s.low_freq_factor)
    return np.where(medium, blended, scaled).astype(f32)


def rope_tables(positions: Array, config: ModelConfig) -> tuple[Array, Array]:
    """(sin, cos), float32 [B,T,H/2], for integer positions [B,T]."""
    inv_freq = jnp.asarray(rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: Array, sin: Array, cos: Array) -> Array:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B,T,heads,H] by the tables' angles.

    (a, b) -> (a cos - b sin, a sin + b cos), written as x * cos + swap(x) * (-sin, sin):
    one elementwise pass. (Stacking the two halves instead made XLA emit a concatenate
    kernel that ran at a third of the memory bandwidth on an H200.)
    """
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)  # [B,T,heads,H/2,2]
    signed_sin = jnp.stack([-sin, sin], axis=-1)[:, :, None]  # [B,T,1,H/2,2]
    out = pairs * cos[:, :, None, :, None] + pairs[..., ::-1] * signed_sin
    return out.reshape(x.shape).astype(x.dtype)
