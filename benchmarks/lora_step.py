"""Fine-tuning speed: LoRA (rank 16, alpha 32, all seven projections, frozen bf16 base) on
the Llama-3.1-8B shape, and full SFT (float32 master params, AdamW) on the 1.1B shape of
benchmarks/train_step.py; tokens/s and peak memory, one GPU, bf16 compute.
Peers, each run first in its own subprocess so the frameworks never share GPU memory:
transformers + peft (eager and torch.compile), the vendored peers/hf_peft_lora.py (from
/work/shared/peers/); for full SFT, benchmarks/train_step.py's transformers + torch peer (the
same step: a loss mask changes no FLOP). Each of our runs is a subprocess too, so its peak
memory is its own. `--fusion` also times one adapted projection with the LoRA A matmul
fused into the base matmul (x @ [W | A]) against apart (x @ W + (x @ A) @ B).

    python benchmarks/lora_step.py                 # one H200: LoRA 8B b4 x 2048 + SFT 1.1B b8 x 2048, peers
    python benchmarks/lora_step.py --no-peer --lora-remat attention,dots_flash --fusion
    python benchmarks/lora_step.py --no-peer --lora-remat "" --sft-remat dots_flash,dots_flash:bf16,dots_flash:fp8:bf16
    python benchmarks/lora_step.py --peer-runs sft --lora-remat "" --sft-remat dots_flash:fp8:bf16  # SFT, its peer
    python benchmarks/lora_step.py --cpu-smoke     # tiny shapes, CPU, no peer (tests/test_benchmarks.py)
Writes $OUT/lora_step.json (or ./lora_step.json) and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _shape(name: str):
    from llama_jax import ModelConfig
    from train_step import shape
    return ModelConfig.preset("llama3.1-8b") if name == "8b" else shape(name)


def ours(name: str, lora_rank: int, batch: int, seq: int, steps: int, remat: str, fuse: bool = True,
         precision: str = "bf16", param_dtype: str = "float32") -> dict:
    import jax
    import jax.numpy as jnp
    from llama_jax import Llama, RunOptions, lora as L, sharding
    from llama_jax.train import optim, state as train_state
    from train_step import random_batch, timed_steps
    cfg = _shape(name)
    lora = L.LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank, targets=ALL) if lora_rank else None
    run = RunOptions(dtype="bfloat16", param_dtype=param_dtype, remat_policy=remat, layer_loop="unrolled",
                     fuse_gate_up=fuse and jax.default_backend() == "gpu", matmul_precision=precision)
    model = Llama(cfg, run, lora=lora)
    mesh = sharding.make_mesh((1, -1, 1))
    ocfg = optim.OptimizerConfig(warmup_steps=10)
    tx, schedule = optim.make_optimizer(ocfg, 1000), optim.lr_schedule(ocfg, 1000)
    shardings = train_state.state_shardings(train_state.abstract_state(model, tx), mesh)
    base = train_state.init_base(model, mesh, jax.random.PRNGKey(0), "bfloat16") if lora else None
    state = train_state.init_state(model, tx, mesh, jax.random.PRNGKey(1))
    step = train_state.make_train_step(model, tx, schedule, mesh, shardings, base=base)
    b = batch * jax.device_count()
    data = random_batch(cfg, mesh, b, seq)
    if lora is None:  # SFT: the loss on the second half of each row (the "answer")
        data["loss_mask"] = jax.device_put(jnp.concatenate([jnp.zeros((b, seq // 2)), jnp.ones((b, seq - seq // 2))],
                                                           1), data["loss_mask"].sharding)
    before = jax.devices()[0].memory_stats() or {}  # what init left: params, state, batch
    t0 = time.time()
    state, m = step(state, data)
    jax.block_until_ready(m)
    compile_s = time.time() - t0
    state, dt = timed_steps(step, state, data, steps)
    stats = jax.devices()[0].memory_stats() or {}
    trainable = sum(x.size for x in jax.tree.leaves(state.params))
    return {"shape": name, "lora_rank": lora_rank, "batch": b, "seq": seq, "remat": remat,
            "step_s": round(dt, 4), "tokens_per_s": round(b * seq / dt), "compile_s": round(compile_s, 1),
            "peak_mem_gb": round(stats.get("peak_bytes_in_use", 0) / 1e9, 1), "trainable": int(trainable),
            "fuse_gate_up": run.fuse_gate_up, "matmul_precision": precision, "param_dtype": param_dtype,
            "in_use_before_step_gb": round(before.get("bytes_in_use", 0) / 1e9, 1),
            "peak_before_step_gb": round(before.get("peak_bytes_in_use", 0) / 1e9, 1),
            "loss": float(m["loss"])}


def peer() -> dict:
    """transformers + peft, eager and torch.compile: the vendored peer script's JSON."""
    with tempfile.TemporaryDirectory() as out:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "hf_peft_lora.py")
        proc = subprocess.run([sys.executable, script], env={**os.environ, "OUT": out}, capture_output=True,
                              text=True)
        path = os.path.join(out, "hf_peft_lora.json")
        if proc.returncode or not os.path.exists(path):
            return {"error": (proc.stdout[-500:] + proc.stderr[-1500:])}
        with open(path) as f:
            return json.load(f)


def sft_peer() -> dict:
    """transformers + torch on the 1.1B shape, b8 x 2048 (benchmarks/train_step.py's peer)."""
    import types
    import train_step
    return train_step.peer(["1b"], types.SimpleNamespace(batch=8, seq=2048, peak=989.0))


def in_subprocess(kind: str, **kw) -> dict:
    """One of our runs in a fresh process: its peak memory is its own."""
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import lora_step as L; print('RUN_JSON' + json.dumps(L.{kind}(**{kw!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RUN_JSON"):
            return json.loads(line[len("RUN_JSON"):])
    return {"error": (proc.stdout[-500:] + proc.stderr[-2000:])}


def fusion(rows: int = 8192, dim: int = 4096, rank: int = 16, steps: int = 20) -> dict:
    """One adapted projection on the 8B shape, frozen bf16 W, gradients for x, A and B: the
    A matmul apart (x @ W + s (x @ A) @ B) against fused into the base one (x @ [W | A], split)."""
    import jax
    import jax.numpy as jnp
    res = {}
    ffn = dim * 7 // 2  # 14336 for the 8B shape's 4096
    for name, out in (("wq", dim), ("wk", dim // 4), ("w1", ffn), ("w2", dim)):
        d = ffn if name == "w2" else dim
        k = jax.random.split(jax.random.PRNGKey(0), 4)
        x = jax.random.normal(k[0], (rows, d), jnp.bfloat16)
        w = (jax.random.normal(k[1], (d, out)) * 0.02).astype(jnp.bfloat16)
        a = (jax.random.normal(k[2], (d, rank)) * 0.02).astype(jnp.bfloat16)
        b = (jax.random.normal(k[3], (rank, out)) * 0.02).astype(jnp.bfloat16)

        def apart(x, a, b):
            return x @ w + 2.0 * ((x @ a) @ b)

        def fused(x, a, b):
            ya = x @ jnp.concatenate([w, a], axis=1)  # one matmul; A (trainable) is joined to W every step
            return ya[:, :out] + 2.0 * (ya[:, out:] @ b)

        row = {}
        for label, f in (("apart", apart), ("fused", fused)):
            g = jax.jit(jax.grad(lambda x, a, b, f=f: jnp.sum(f(x, a, b).astype(jnp.float32) ** 2), (0, 1, 2)))
            jax.block_until_ready(g(x, a, b))
            t0 = time.perf_counter()
            for _ in range(steps):
                r = g(x, a, b)
            jax.block_until_ready(r)
            row[label + "_ms"] = round((time.perf_counter() - t0) / steps * 1e3, 3)
        row["fused_over_apart"] = round(row["fused_ms"] / row["apart_ms"], 3)
        res[name] = row
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--peer-runs", default="lora,sft", help="which peers run: lora (transformers + peft, 8B) "
                   "and/or sft (transformers + torch, 1.1B)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, no peer")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lora-remat", default="attention",
                   help="remat policies of our LoRA runs (comma list; POLICY:nofuse keeps w1, w3 apart)")
    p.add_argument("--sft-remat", default="dots_flash",
                   help="remat policies of our full-SFT runs (comma list; POLICY:fp8 runs the layers' matmuls in "
                        "FP8, POLICY:bf16 holds params and AdamW state in bf16 as the peer does; both: POLICY:fp8:bf16)")
    p.add_argument("--fusion", action="store_true", help="also time the LoRA A matmul fused into the base one")
    args = p.parse_args()
    res = {}
    if args.cpu_smoke:
        import jax
        res["device"] = jax.devices()[0].platform
        res["lora_tiny"] = ours("tiny", 4, 2, 64, 2, "attention")
        res["sft_tiny"] = in_subprocess("ours", name="tiny", lora_rank=0, batch=2, seq=64, steps=2, remat="none")
        res["fusion_tiny"] = fusion(rows=64, dim=64, rank=4, steps=2)
    else:
        if not args.no_peer:
            peers = set(args.peer_runs.split(","))
            if peers - {"lora", "sft"}:
                p.error(f"--peer-runs {args.peer_runs!r}: lora and/or sft")
            if "lora" in peers:
                res["peer"] = peer()
            if "sft" in peers:
                res["sft_peer"] = sft_peer()
        for variant in filter(None, args.lora_remat.split(",")):  # "POLICY" or "POLICY:nofuse" (w1, w3 apart)
            remat, _, fuse = variant.partition(":")
            res[f"lora_8b_b4_s2048_{variant}"] = in_subprocess("ours", name="8b", lora_rank=16, batch=4, seq=2048,
                                                               steps=args.steps, remat=remat, fuse=fuse != "nofuse")
        for variant in filter(None, args.sft_remat.split(",")):
            remat, *opts = variant.split(":")
            if set(opts) - {"fp8", "bf16"}:
                p.error(f"--sft-remat {variant!r}: options after POLICY are fp8 and/or bf16, got {opts}")
            res[f"sft_1b_b8_s2048_{variant}"] = in_subprocess(
                "ours", name="1b", lora_rank=0, batch=8, seq=2048, steps=args.steps, remat=remat,
                precision="fp8" if "fp8" in opts else "bf16", param_dtype="bfloat16" if "bf16" in opts else "float32")
        if args.fusion:
            res["fusion"] = in_subprocess("fusion")
        import jax
        res["device"] = jax.devices()[0].device_kind
    with open(os.path.join(os.environ.get("OUT", "."), "lora_step.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
