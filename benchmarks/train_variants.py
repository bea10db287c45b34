"""Train-step variants compared in one process: interleaved timing on one shared state.

Each variant is RunOptions overrides on the train_step.py shape (dtype bf16, float32
masters, remat dots_flash, unrolled loop, w1|w3 fused: train_step.py's defaults), e.g.
`fuse_gate_up=False,remat_policy=minimal`.
All variants step the same (donated) TrainState in turn, round after round (variants with
another `param_dtype`, e.g. pure bf16 `param_dtype=bfloat16`, share a state of their own), so they meet
the same machine, clocks and autotuned kernels' neighbours; differences of ~0.5% show,
where separate processes differ by up to 5% (XLA's autotuner picks GEMM kernels by timing).

    python benchmarks/train_variants.py "base unfused:fuse_gate_up=False" [--shape 1b] [--rounds 3]
        [--steps 8] [--profile unfused]   # --profile: GPU busy time, kinds, top kernels, idle gaps

Writes $OUT/train_variants.json (or ./train_variants.json).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_variant(spec: str, base):
    """"name:field=value,field=value" -> (name, RunOptions)."""
    name, _, overrides = spec.partition(":")
    run = base
    for kv in filter(None, overrides.split(",")):
        key, sep, value = kv.partition("=")
        if not sep:
            raise SystemExit(f"variant {spec!r}: {kv!r} is not field=value")
        value = {"True": True, "False": False}.get(value, int(value) if value.isdigit() else value)
        run = run.replace(**{key: value})
    return name, run


def trace(step, state, batch, n=4, top=40):
    """Profile n back-to-back steps (no sync between them): busy vs wall time, idle gaps."""
    import jax
    import gpu_profile
    tdir = tempfile.mkdtemp(prefix="trace_")
    jax.profiler.start_trace(tdir, create_perfetto_trace=True)
    t0 = time.perf_counter()
    for _ in range(n):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    wall = (time.perf_counter() - t0) / n
    jax.profiler.stop_trace()
    ks = gpu_profile.kernel_events(tdir)
    if not ks:
        raise SystemExit(f"--profile: no GPU kernels in the trace under {tdir} (it needs a GPU)")
    by, cnt = collections.Counter(), collections.Counter()
    for e in ks:
        by[e["name"]] += e["dur"] / 1e3 / n
        cnt[e["name"]] += 1
    gaps, end = [], ks[0]["ts"] + ks[0]["dur"]
    for e in ks[1:]:
        if e["ts"] > end:
            gaps.append((e["ts"] - end) / 1e3)
        end = max(end, e["ts"] + e["dur"])
    kinds = collections.Counter()
    for k, v in by.items():
        kinds[gpu_profile.kind(k)] += v
    return state, {"wall_ms": round(wall * 1e3, 2), "busy_ms": round(sum(by.values()), 2),
                   "idle_ms": round(sum(gaps) / n, 2), "largest_gap_ms": round(max(gaps, default=0), 3),
                   "kinds": {k: round(v, 2) for k, v in kinds.most_common()},
                   "top": [(round(ms, 2), cnt[k] // n, k[:90]) for k, ms in by.most_common(top)]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", help='space-separated "name:field=value,..." (name alone: the base)')
    ap.add_argument("--shape", default="1b", help="1b, 7b or tiny (train_step.py's shapes)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant per round")
    ap.add_argument("--profile", default="", help="comma-separated variant names to profile")
    ap.add_argument("--peak", type=float, default=989.0)
    args = ap.parse_args(argv)
    import jax
    import train_step as TS
    from llama_jax import Llama, RunOptions, sharding
    from llama_jax.train import metrics
    from llama_jax.train import optim
    from llama_jax.train import state as train_state
    n_dev = jax.device_count()
    cfg = TS.shape(args.shape)
    base = RunOptions(dtype="bfloat16", param_dtype="float32", remat_policy="dots_flash", layer_loop="unrolled",
                      fuse_gate_up=True)
    variants = [parse_variant(v, base) for v in args.variants.split()]
    mesh = sharding.make_mesh((1, -1, 1))
    ocfg = optim.OptimizerConfig(warmup_steps=10)
    tx, schedule = optim.make_optimizer(ocfg, total_steps=1000), optim.lr_schedule(ocfg, 1000)
    shardings, states = {}, {}  # one state per parameter dtype, shared by the variants with it
    for _, run in variants:
        if run.param_dtype not in states:
            abstract = train_state.abstract_state(Llama(cfg, run), tx)
            shardings[run.param_dtype] = train_state.state_shardings(abstract, mesh)
            states[run.param_dtype] = train_state.init_state(Llama(cfg, run), tx, mesh, jax.random.PRNGKey(0))
    b, t = 8 * n_dev, 2048
    batch = TS.random_batch(cfg, mesh, b, t)
    flop = b * t * metrics.flops_per_token(cfg, t) / n_dev
    steps, out = {}, {"args": vars(args), "device": jax.devices()[0].device_kind, "variants": {}}
    for name, run in variants:  # every variant must keep the parameter tree: they share the state
        key = run.param_dtype
        step = train_state.make_train_step(Llama(cfg, run), tx, schedule, mesh, shardings[key])
        t0 = time.time()
        states[key], m = step(states[key], batch)
        jax.block_until_ready(m)
        steps[name] = (step, key)
        out["variants"][name] = {"config": {**cfg.to_dict(), **run.to_dict()}, "compile_s": round(time.time() - t0, 1), "step_s": []}
        print(name, "compiled in", out["variants"][name]["compile_s"], "s", flush=True)
    for r in range(args.rounds):
        for name, (step, key) in steps.items():
            states[key], dt = TS.timed_steps(step, states[key], batch, args.steps)
            out["variants"][name]["step_s"].append(dt)
        print("round", r, {k: round(flop / v["step_s"][-1] / 1e12, 1) for k, v in out["variants"].items()}, flush=True)
    for name, v in out["variants"].items():
        med = sorted(v["step_s"])[len(v["step_s"]) // 2]
        v.update(step_ms_median=round(med * 1e3, 2), tflops_per_device_median=round(flop / med / 1e12, 1),
                 mfu_median=round(flop / med / (args.peak * 1e12), 3))
        print(f"{name:16s} {v['step_ms_median']:9.2f} ms {v['tflops_per_device_median']:7.1f} TFLOP/s/device", flush=True)
    for name in filter(None, args.profile.split(",")):
        step, key = steps[name]
        states[key], out["variants"][name]["profile"] = trace(step, states[key], batch)
        p = out["variants"][name]["profile"]
        print("profile", name, json.dumps({k: p[k] for k in ("wall_ms", "busy_ms", "idle_ms", "kinds")}), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "train_variants.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
