"""Training speed of our train step against transformers + torch, in the same run.

Shapes: the LLaMA-1.1B shape of the peer script (dim 2048, 22 layers, 32 heads, ffn 5632,
vocab 32000) and LLaMA-7B; batch 8 x 2048 per device, bf16 compute, float32 master
params and AdamW state (the paper's optimizer chain from llama_jax.train.optim; `--param-dtypes`
adds pure bf16 params and AdamW state, the precision the peer trains in). One FLOP
formula throughout (llama_jax.train.metrics.flops_per_token): 6 x non-embedding params +
6 x layers x dim x seq; MFU against 989 TFLOP/s dense bf16 per H200.
Timing as the peer script: 3 warm-up steps, then the mean of 10 timed steps.
The peer (/work/shared/peers/hf_torch_h200.py, vendored as benchmarks/peers/) runs first,
in a subprocess, so the frameworks never share GPU memory.

    python benchmarks/train_step.py                       # one GPU: 1.1B, with the peer
    python benchmarks/train_step.py --no-peer             # two GPUs: 7B, FSDP over both
    python benchmarks/train_step.py --param-dtypes float32,bfloat16  # also pure bf16, as the peer
    python benchmarks/train_step.py --precision bf16,fp8  # FP8 layer matmuls too, + torchao float8 peer
    python benchmarks/train_step.py --no-peer --precision fp8   # two GPUs: 7B FSDP in FP8
    python benchmarks/train_step.py --no-peer --precision fp8 --fp8-scaling current,delayed  # key 1b_fp8_delayed
    python benchmarks/train_step.py --shapes tiny --no-peer --steps 2   # CPU smoke test
`--precision fp8` (RunOptions.matmul_precision) runs the layers' weight matmuls in FP8; FLOPs
are still counted as bf16-equivalent model FLOPs, so TFLOP/s compare across precisions.
`--fp8-scaling` (RunOptions.fp8_scaling): current (key `1b_fp8`) and/or delayed (`1b_fp8_delayed`:
scales from amax histories of `--fp8-history` steps, carried in the train state).
`--fp8-cast-kernel 1,0`: FP8 weights and gradients quantised in both layouts by the Pallas
cast-transpose kernel (1, the default) and by XLA's fusions (0, key suffix `_xla_cast`).
With fp8 and the peer, the torchao float8 peer (peers/hf_torch_float8.py: transformers +
torch.compile, bf16 and float8 tensorwise, all Linear but lm_head) runs instead of the
eager/compile peer, before JAX.
Writes $OUT/train_step.json (or ./train_step.json) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# JAX's GPU allocator takes 75% of the memory by default; the 7B FSDP step needs ~106 GiB of
# an H200's 140 (the peer, which runs first, is a separate process that has exited by then).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))



def default_remat(name: str, n_devices: int) -> str:
    """Keep the weight matmuls' outputs (the paper's recipe) where memory allows.

    7B on one GPU: float32 params, grads and AdamW moments take 16 bytes a parameter
    (108 GB), so activations must be recomputed; FSDP over two GPUs halves that.
    """
    if name == "7b" and n_devices == 1:
        return "full"
    return "none" if name == "tiny" else "dots_flash"


def shape(name: str):
    from llama_jax import ModelConfig
    if name == "1b":
        return ModelConfig(dim=2048, n_layers=22, n_heads=32, vocab_size=32000, multiple_of=256,
                           norm_eps=1e-6, max_seq_len=2048)
    if name == "7b":
        return ModelConfig.preset("llama-7b")
    if name == "tiny":
        return ModelConfig.preset("tiny")
    raise ValueError(f"unknown shape {name!r}: 1b, 7b, tiny")


def random_batch(cfg, mesh, b: int, t: int) -> dict:
    """A [b, t] batch of random tokens, placed as the train step expects. Unpacked rows, as
    the peer trains: no segment ids, so cuDNN runs its causal kernel."""
    import jax
    import jax.numpy as jnp
    from llama_jax.train import state as train_state
    tokens = jax.random.randint(jax.random.PRNGKey(1), (b, t + 1), 0, cfg.vocab_size, jnp.int32)
    bs = train_state.batch_sharding(mesh)
    return {"tokens": jax.device_put(tokens[:, :-1], bs), "targets": jax.device_put(tokens[:, 1:], bs),
            "loss_mask": jax.device_put(jnp.ones((b, t), jnp.float32), bs), "segment_ids": None, "positions": None}


def timed_steps(step, state, batch, n: int, warm: int = 2):
    """(state, seconds per step): `warm` steps, then the mean of n queued steps."""
    import jax
    for _ in range(warm):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(n):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    return state, (time.perf_counter() - t0) / n


def ours(name: str, args, param_dtype: str = "float32", precision: str = "bf16", scaling: str = "current",
         cast_kernel: bool = True) -> dict:
    import jax
    from llama_jax import sharding
    from llama_jax.train import metrics
    from llama_jax.train import optim
    from llama_jax.train import state as train_state
    from llama_jax import Llama, RunOptions
    n_dev = jax.device_count()
    cfg = shape(name)
    run = RunOptions(dtype="bfloat16", param_dtype=param_dtype,
                     remat_policy=args.remat or default_remat(name, n_dev), attention_impl=args.attention,
                     layer_loop=args.layer_loop, fuse_gate_up=bool(args.fuse_gate_up),
                     matmul_precision=precision, fp8_scaling=scaling, fp8_history=args.fp8_history,
                     fp8_cast_kernel=cast_kernel)
    model = Llama(cfg, run)
    mesh = sharding.make_mesh((1, -1, 1))
    tx = optim.make_optimizer(optim.OptimizerConfig(warmup_steps=10), total_steps=1000)
    schedule = optim.lr_schedule(optim.OptimizerConfig(warmup_steps=10), 1000)
    abstract = train_state.abstract_state(model, tx)
    shardings = train_state.state_shardings(abstract, mesh)
    state = train_state.init_state(model, tx, mesh, jax.random.PRNGKey(0))
    step = train_state.make_train_step(model, tx, schedule, mesh, shardings)
    b, t = args.batch * n_dev, args.seq
    batch = random_batch(cfg, mesh, b, t)
    t0 = time.time()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.time() - t0  # the first call: trace + compile + one step
    state, dt = timed_steps(step, state, batch, args.steps)
    tps = b * t / dt
    fpt = metrics.flops_per_token(cfg, t)
    stats = jax.devices()[0].memory_stats() or {}
    if args.hlo:  # the optimized HLO, to read the profile's fusion names against
        with open(args.hlo, "w") as fh:
            fh.write(step.lower(state, batch).compile().as_text())
    prof = {}
    if args.profile:
        import gpu_profile
        def once():
            nonlocal state
            state, m = step(state, batch)
            jax.block_until_ready(m)
        prof = {"profile": gpu_profile.profile(once, top=args.top)}
    return {**prof, "devices": n_dev, "param_dtype": run.param_dtype.name, "remat": run.remat_policy.value,
            "matmul_precision": run.matmul_precision.value,
            **({"fp8_scaling": run.fp8_scaling.value, "fp8_history": run.fp8_history,
                "fp8_cast_kernel": run.fp8_cast_kernel} if precision == "fp8" else {}),
            "layer_loop": run.layer_loop.value, "fuse_gate_up": run.fuse_gate_up,
            "attention": run.attention_impl.value,
            "step_s": round(dt, 4), "tokens_per_s": round(tps), "tokens_per_s_per_device": round(tps / n_dev),
            "tflops_per_device": round(tps * fpt / n_dev / 1e12, 1),
            "mfu": round(tps * fpt / n_dev / (args.peak * 1e12), 3), "compile_s": round(compile_s, 1),
            "peak_mem_gb": round(stats.get("peak_bytes_in_use", 0) / 1e9, 1), "loss": float(m["loss"])}


def peer(shapes, args) -> dict:
    """transformers + torch (eager and torch.compile), timed by the vendored peer script."""
    code = f"""
import json, sys, torch
sys.path.insert(0, {os.path.join(os.path.dirname(os.path.abspath(__file__)), 'peers')!r})
import hf_torch_h200 as P
from transformers import LlamaConfig
shapes = {{"1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32),
          "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)}}
for name in {list(shapes)!r}:
    kw = shapes[name]
    cfg = LlamaConfig(vocab_size=32000, num_key_value_heads=kw["num_attention_heads"], max_position_embeddings=2048,
                      rms_norm_eps=1e-6, attn_implementation="sdpa", **kw)
    for compile_ in (False, True):
        key = f"peer_{{name}}_{{'compile' if compile_ else 'eager'}}"
        try:
            P.train(key, cfg, {args.batch}, {args.seq}, compile_)
        except Exception as e:
            P.out[key] = repr(e)[:300]
            torch.cuda.empty_cache()
print("PEER_JSON" + json.dumps(P.out))
"""
    env = dict(os.environ, PEAK_TFLOPS=str(args.peak))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("PEER_JSON"):
            return json.loads(line[len("PEER_JSON"):])
    return {"error": (proc.stderr or proc.stdout)[-1500:]}


def float8_peer(args) -> dict:
    """torchao float8 training (and the bf16 compiled step beside it) by peers/hf_torch_float8.py,
    which prints its results as one JSON line last."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "hf_torch_float8.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True,
                          env=dict(os.environ, PEAK_TFLOPS=str(args.peak)))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"error": (proc.stderr or proc.stdout)[-1500:]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="", help="default: 1b on one GPU, 7b on several")
    ap.add_argument("--peer-shapes", default="1b")
    ap.add_argument("--batch", type=int, default=8, help="rows per device")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--remat", default="", help="override the per-shape remat policy")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--layer-loop", default="unrolled", help="unrolled or scan (RunOptions.layer_loop)")
    ap.add_argument("--fuse-gate-up", type=int, default=1, help="1: w1|w3 as one matmul, Pallas SwiGLU "
                    "backward on GPUs (RunOptions.fuse_gate_up); 0: two matmuls")
    ap.add_argument("--param-dtypes", default="float32",
                    help="comma-separated: float32 (master params and AdamW state, the paper's chain) and/or "
                         "bfloat16 (pure bf16 params and AdamW state, as the peer trains); each its own run")
    ap.add_argument("--precision", default="bf16", help="comma-separated: bf16 and/or fp8 (the layers' weight "
                    "matmuls, RunOptions.matmul_precision); each its own run")
    ap.add_argument("--fp8-scaling", default="current", help="comma-separated: current and/or delayed "
                    "(RunOptions.fp8_scaling), each its own run of --precision fp8")
    ap.add_argument("--fp8-cast-kernel", default="1", help="comma-separated: 1 (the Pallas cast-transpose "
                    "kernel, RunOptions.fp8_cast_kernel) and/or 0 (XLA's fusions; key suffix _xla_cast)")
    ap.add_argument("--fp8-history", type=int, default=16, help="delayed scaling: amaxes kept per tensor")
    ap.add_argument("--peak", type=float, default=989.0, help="dense bf16 TFLOP/s per device")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--json", default="train_step.json", help="results file, under $OUT if set (an absolute path as is)")
    ap.add_argument("--hlo", default="", help="also write the compiled step's HLO text here")
    ap.add_argument("--top", type=int, default=15, help="--profile: how many kernels to list")
    ap.add_argument("--profile", action="store_true", help="also trace 3 steps: GPU time by kernel kind")
    args = ap.parse_args(argv)
    out = {"args": vars(args), "date": time.strftime("%Y-%m-%d")}
    if not args.no_peer:  # first: JAX would take most of the GPU's memory once started
        if "fp8" in args.precision.split(","):
            # hf_torch_float8.py times the bf16 compiled step beside torchao float8: that is
            # the bf16 peer too (the eager peer adds nothing to an FP8 comparison).
            out["peer_float8"] = float8_peer(args)
            print("peer_float8", json.dumps(out["peer_float8"]), flush=True)
        else:
            out["peer"] = peer(args.peer_shapes.split(","), args)
            print("peer", json.dumps(out["peer"]), flush=True)
    import jax
    if not args.shapes:
        args.shapes = "1b" if jax.device_count() == 1 else "7b"
    out["jax"] = jax.__version__
    out["device"] = jax.devices()[0].device_kind
    def variants(prec):  # (key suffix, scaling, cast kernel): an FP8 run per scaling and cast
        if prec == "bf16":
            return [("", "current", True)]
        return [(f"_{prec}" + ("" if sc == "current" else f"_{sc}") + ("" if ck == "1" else "_xla_cast"), sc, ck == "1")
                for sc in args.fp8_scaling.split(",") for ck in args.fp8_cast_kernel.split(",")]
    runs = [(name + ("" if pd == "float32" else f"_{pd}") + suffix, name, pd, prec, sc, ck)
            for name in args.shapes.split(",") for pd in args.param_dtypes.split(",")
            for prec in args.precision.split(",") for suffix, sc, ck in variants(prec)]
    for i, (key, name, pd, prec, sc, ck) in enumerate(runs):
        try:
            out[key] = ours(name, args, pd, prec, sc, ck)
            if i:  # the device's peak spans the process: after the first run it is not this run's
                out[key]["peak_mem_gb_process"] = out[key].pop("peak_mem_gb")
        except Exception as e:  # record and go on: a failed shape is a result too
            out[key] = {"error": repr(e)[:500]}
        print(key, json.dumps(out[key]), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), args.json), "w") as f:
        json.dump(out, f, indent=1)
    print(f"\n{'run':28s} {'tok/s':>9s} {'TFLOP/s/dev':>12s} {'MFU':>6s} {'compile s':>9s} {'peak GB':>8s}")
    for key, *_ in runs:
        r = out[key]
        if "error" not in r:
            print(f"{'ours_' + key + '_x' + str(r['devices']):28s} {r['tokens_per_s']:9d} {r['tflops_per_device']:12.1f} "
                  f"{r['mfu']:6.3f} {r['compile_s']:9.1f} {r.get('peak_mem_gb', float('nan')):8.1f}")
    for k, r in [*out.get("peer", {}).items(), *out.get("peer_float8", {}).items()]:
        if isinstance(r, dict) and "tokens_per_s" in r:
            print(f"{k:28s} {r['tokens_per_s']:9d} {'':12s} {r['mfu']:6.3f} {r['warmup_s']:9.1f} {r['peak_mem_gb']:8.1f}")


if __name__ == "__main__":
    main()
