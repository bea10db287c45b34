"""Pallas kernels for memory-bound steps: SwiGLU's backward pass, FP8's cast-transpose.

`swiglu(gate_up)` is silu(gate) * up for gate_up [..., 2, F]: the outputs of w1 and w3
from one product (`RunOptions.fuse_gate_up`). Forward: the XLA expression, which XLA
fuses into its neighbours. Backward: one Pallas (Triton) kernel that reads gate_up and
the incoming gradient once and writes both input gradients into one [..., 2, F] array.
XLA writes that stacked gradient through a concatenate: on an H200, [16384, 2, 5632] bf16
took it 356 us against the kernel's 235 (3.9 TB/s; a plain copy of gate_up runs at 3.2-4.2).

When: on GPUs, with 16-bit activations and (per device) F a multiple of 32. Elsewhere (CPU, TPU, float32)
the backward pass is XLA's gradient of the same expression. Under a device mesh the
kernel runs once per shard (`shard_map` over the activations' logical sharding), since it
is elementwise over tokens and F. `interpret=True` (`RunOptions.interpret_kernels`) runs
the kernel in Pallas's interpret mode on any backend (the tests do, on CPU).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec

from llama_jax import sharding

GATE_UP_AXES = ("batch", "seq", None, "mlp")  # logical axes of gate_up [B,T,2,F] in the model
_F32 = jnp.float32
_BLOCK_F, _BLOCK_ELEMS, _WARPS = 256, 4096, 4  # fastest of 11 configurations on an H200


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _mode(x, interpret: bool) -> str | None:
    """"gpu" or "interpret" where the Pallas kernel runs for x [..., 2, F]; None: XLA."""
    if interpret:
        return "interpret"
    if jax.default_backend() == "gpu" and x.dtype in (jnp.bfloat16, jnp.float16):
        return "gpu"
    return None


def _reference(gate_up):
    return jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]


def _bwd_kernel(h_ref, g_ref, dh_ref):
    a = h_ref[:, 0, :].astype(_F32)  # gate
    u = h_ref[:, 1, :].astype(_F32)  # up
    g = g_ref[...].astype(_F32)
    s = 1.0 / (1.0 + jnp.exp(-a))    # silu(a) = a * s, silu'(a) = s * (1 + a * (1 - s))
    dh_ref[:, 0, :] = (g * u * s * (1.0 + a * (1.0 - s))).astype(dh_ref.dtype)
    dh_ref[:, 1, :] = (g * a * s).astype(dh_ref.dtype)


def _bwd_local(gate_up, g, interpret: bool):
    """The kernel on one device's arrays: gate_up [..., 2, F], g [..., F] -> d gate_up."""
    f = gate_up.shape[-1]
    m = gate_up.size // (2 * f)
    bf = _pow2_divisor(f, _BLOCK_F)
    if bf < 32:  # too ragged to tile: XLA's gradient
        return jax.vjp(_reference, gate_up)[1](g)[0]
    bm = _pow2_divisor(m, max(1, _BLOCK_ELEMS // bf))
    from jax.experimental.pallas import triton as plgpu
    dh = pl.pallas_call(
        _bwd_kernel, grid=(m // bm, f // bf),
        in_specs=[pl.BlockSpec((bm, 2, bf), lambda i, j: (i, 0, j)), pl.BlockSpec((bm, bf), lambda i, j: (i, j))],
        out_specs=pl.BlockSpec((bm, 2, bf), lambda i, j: (i, 0, j)),
        out_shape=jax.ShapeDtypeStruct((m, 2, f), gate_up.dtype),
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=_WARPS),
        interpret=interpret, name="swiglu_bwd")(gate_up.reshape(m, 2, f), g.reshape(m, f))
    return dh.reshape(gate_up.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def swiglu(gate_up, axes=GATE_UP_AXES, interpret: bool = False, kernel: bool = True):
    """silu(gate_up[..., 0, :]) * gate_up[..., 1, :]; `axes`: gate_up's logical axis names;
    `interpret`: the backward kernel in Pallas's interpret mode, on any backend; `kernel=False`:
    XLA's gradient everywhere (it can absorb elementwise producers, the kernel cannot)."""
    return _reference(gate_up)


def _swiglu_fwd(gate_up, axes, interpret, kernel):
    return _reference(gate_up), gate_up


def _swiglu_bwd(axes, interpret, kernel, gate_up, g):
    mode = _mode(gate_up, interpret) if kernel else None
    mesh = jax.sharding.get_abstract_mesh()
    per_shard = not mesh.empty and mesh.size > 1
    spec = nn.logical_to_mesh_axes(axes) if per_shard else None
    if mode is None or (per_shard and not all(sharding.divides(gate_up.shape, spec, mesh))):
        return jax.vjp(_reference, gate_up)[1](g)
    run = functools.partial(_bwd_local, interpret=mode == "interpret")
    if per_shard:  # elementwise: each device runs the kernel on its own block
        spec_g = PartitionSpec(*spec[:-2], spec[-1])
        run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec_g), out_specs=spec, check_vma=False)
    return (run(gate_up, g),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


# --- FP8 cast-transpose ------------------------------------------------------------------
# An FP8 GEMM on cuBLASLt wants the contraction dim minor in both operands, so an operand
# used by two GEMMs contracting different dims (a weight: forward and input gradient; the
# output gradient: input gradient and weight gradient) is needed row-major AND transposed.
# XLA writes both from one fusion, but at about half of HBM bandwidth on an H200 (issue 22,
# benchmarks/RESULTS.md); this kernel reads a tile once, quantises it and writes it in both
# layouts (Transformer Engine's cast_transpose).
_CT_BLOCK, _CT_WARPS = 128, 8  # tile (rows and columns) and warps: fastest of 4 in benchmarks/fp8_cast.py


def fp8_kernel_mode(x, interpret: bool) -> str | None:
    """"gpu", "interpret" or None (XLA) for FP8 kernels on x: Pallas on one GPU only (under a
    mesh of several devices the operands are sharded and XLA's fusions take them as they are)."""
    if interpret:
        return "interpret"
    mesh = jax.sharding.get_abstract_mesh()
    if jax.default_backend() == "gpu" and (jax.device_count() == 1 if mesh.empty else mesh.size == 1):
        return "gpu"
    return None


def _cast_t_kernel(s_ref, x_ref, q_ref, qt_ref, *amax_ref, fmax):
    x = x_ref[...].astype(_F32)
    q = jnp.clip(x * s_ref[...], -fmax, fmax).astype(q_ref.dtype)
    q_ref[...] = q
    qt_ref[...] = q.T
    if amax_ref:  # this tile's max |x|: the caller reduces the [M/bm, K/bk] partials
        amax_ref[0][...] = jnp.max(jnp.max(jnp.abs(x), axis=1, keepdims=True), axis=0, keepdims=True)


def cast_transpose_tiles(shape, block: int = _CT_BLOCK) -> tuple[int, int] | None:
    """The (rows, columns) tile `cast_transpose` uses for a [M, K] shape; None: it does not tile."""
    bm, bk = _pow2_divisor(shape[0], block), _pow2_divisor(shape[1], block)
    return (bm, bk) if min(bm, bk) >= 16 else None


def cast_transpose(x, scale, dtype, interpret: bool = False, with_amax: bool = False,
                   block: int = _CT_BLOCK, warps: int = _CT_WARPS):
    """(q, q.T) with q = clip(x * scale, -fmax, fmax) rounded to FP8 `dtype` (fp8.quantize's
    values, bit for bit), for x [M, K] that tiles (`cast_transpose_tiles`) and a float32
    scalar `scale`. `with_amax`: also max |x| (float32), found in the same pass (delayed
    scaling records it for the next steps). `block`, `warps`: the tile and Triton warps."""
    m, k = x.shape
    tiles = cast_transpose_tiles(x.shape, block)
    if tiles is None:
        raise ValueError(f"cast_transpose: shape {x.shape} does not tile (a power-of-two divisor >= 16 of each dim)")
    bm, bk = tiles
    from jax.experimental.pallas import triton as plgpu
    kernel = functools.partial(_cast_t_kernel, fmax=float(jnp.finfo(dtype).max))
    out_specs = [pl.BlockSpec((bm, bk), lambda i, j: (i, j)), pl.BlockSpec((bk, bm), lambda i, j: (j, i))]
    out_shape = [jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((k, m), dtype)]
    if with_amax:
        out_specs.append(pl.BlockSpec((1, 1), lambda i, j: (i, j)))
        out_shape.append(jax.ShapeDtypeStruct((m // bm, k // bk), _F32))
    out = pl.pallas_call(
        kernel, grid=(m // bm, k // bk),
        in_specs=[pl.BlockSpec((1, 1), lambda i, j: (0, 0)), pl.BlockSpec((bm, bk), lambda i, j: (i, j))],
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=warps),
        interpret=interpret, name="fp8_cast_transpose")(jnp.reshape(scale, (1, 1)).astype(_F32), x)
    return (out[0], out[1], jnp.max(out[2])) if with_amax else tuple(out)
