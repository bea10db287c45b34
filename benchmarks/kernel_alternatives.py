"""The kernels the 1.1B train step could swap in, timed alone against the ones it runs.

Attention (B 8, T 2048, 32 heads of 64, bf16, causal), forward and forward + backward:
cuDNN (what the step runs), the Pallas Triton flash attention that ships with jax
(`jax.experimental.pallas.ops.gpu.attention`), and tokamax's Mosaic GPU (FA3-style, sm90)
flash attention with its backward kernels, when tokamax is importable. Each is checked
against cuDNN's output and gradients (relative L2 error).

Matmuls, the 1.1B step's four GEMM shapes ([16384 x K] x [K x N]): XLA's choice against
jax's Pallas Mosaic GPU Hopper matmul (`hopper_matmul_mgpu`, persistent, warp-specialised,
TMA + wgmma), which could carry fused epilogues (its `c` operand adds a residual).

    python benchmarks/kernel_alternatives.py [--only attn|mm]

One NVIDIA Hopper GPU. Times are medians of 7 rounds of 10 queued calls, after a warm-up.
FLOPs count the causal half of attention; a backward pass counts 2.5 forwards.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

B, T, N, H = 8, 2048, 32, 64
ATTN_FLOPS = 4 * B * N * T * T * H / 2
# (block_q, block_k, block_q_dkv, block_kv_dkv, block_q_dq, block_kv_dq, num_warps, num_stages)
TRITON_CONFIGS = [(128, 64, 64, 64, 64, 64, 4, 2), (128, 64, 64, 64, 64, 64, 4, 3),
                  (128, 128, 64, 64, 64, 64, 4, 2), (64, 64, 32, 32, 32, 32, 4, 2)]
# forward (block_q, block_kv, num_stages); backward (block_q, block_kv, num_stages, compute_wgs)
TOKAMAX_FWD = [(64, 128, 2), (64, 128, 3), (128, 64, 2), (128, 128, 2)]
TOKAMAX_BWD = [(64, 64, 2, 2), (64, 64, 3, 2), (128, 64, 2, 2), (64, 128, 2, 2)]
GEMM_SHAPES = [(16384, 2048, 2048), (16384, 2048, 11264), (16384, 5632, 2048), (16384, 2048, 32000)]
# (tile_m, tile_n, tile_k, max_concurrent_steps, grid_minor_dim, grid_tile_width, wg_dimension)
MGPU_CONFIGS = [(128, 128, 64, 4, "N", 4, "N"), (128, 128, 64, 4, "M", 16, "M"), (128, 128, 64, 3, "N", 8, "M")]


def bench_ms(f, *args, calls: int = 10, rounds: int = 7) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(times)


def rel_err(a, b) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _tokamax():
    """tokamax's Mosaic GPU attention, or None. tokamax 0.0.12 calls `plgpu.kernel` with the
    keyword names of older jax (`out_shape`, `scratch_shapes`); jax 0.11 renamed them."""
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
        kernel = plgpu.kernel
        if "out_shape" not in inspect.signature(kernel).parameters:  # (the rename itself takes out_shape)
            def renamed(*args, out_shape=None, scratch_shapes=None, **kw):
                if out_shape is not None:
                    kw["out_type"] = out_shape
                if scratch_shapes is not None:
                    kw["scratch_types"] = scratch_shapes
                return kernel(*args, **kw)
            plgpu.kernel = renamed
        from absl import flags
        if not flags.FLAGS.is_parsed():  # tokamax reads absl flags, which would parse our argv
            flags.FLAGS([sys.argv[0]])
        from tokamax._src.ops.attention import pallas_mosaic_gpu as fwd
        from tokamax._src.ops.attention import pallas_mosaic_gpu_vjp as vjp
        from tokamax._src.ops.attention import pallas_mosaic_gpu_vjp_common as vjp_common
        return fwd, vjp, vjp_common
    except ImportError as e:
        print(f"tokamax not importable ({e}); skipping its attention", flush=True)
        return None


def attention_rows(log) -> None:
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, do = (jax.random.normal(key, (B, T, N, H), jnp.bfloat16) for key in ks)

    def grads(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    ref_out, ref_grads = jax.jit(cudnn)(q, k, v), grads(cudnn)(q, k, v)

    def row(name, fn, cfg=None, forward=True, backward=True):
        r = {"kind": "attention", "impl": name, "cfg": cfg}
        try:
            if forward:
                f = jax.jit(fn)
                r["err_out"] = rel_err(f(q, k, v), ref_out)
                r["fwd_ms"] = bench_ms(f, q, k, v)
                r["fwd_tflops"] = ATTN_FLOPS / r["fwd_ms"] / 1e9
            if backward:
                g = grads(fn)  # one compilation for the check and the timing
                r["err_grad"] = max(rel_err(a, b) for a, b in zip(g(q, k, v), ref_grads))
                r["fwd_bwd_ms"] = bench_ms(g, q, k, v)
                r["fwd_bwd_tflops"] = 3.5 * ATTN_FLOPS / r["fwd_bwd_ms"] / 1e9
        except Exception as e:  # a config the kernel rejects is a result, not a crash
            r["error"] = repr(e)[:300]
        log(r)

    row("cudnn", cudnn)
    from jax.experimental.pallas.ops.gpu import attention as triton
    for cfg in TRITON_CONFIGS:
        sizes = triton.BlockSizes(*cfg[:6])
        row("pallas_triton", functools.partial(triton.mha, segment_ids=None, sm_scale=H ** -0.5, causal=True,
                                               block_sizes=sizes, num_warps=cfg[6], num_stages=cfg[7]), list(cfg))
    tk = _tokamax()
    if tk is None:
        return
    fwd, vjp, vjp_common = tk

    def op(f, b):
        config = vjp_common.Config(block_q_dkv=b[0], block_kv_dkv=b[1], block_q_dq=b[0], block_kv_dq=b[1],
                                   num_stages=b[2], compute_wgs=b[3])
        attn = fwd.PallasMosaicGpuFlashAttention(config=fwd.ConfigSM90(block_q=f[0], block_kv=f[1], num_stages=f[2]),
                                                 vjp=vjp.PallasMosaicGpuFlashAttentionVjp(config=config))
        return lambda q, k, v: attn(q, k, v, is_causal=True)

    for f in TOKAMAX_FWD:
        row("tokamax_mosaic", op(f, TOKAMAX_BWD[0]), {"fwd": list(f)}, backward=False)
    for b in TOKAMAX_BWD:
        row("tokamax_mosaic", op(TOKAMAX_FWD[0], b), {"fwd": list(TOKAMAX_FWD[0]), "bwd": list(b)}, forward=False)


def matmul_rows(log) -> None:
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    for m, k, n in GEMM_SHAPES:
        a = jax.random.normal(jax.random.PRNGKey(1), (m, k), jnp.bfloat16)
        b = jax.random.normal(jax.random.PRNGKey(2), (k, n), jnp.bfloat16) * 0.02
        flops = 2 * m * k * n
        xla = jax.jit(lambda a, b: a @ b)
        ref = xla(a, b)
        ms = bench_ms(xla, a, b)
        log({"kind": "matmul", "impl": "xla", "shape": [m, k, n], "ms": ms, "tflops": flops / ms / 1e9})
        for tm, tn, tk, steps, minor, width, wg in MGPU_CONFIGS:
            cfg = hm.TuningConfig(tile_m=tm, tile_n=tn, tile_k=tk, max_concurrent_steps=steps,
                                  grid_minor_dim=hm.MatmulDimension[minor], grid_tile_width=width,
                                  wg_dimension=hm.MatmulDimension[wg])
            r = {"kind": "matmul", "impl": "pallas_mgpu", "shape": [m, k, n], "cfg": [tm, tn, tk, steps, minor, width, wg]}
            try:
                f = jax.jit(functools.partial(hm.matmul, c=None, config=cfg))
                r["err"] = rel_err(f(a, b), ref)
                r["ms"] = bench_ms(f, a, b)
                r["tflops"] = flops / r["ms"] / 1e9
            except Exception as e:
                r["error"] = repr(e)[:300]
            log(r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["attn", "mm"], default=None)
    args = ap.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
    rows = []
    path = os.path.join(os.environ.get("OUT", "."), "kernel_alternatives.json")

    def log(r):
        rows.append(r)
        print(json.dumps({key: (round(val, 4) if isinstance(val, float) else val) for key, val in r.items()}), flush=True)
        with open(path, "w") as fh:
            json.dump(rows, fh, indent=1)

    if args.only in (None, "attn"):
        attention_rows(log)
    if args.only in (None, "mm"):
        matmul_rows(log)


if __name__ == "__main__":
    main()
