"""Next-token log-probabilities and the masked cross-entropy: one implementation for
training (train/state.py) and evaluation (evaluation/scoring.py).

Letters: B batch, T positions, V vocabulary. Logits come in float32 [B, T, V].
"""
from __future__ import annotations

import functools

import flax.linen as nn
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


# ---------------------------------------------------------------------------------------
# The output projection and the cross-entropy as one step, in chunks of positions.
#
# Training never needs the [B, T, V] logits, only the loss and its gradient. Materialised,
# they are the largest arrays of a step (Llama 3's V = 128256: 4.2 GB in float32 for 8192
# tokens, then as much again for their gradient, at the moment the saved activations peak).
# Here the logits exist one chunk of positions at a time, and the gradient is computed in
# the forward pass (softmax - one_hot is known there): the backward pass only scales it by
# the incoming cotangent. Same FLOPs as the plain path (three matmuls), no recomputation.


def head_cross_entropy(x: jax.Array, w: jax.Array, targets: jax.Array, mask: jax.Array,
                       chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """`masked_cross_entropy(x @ w, targets, mask)` without the [B, T, V] logits.

    x: normalised activations [B, T, D] in the compute dtype; w: the output matrix [D, V]
    in the same dtype; the logits are float32 (accumulated from x's dtype), as the model's.
    `chunk`: positions per chunk (None: `default_chunk`). When w is not differentiated (a
    frozen base under LoRA), its gradient is not computed at all.
    """
    b, t, _ = x.shape
    c = default_chunk(b, t, w.shape[-1]) if chunk is None else chunk
    if t % c:
        raise ValueError(f"head_cross_entropy: chunk {c} does not divide the {t} positions")
    mask = mask.astype(jnp.float32)
    static = (c, jnp.dtype(x.dtype).name, jnp.dtype(w.dtype).name)  # (the backward casts to these)
    return _head_xent(static, x, w, targets, mask), jnp.sum(mask)


def default_chunk(batch: int, length: int, vocab: int, budget_bytes: int = 1 << 30) -> int:
    """The largest divisor of `length` whose float32 logits chunk [batch, c, vocab] fits the budget."""
    best = 1
    for c in range(1, length + 1):
        if length % c == 0 and batch * c * vocab * 4 <= budget_bytes:
            best = c
    return best


def _chunks(a: jax.Array, c: int) -> jax.Array:
    """[B, T, ...] -> [T/c, B, c, ...]: the scan runs over chunks of positions, rows stay whole."""
    b, t = a.shape[:2]
    return jnp.swapaxes(a.reshape(b, t // c, c, *a.shape[2:]), 0, 1)


def _unchunk(a: jax.Array) -> jax.Array:
    n, b, c = a.shape[:3]
    return jnp.swapaxes(a, 0, 1).reshape(b, n * c, *a.shape[3:])


def _chunk_logits(xc, w):
    logits = jnp.einsum("BCD,DV->BCV", xc, w, preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "seq", "vocab"))


def _xent_scan(c: int, x, w, targets, mask, grads: tuple[bool, bool]):
    """(loss sum, dloss/dx float32 or None, dloss/dw float32 or None) by one scan over chunks."""
    want_dx, want_dw = grads

    def body(dw, chunk):
        xc, tc, mc = chunk
        logits = _chunk_logits(xc, w)
        picked, lse = _target_logit_and_lse(logits, tc)
        loss = jnp.sum((lse - picked) * mc)
        if not (want_dx or want_dw):
            return dw, (loss, None)
        hit = tc[..., None] == jnp.arange(logits.shape[-1], dtype=tc.dtype)
        # d(lse - picked)/dlogits = softmax - one_hot, weighted by the mask; in the compute
        # dtype for the two matmuls, as the plain path's backward casts it (model.output_logits).
        g = ((jnp.exp(logits - lse[..., None]) - hit) * mc[..., None]).astype(xc.dtype)
        dxc = jnp.einsum("BCV,DV->BCD", g, w, preferred_element_type=jnp.float32) if want_dx else None
        if want_dw:
            dw = dw + jnp.einsum("BCD,BCV->DV", xc, g, preferred_element_type=jnp.float32)
        return dw, (loss, dxc)

    dw0 = jnp.zeros(w.shape, jnp.float32) if want_dw else None
    dw, (loss, dx) = jax.lax.scan(body, dw0, (_chunks(x, c), _chunks(targets, c), _chunks(mask, c)))
    return jnp.sum(loss), (None if dx is None else _unchunk(dx)), dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_xent(static, x, w, targets, mask):
    return _xent_scan(static[0], x, w, targets, mask, (False, False))[0]


def _head_xent_fwd(static, x, w, targets, mask):
    # symbolic_zeros: each primal says whether it is differentiated (`perturbed`).
    loss, dx, dw = _xent_scan(static[0], x.value, w.value, targets.value, mask.value, (x.perturbed, w.perturbed))
    return loss, (dx, dw)


def _head_xent_bwd(static, res, g):
    (dx, dw), (_, x_dtype, w_dtype) = res, static
    return (None if dx is None else (g * dx).astype(x_dtype),
            None if dw is None else (g * dw).astype(w_dtype), None, None)


_head_xent.defvjp(_head_xent_fwd, _head_xent_bwd, symbolic_zeros=True)
