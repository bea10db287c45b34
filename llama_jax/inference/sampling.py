"""Sampling from next-token logits, as Meta's reference `sample_top_p` does.

softmax(logits / temperature), sort descending, drop tokens whose cumulative probability
*before* them exceeds top_p (the top token always stays), renormalise, draw. `top_k` (not
in Meta's code) keeps the k most likely tokens first. temperature 0 is greedy.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Sampling(NamedTuple):
    """The static part of a sampler (it changes the compiled program)."""
    greedy: bool
    top_p: bool                 # apply Meta's nucleus filter
    top_k: int | None


def _sorted_filtered(logits, temperature, top_p, top_k):
    """(probs sorted descending with Meta's top-p / top-k applied and renormalised, ids)."""
    k = logits.shape[-1] if top_k is None else top_k
    vals, ids = jax.lax.top_k(logits.astype(jnp.float32), k)  # k = V: a full descending sort
    probs = jax.nn.softmax(vals / temperature, axis=-1)
    if top_p is not None:
        cum = jnp.cumsum(probs, axis=-1)
        probs = jnp.where(cum - probs > top_p, 0.0, probs)  # Meta: mask = probs_sum - probs_sort > p
    return probs / jnp.sum(probs, axis=-1, keepdims=True), ids


def filtered_probs(logits, temperature: float, top_p: float = 1.0, top_k: int | None = None):
    """The distribution sampling draws from, in vocabulary order ([..., V] float32)."""
    probs, ids = _sorted_filtered(logits, temperature, None if top_p >= 1.0 else top_p, top_k)
    out = jnp.zeros(logits.shape, jnp.float32)
    return jnp.put_along_axis(out, ids, probs, axis=-1, inplace=False)


def sample(logits, key, temperature, top_p, mode: Sampling):
    """Next tokens [B] from float32 logits [B, V]."""
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not mode.top_p and mode.top_k is None:
        return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
    probs, ids = _sorted_filtered(logits, temperature, top_p if mode.top_p else None, mode.top_k)
    # Draw a rank in sorted space, as Meta does, then map it back to a token id.
    rank = jax.random.categorical(key, jnp.log(probs), axis=-1)
    return jnp.take_along_axis(ids, rank[:, None], axis=-1)[:, 0].astype(jnp.int32)
