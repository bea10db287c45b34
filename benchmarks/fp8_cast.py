"""The FP8 cast-transpose (quantise and write row-major AND transposed) on the step's shapes.

For each operand an FP8 step quantises into both layouts (the weights, float32; the output
gradients, bf16; the 1.1B shape at 8 x 2048 tokens), times, best of 3 rounds of `--reps`
queued calls, XLA's fusion (`fp8.quantize_both` with `Fp8Recipe(cast="xla")`: what
`fp8_cast_kernel=False` runs) and the Pallas kernel (`kernels.cast_transpose`) for each tile /
warps configuration of `--tiles`, checks the
kernel bit for bit against XLA, and reports GB/s (bytes read + bytes written). Each call
includes the amax reduction, as current scaling runs it. Writes $OUT/fp8_cast.json.

    python benchmarks/fp8_cast.py [--tiles 64x4,128x4,128x8,256x8]
    python benchmarks/fp8_cast.py --cpu-smoke     # tiny shapes, interpret mode: checks the script
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fp8_gemm import best_time  # noqa: E402
from llama_jax import fp8, kernels  # noqa: E402


def operands(d: int, f: int, m: int, qkv: int):
    """(name, shape, dtype, fp8 dtype): one layer's operands quantised into both layouts."""
    return [("w_qkv", (d, qkv), jnp.float32, fp8.E4M3), ("w_o", (d, d), jnp.float32, fp8.E4M3),
            ("w_w1w3", (d, 2 * f), jnp.float32, fp8.E4M3), ("w_w2", (f, d), jnp.float32, fp8.E4M3),
            ("g_qkv", (m, qkv), jnp.bfloat16, fp8.E5M2), ("g_o", (m, d), jnp.bfloat16, fp8.E5M2),
            ("g_w1w3", (m, 2 * f), jnp.bfloat16, fp8.E5M2), ("g_w2", (m, d), jnp.bfloat16, fp8.E5M2)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--qkv", type=int, default=2560, help="q, k, v widths together (32 + 2 x 4 heads of 64)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--tiles", default="64x4,128x4,128x8,256x8", help="comma-separated TILExWARPS")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args(argv)
    interpret = args.cpu_smoke
    if args.cpu_smoke:
        args.dim, args.ffn, args.qkv, args.tokens, args.tiles, args.reps = 64, 96, 80, 128, "32x4", 1
    out = {"args": vars(args), "jax": jax.__version__, "device": jax.devices()[0].device_kind, "rows": []}
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")]
    for name, shape, dt, q_dt in operands(args.dim, args.ffn, args.tokens, args.qkv):
        x = (jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32) * 3).astype(dt)
        nbytes = x.size * (jnp.dtype(dt).itemsize + 2)  # read x, write two 1-byte copies

        def scale(x):
            return fp8.scale_from_amax(fp8.amax_of(x), q_dt)
        ref = jax.jit(lambda x: fp8.quantize_both(x, q_dt, scale(x), fp8.Fp8Recipe(cast="xla")))
        want = [np.asarray(a.view(jnp.uint8)) for a in ref(x)]
        row = {"name": name, "shape": list(shape), "dtype": jnp.dtype(dt).name,
               "xla_us": round(best_time(ref, (x,), args.reps) * 1e6, 1)}
        row["xla_gbs"] = round(nbytes / row["xla_us"] / 1e3)
        for tile, warps in tiles:
            key = f"t{tile}w{warps}"
            f = jax.jit(lambda x, tile=tile, warps=warps: kernels.cast_transpose(
                x, scale(x), q_dt, interpret, block=tile, warps=warps))
            got = [np.asarray(a.view(jnp.uint8)) for a in f(x)]
            row[key + "_exact"] = all(np.array_equal(a, b) for a, b in zip(got, want))
            row[key + "_us"] = round(best_time(f, (x,), args.reps) * 1e6, 1)
            row[key + "_gbs"] = round(nbytes / row[key + "_us"] / 1e3)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "fp8_cast.json"), "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
