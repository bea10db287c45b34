"""Fine-tuning speed: LoRA (rank 16, alpha 32, all seven projections, frozen bf16 base) on
the Llama-3.1-8B shape, and full SFT (float32 master params, AdamW) on the 1.1B shape of
benchmarks/train_step.py; tokens/s and peak memory, one GPU, bf16 compute.
Peer: transformers + peft (eager and torch.compile), the vendored peers/hf_peft_lora.py (from
/work/shared/peers/), run first in a subprocess so the frameworks never share GPU memory.
The full-SFT peer is benchmarks/train_step.py's (the same step: a loss mask changes no FLOP).

    python benchmarks/lora_step.py                 # one H200: LoRA 8B b4 x 2048 + SFT 1.1B b8 x 2048, peer
    python benchmarks/lora_step.py --no-peer
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


def ours(name: str, lora_rank: int, batch: int, seq: int, steps: int, remat: str) -> dict:
    import jax
    import jax.numpy as jnp
    from llama_jax import Llama, RunOptions, lora as L, sharding
    from llama_jax.train import optim, state as train_state
    from train_step import random_batch, timed_steps
    cfg = _shape(name)
    lora = L.LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank, targets=ALL) if lora_rank else None
    run = RunOptions(dtype="bfloat16", param_dtype="float32", remat_policy=remat, layer_loop="unrolled",
                     fuse_gate_up=jax.default_backend() == "gpu")
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, no peer")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--remat", default="dots_flash", help="remat policy of our steps")
    args = p.parse_args()
    res = {}
    if args.cpu_smoke:
        import jax
        res["device"] = jax.devices()[0].platform
        res["lora_tiny"] = ours("tiny", 4, 2, 64, 2, "none")
        res["sft_tiny"] = ours("tiny", 0, 2, 64, 2, "none")
    else:
        if not args.no_peer:
            res["peer"] = peer()
        import jax
        res["device"] = jax.devices()[0].device_kind
        res["lora_8b_b4_s2048"] = ours("8b", 16, 4, 2048, args.steps, args.remat)
        res["sft_1b_b8_s2048"] = ours("1b", 0, 8, 2048, args.steps, args.remat)
    with open(os.path.join(os.environ.get("OUT", "."), "lora_step.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
