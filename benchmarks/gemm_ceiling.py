"""The matmul floor of a train step: every weight GEMM of one step, timed alone.

For the LLaMA shape given (default the 1.1B shape of train_step.py, batch 8 x 2048), each
distinct GEMM of the forward pass, the input gradients and the weight gradients is run
alone as a bf16 x bf16 -> bf16 product with float32 accumulation (what the step runs),
on random data, and timed (best of 3 rounds of 20 queued calls, after warm-up). The sum over a step, with
each GEMM counted as often as the step runs it, is the time the step's matmuls would take
if each ran as fast as it does alone: the floor train_step.py's profile is compared with.

    python benchmarks/gemm_ceiling.py [--dim 2048 --ffn 5632 --layers 22 --vocab 32000 --tokens 16384]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from decode import copy_bandwidth  # benchmarks/decode.py: the same measurement


def gemms(d: int, f: int, v: int, m: int, layers: int):
    """(name, M, K, N, count per step) for every weight GEMM of one train step."""
    out = []
    for kind in ("fwd", "dgrad", "wgrad"):
        for name, k, n, c in (("qkvo", d, d, 4), ("w1w3", d, f, 2), ("w2", f, d, 1)):
            if kind == "fwd":
                out.append((f"{kind}_{name}", m, k, n, c * layers))
            elif kind == "dgrad":
                out.append((f"{kind}_{name}", m, n, k, c * layers))
            else:
                out.append((f"{kind}_{name}", k, m, n, c * layers))
    out += [("fwd_output", m, d, v, 1), ("dgrad_output", m, v, d, 1), ("wgrad_output", d, m, v, 1)]
    return out


def time_gemm(mm: int, k: int, n: int, reps: int = 20) -> float:
    ka, kb = jax.random.split(jax.random.PRNGKey(mm * 7 + k * 3 + n))
    a = jax.random.normal(ka, (mm, k), jnp.bfloat16)
    b = jax.random.normal(kb, (k, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    for _ in range(3):
        f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(3):  # calls queue back to back (asynchronous dispatch): GPU time per call
        t0 = time.perf_counter()
        for _ in range(reps):
            y = f(a, b)
        y.block_until_ready()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args(argv)
    rows, total_ms, total_flop = [], 0.0, 0.0
    for name, m, k, n, count in gemms(args.dim, args.ffn, args.vocab, args.tokens, args.layers):
        s = time_gemm(m, k, n)
        flop = 2.0 * m * k * n
        rows.append({"gemm": name, "m": m, "k": k, "n": n, "count": count, "us": round(s * 1e6, 1),
                     "tflops": round(flop / s / 1e12, 1), "ms_per_step": round(s * count * 1e3, 2)})
        total_ms += s * count * 1e3
        total_flop += flop * count
        print(json.dumps(rows[-1]), flush=True)
    bw = copy_bandwidth(jax, jnp, 4 << 30) / 1e12
    summary = {"device": jax.devices()[0].device_kind, "matmul_ms_per_step": round(total_ms, 1),
               "matmul_tflops": round(total_flop / total_ms / 1e9, 1), "copy_tb_per_s": round(bw, 2)}
    print(json.dumps(summary))
    with open(os.path.join(os.environ.get("OUT", "."), "gemm_ceiling.json"), "w") as fh:
        json.dump({"rows": rows, **summary}, fh, indent=1)


if __name__ == "__main__":
    main()
