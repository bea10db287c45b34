"""Next-token log-probabilities and the masked cross-entropy: one implementation for
training (train/state.py) and evaluation (evaluation/scoring.py).

Letters: B batch, T positions, V vocabulary. Logits come in float32 [B, T, V].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _target_logit_and_lse(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logits[target], logsumexp(logits)), float32 [B, T] each; log p(target) is their difference.

    Never a log_softmax: no second [B, T, V] array. The target logit is picked by a one-hot
    mask, not a gather: a gather's gradient is a scatter, which splits the backward pass over
    the [B, T, V] logits into three passes (softmax, scatter, cast); this way it is one
    elementwise pass. Forward only, the mask costs one fused reduction over V, and its sum
    holds a single nonzero term, so it is exactly the gathered logit.
    """
    lse = jax.nn.logsumexp(logits, axis=-1)
    hit = targets[..., None] == jnp.arange(logits.shape[-1], dtype=targets.dtype)  # [B,T,V]
    return jnp.sum(jnp.where(hit, logits, 0.0), axis=-1), lse


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[target] as float32 [B, T], from logits [B, T, V] and ids [B, T]."""
    picked, lse = _target_logit_and_lse(logits, targets)
    return picked - lse


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over counted positions of -log p(target), number counted), float32 scalars.

    A sum, not a mean, so micro-batches and eval batches can be pooled by token count.
    """
    picked, lse = _target_logit_and_lse(logits, targets)
    # lse - picked rather than -token_log_probs: no negation in the step's program.
    return jnp.sum((lse - picked) * mask), jnp.sum(mask)
