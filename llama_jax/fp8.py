"""FP8 weight matmuls for training on Hopper: per-tensor scaling, FP8 forward and backward.

Each operand is quantised per tensor: `q = clip(x * scale, -fmax, fmax).astype(fp8)` with
`scale = fmax / amax / 2**margin`, so the tensor's largest magnitude lands on the format's
largest finite value (448 for float8_e4m3fn, 57344 for float8_e5m2). Current scaling takes
amax from this step's tensor; delayed scaling (`fp8_dot_delayed`) takes it from an amax
history carried in an `Fp8State` pytree.

Delayed scaling (`RunOptions.fp8_scaling=delayed`; Transformer Engine's recipe with its "max"
algorithm, torchao's former "delayed" float8): the scale is fmax over the max of the last H
amaxes, so quantising needs no pass over the tensor first, and this step's amax (recorded for
the next steps) can be computed in the quantising pass. No branch on the history's contents:
a data-dependent `lax.cond` per call site (an earlier version's way to treat an all-zero
history as "scale by your own amax") made the GPU step 7% SLOWER than current scaling. An
all-zero history (a fresh run) gives scale 1, so a fresh run CALIBRATES first: traced
inside `with calibrating():`, the delayed dots scale each tensor by its own amax and still
record it; the train step (train/state.py) runs one such forward and backward on its first
batch when it finds every history zero, and step 0 then scales as current scaling would.
How the new histories leave the step: as flax's fp8_ops does (its OVERWRITE_WITH_GRADIENT
collection), the custom VJP returns the updated history as the COTANGENT of the state, so
`jax.grad` with respect to the state yields the new state, the gradient's amax included
(known only in the backward pass). The model keeps each call site's state in the "fp8"
variable collection (model.py); the train step differentiates with respect to it, stores
the result in place of the old state and never hands it to the optimizer. Chosen over a
mutable collection because the gradient's amax exists only inside the backward pass.

The FP8 operands go STRAIGHT into `lax.dot_general(..., preferred_element_type=bfloat16)` and
the product of the inverse scales multiplies the output afterwards. (On jax 0.11.2 the
dequantise-then-dot form, `convert(q) * inv_scale` fed to a bf16 dot, ran a bf16 GEMM plus
the conversions; the direct form runs cuBLASLt's FP8 GEMM: issue 22.) cuBLASLt's fast FP8
path wants the contraction dim minor in both operands ("NT": [M, K] x [N, K]); every dot
below is written that way, the transposes being of 1-byte values, fused into the quantise.
cuBLASLt multiplies e4m3 x e4m3, e4m3 x e5m2 and e5m2 x e4m3, never e5m2 x e5m2: only the
gradient may be e5m2, and it always meets an e4m3 operand.

Floor: imports jax and kernels.py only, so model.py can call `fp8_einsum` behind a run option.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from llama_jax import kernels

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
_F32 = jnp.float32
# [M, K] x [N, K] -> [M, N]: contract dim 1 of both (K minor in both operands).
_NT = (((1,), (1,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class Fp8Recipe:
    """How to quantise: the gradient's format, a headroom margin and power-of-two scales."""
    grad_dtype: Any = E5M2        # e5m2 (range) or e4m3 (precision) for the output gradient
    margin: int = 0               # amax maps to fmax / 2**margin: headroom for the next step's growth
    power_of_two: bool = False    # round scales down to powers of two (scaling is then exact)
    # Operands needed in both layouts (weights, output gradients): "auto" the Pallas
    # cast-transpose kernel on one GPU (kernels.cast_transpose), "xla" XLA's fusion,
    # "interpret" the kernel in interpret mode (tests). The same values every way.
    cast: str = "auto"

    def __post_init__(self):
        if jnp.dtype(self.grad_dtype) not in (jnp.dtype(E4M3), jnp.dtype(E5M2)):
            raise ValueError(f"Fp8Recipe.grad_dtype={self.grad_dtype!r}: must be float8_e4m3fn or float8_e5m2")
        if self.cast not in ("auto", "xla", "interpret"):
            raise ValueError(f"Fp8Recipe.cast={self.cast!r}: must be auto, xla or interpret")


CURRENT = Fp8Recipe()


def recipe_of(run) -> Fp8Recipe | None:
    """The recipe of a RunOptions (`fp8_grad_format`, `fp8_cast_kernel`), or None when its matmuls are not FP8."""
    if run.matmul_precision.value != "fp8":
        return None
    return Fp8Recipe(grad_dtype={"e5m2": E5M2, "e4m3": E4M3}[run.fp8_grad_format.value],
                     cast="xla" if not run.fp8_cast_kernel else "interpret" if run.interpret_kernels else "auto")


def fp8_max(dtype) -> float:
    """Largest finite value of an FP8 format (448 for e4m3fn, 57344 for e5m2)."""
    return float(jnp.finfo(dtype).max)


def amax_of(x: jax.Array) -> jax.Array:
    """max |x| over the whole tensor, float32. Under jit with sharded x this is global."""
    return jnp.max(jnp.abs(x)).astype(_F32)


def scale_from_amax(amax: jax.Array, dtype, margin: int = 0, power_of_two: bool = False) -> jax.Array:
    """The scale mapping amax to fmax / 2**margin; 1 where amax is 0 or not finite."""
    ok = jnp.isfinite(amax) & (amax > 0)
    scale = fp8_max(dtype) / jnp.where(ok, amax, 1.0) / 2.0 ** margin
    if power_of_two:  # round down: the scaled amax stays within fmax
        scale = jnp.exp2(jnp.floor(jnp.log2(scale)))
    return jnp.where(ok, scale, 1.0).astype(_F32)


def quantize(x: jax.Array, dtype, scale: jax.Array) -> jax.Array:
    """clip(x * scale) to the format's finite range, then round to it (saturating: no inf/nan)."""
    m = fp8_max(dtype)
    # The clip matters: float8_e4m3fn has no inf, and a value past fmax converts to nan.
    return jnp.clip(x.astype(_F32) * scale, -m, m).astype(dtype)


def dequantize(q: jax.Array, inv_scale: jax.Array, dtype=_F32) -> jax.Array:
    return (q.astype(_F32) * inv_scale).astype(dtype)


def quantize_current(x: jax.Array, dtype, recipe: Fp8Recipe = CURRENT) -> tuple[jax.Array, jax.Array]:
    """(q, inv_scale) with this tensor's own amax: x ~= q * inv_scale."""
    scale = scale_from_amax(amax_of(x), dtype, recipe.margin, recipe.power_of_two)
    return quantize(x, dtype, scale), 1.0 / scale


def quantize_both(x: jax.Array, dtype, scale: jax.Array, recipe: Fp8Recipe, with_amax: bool = False):
    """(q, q.T): `quantize(x, dtype, scale)` for a 2-D x, in both layouts, in one pass;
    `with_amax`: (q, q.T, amax_of(x)), the amax found in the same pass."""
    mode = None if recipe.cast == "xla" else kernels.fp8_kernel_mode(x, recipe.cast == "interpret")
    if mode is None or kernels.cast_transpose_tiles(x.shape) is None:  # XLA's fusion
        q = quantize(x, dtype, scale)
        return (q, q.T, amax_of(x)) if with_amax else (q, q.T)
    return kernels.cast_transpose(x, scale, dtype, mode == "interpret", with_amax)


def _nt_dot(a: jax.Array, b: jax.Array, inv_a, inv_b, out_dtype) -> jax.Array:
    """a [M, K] . b [N, K] -> [M, N], both K-minor FP8 operands, the inverse scales applied after."""
    y = lax.dot_general(a, b, _NT, preferred_element_type=jnp.bfloat16)
    return (y.astype(_F32) * (inv_a * inv_b)).astype(out_dtype)


def _named(xq, wq):
    # Names for remat policies: the backward's FP8 operands (1 byte per element) can be
    # saved with save_only_these_names("fp8_x", "fp8_w") instead of recomputing them. Named
    # as uint8: jax (0.10.2) passes a saved float8_e4m3fn value through
    # reduce_precision(exponent_bits=4, mantissa_bits=3), IEEE semantics, which turns the
    # format's values above 240 into nan (float8_e4m3fn has no inf and reaches 448).
    def name(q, n):
        return lax.bitcast_convert_type(checkpoint_name(lax.bitcast_convert_type(q, jnp.uint8), n), q.dtype)
    return name(xq, "fp8_x"), name(wq, "fp8_w")


def _dx_dw(xq, ix, wq, iw, gq, gq_t, ig, x_dtype, w_dtype):
    # dgrad dX = g . w^T: g [M, N] . w [K, N] contracting N, minor in both as they are stored.
    dx = _nt_dot(gq, wq, ig, iw, x_dtype)
    # wgrad dW = x^T . g: x^T [K, M] . g^T [N, M] contracting M (the tokens), made minor by
    # transposing the 1-byte operands (g's transpose comes from `quantize_both`); the result
    # is [K, N], the weight's own layout.
    dw = _nt_dot(xq.T, gq_t, ix, ig, w_dtype)
    return dx, dw


# --- current scaling -------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fp8_dot(x: jax.Array, w: jax.Array, recipe: Fp8Recipe = CURRENT) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] in x's dtype, every GEMM (forward, dX, dW) in FP8.

    Forward operands e4m3, the output gradient `recipe.grad_dtype`; per-tensor current scaling.
    Gradients come back in x's and w's own dtypes (float32 master weights get float32 dW).
    """
    return _fp8_dot_fwd(x, w, recipe)[0]


def _current_both(x, dtype, recipe):
    """(q, q.T, inv_scale) with x's own amax."""
    scale = scale_from_amax(amax_of(x), dtype, recipe.margin, recipe.power_of_two)
    return *quantize_both(x, dtype, scale, recipe), 1.0 / scale


def _fp8_dot_fwd(x, w, recipe):
    xq, ix = quantize_current(x, E4M3, recipe)
    wq, wq_t, iw = _current_both(w, E4M3, recipe)
    xq, wq = _named(xq, wq)
    # forward: x [M, K] . w^T [N, K] contracting K, minor in both (w^T is w quantised and
    # transposed in one pass; w itself is kept for the input gradient).
    y = _nt_dot(xq, wq_t, ix, iw, x.dtype)
    # Residuals are the FP8 operands (1 byte each, smaller than bf16 x): the backward reuses them.
    return y, (xq, ix, wq, iw, jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))


def _fp8_dot_bwd(recipe, res, g):
    xq, ix, wq, iw, x0, w0 = res
    gq, gq_t, ig = _current_both(g, recipe.grad_dtype, recipe)
    return _dx_dw(xq, ix, wq, iw, gq, gq_t, ig, x0.dtype, w0.dtype)


fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


# --- delayed scaling ---------------------------------------------------------------------

class Fp8State(NamedTuple):
    """Delayed-scaling state of one projection call site: amax histories, newest first.

    Rows: 0 the input x, 1 the weight w, 2 the output gradient. A pytree of one float32
    array, so it lives in the train state and is checkpointed and restored like any leaf.
    """
    amax_history: jax.Array  # float32 [3, history_len]


def init_fp8_state(history_len: int = 16) -> Fp8State:
    """An empty history: all zeros, so the first step scales each tensor by its own amax."""
    return Fp8State(jnp.zeros((3, history_len), _F32))


def _push(history: jax.Array, amax: jax.Array) -> jax.Array:
    return jnp.roll(history, 1).at[0].set(amax)


_CALIBRATING = [False]


@contextlib.contextmanager
def calibrating():
    """Delayed dots traced inside scale each tensor by its own amax (current scaling) and
    record it as usual: the way a fresh run fills its empty histories (train/state.py)."""
    _CALIBRATING.append(True)
    try:
        yield
    finally:
        _CALIBRATING.pop()


def _delayed_scale(x, row, dtype, recipe):
    """(scale, amax now): the scale from the history's max, not from this tensor (an
    all-zero history: scale 1); inside `calibrating()`, from this tensor's own amax."""
    amax_now = amax_of(x)
    amax_for_scale = amax_now if _CALIBRATING[-1] else jnp.max(row)
    return scale_from_amax(amax_for_scale, dtype, recipe.margin, recipe.power_of_two), amax_now


def _delayed(x, row, dtype, recipe):
    """(q, inv_scale, amax now) by `_delayed_scale`."""
    scale, amax_now = _delayed_scale(x, row, dtype, recipe)
    return quantize(x, dtype, scale), 1.0 / scale, amax_now


def _delayed_both(x, row, dtype, recipe):
    """(q, q.T, inv_scale, amax now) by `_delayed_scale`; outside calibration this step's amax
    comes from the quantising pass itself (the scale does not need it)."""
    if _CALIBRATING[-1]:
        scale, amax_now = _delayed_scale(x, row, dtype, recipe)
        return *quantize_both(x, dtype, scale, recipe), 1.0 / scale, amax_now
    scale = scale_from_amax(jnp.max(row), dtype, recipe.margin, recipe.power_of_two)
    q, q_t, amax_now = quantize_both(x, dtype, scale, recipe, with_amax=True)
    return q, q_t, 1.0 / scale, amax_now


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fp8_dot_delayed(x: jax.Array, w: jax.Array, state: Fp8State, recipe: Fp8Recipe = CURRENT) -> jax.Array:
    """`fp8_dot` with delayed scaling: scales from `state`'s amax histories.

    The updated state comes back as the cotangent of `state` (the "overwrite with gradient"
    convention): `jax.grad` with respect to the state returns the NEW state (histories
    pushed with this step's amaxes of x, w and the gradient); the train step stores it in
    place of the old one and keeps it away from the optimizer. Hence one state per call
    site (a state used twice would get the sum of two); per-layer states stacked under
    nn.scan are separate call sites. Values past a stale scale saturate at fmax.
    """
    return _delayed_fwd(x, w, state, recipe)[0]


def _delayed_fwd(x, w, state, recipe):
    h = state.amax_history
    xq, ix, ax = _delayed(x, h[0], E4M3, recipe)
    wq, wq_t, iw, aw = _delayed_both(w, h[1], E4M3, recipe)
    xq, wq = _named(xq, wq)
    y = _nt_dot(xq, wq_t, ix, iw, x.dtype)  # layouts as in _fp8_dot_fwd
    return y, (xq, ix, wq, iw, jnp.zeros((), x.dtype), jnp.zeros((), w.dtype), h, ax, aw)


def _delayed_bwd(recipe, res, g):
    xq, ix, wq, iw, x0, w0, h, ax, aw = res
    gq, gq_t, ig, ag = _delayed_both(g, h[2], recipe.grad_dtype, recipe)
    dx, dw = _dx_dw(xq, ix, wq, iw, gq, gq_t, ig, x0.dtype, w0.dtype)
    new = jnp.stack([_push(h[0], ax), _push(h[1], aw), _push(h[2], ag)])
    return dx, dw, Fp8State(new)


fp8_dot_delayed.defvjp(_delayed_fwd, _delayed_bwd)


# --- einsum-shaped projections -----------------------------------------------------------

def _einsum_groups(spec: str) -> tuple[str, str, str]:
    """'BTD,DNH->BTNH' -> (batch 'BT', contracted 'D', free 'NH'); only that form is accepted."""
    ins, out = spec.replace(" ", "").split("->")
    lhs, rhs = ins.split(",")
    contract = "".join(c for c in lhs if c in rhs)
    batch, free = lhs[: len(lhs) - len(contract)], rhs[len(contract):]
    if not contract or lhs != batch + contract or rhs != contract + free or out != batch + free:
        raise ValueError(f"fp8_einsum({spec!r}): must read '<batch><contracted>,<contracted><free>"
                         "-><batch><free>' (a weight projection), e.g. 'BTD,DNH->BTNH'")
    return batch, contract, free


def fp8_einsum(spec: str, x: jax.Array, w: jax.Array, recipe: Fp8Recipe = CURRENT,
               state: Fp8State | None = None) -> jax.Array:
    """A weight projection as `jnp.einsum(spec, x, w)` would compute it, run by `fp8_dot`.

    x's trailing dims contract with w's leading ones, e.g. 'BTD,DNH->BTNH', 'BTNH,NHD->BTD'.
    Both are viewed as matrices ([B*T, D] and [D, N*H]: merging adjacent dims, no copy).
    With `state`, delayed scaling (`fp8_dot_delayed`); without, current scaling.
    """
    batch, contract, free = _einsum_groups(spec)
    nb, nc = len(batch), len(contract)
    if x.ndim != nb + nc or w.ndim != nc + len(free) or x.shape[nb:] != w.shape[:nc]:
        raise ValueError(f"fp8_einsum({spec!r}): shapes {x.shape} and {w.shape} do not match")
    k = math.prod(w.shape[:nc])
    x2, w2 = x.reshape(-1, k), w.reshape(k, -1)  # [B*T, K], [K, N*H]
    y = fp8_dot(x2, w2, recipe) if state is None else fp8_dot_delayed(x2, w2, state, recipe)
    return y.reshape(x.shape[:nb] + w.shape[nc:])
