"""Decode speed of `llama_jax.inference.generate` against transformers' generate, on one GPU.

LLaMA-7B-shaped random bf16 weights, batch 1 and 16, greedy, 128 new tokens after a
16-token prompt (no early stop). Timing copies /work/shared/peers/hf_torch_h200.py: two
warm-up calls, then one timed call of the whole generate (prefill included). Ours runs
twice: `jax_b*` with the stored (stacked) params, which generate prepares (per layer,
fused) on each call (one copy of the weights), and `jax_split_b*` with `decode.prepare(params)`
made once beforehand (the serving setup; the same compiled loop). The HBM
roofline: bytes that must be read per step (every weight but the embedding table, plus
the live KV cache, averaged over the steps) / copy bandwidth measured here with a large
device-to-device copy. The peer (transformers, static and dynamic cache) runs first, in a
subprocess, so the two frameworks never share GPU memory.

    python benchmarks/decode.py                         # H200: 7B, batch 1 and 16, with the peer
    python benchmarks/decode.py --preset tiny --cpu-smoke   # checks the script on a CPU
Writes $OUT/decode.json (or ./decode.json) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from llama_jax.interop.hf_config import hf_config_of

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-7b")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--cpu-smoke", action="store_true", help="run on the CPU (tiny shapes only)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ------------------------------------------------------------------ the peer (torch only)

def peer(args) -> dict:
    """transformers LlamaForCausalLM.generate, static and dynamic cache, timed as the peer script does."""
    import torch
    import transformers
    from llama_jax.config import ModelConfig
    dev = "cpu" if args.cpu_smoke else "cuda"
    sync = (lambda: None) if args.cpu_smoke else torch.cuda.synchronize
    cfg = transformers.LlamaConfig(**hf_config_of(ModelConfig.preset(args.preset)), attn_implementation="sdpa")
    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    for static in (True, False):
        for b in map(int, args.batches.split(",")):
            name = f"hf_{'static' if static else 'dynamic'}_b{b}"
            try:
                torch.manual_seed(0)
                with torch.device(dev):
                    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
                prompt = torch.randint(0, cfg.vocab_size, (b, args.prompt_len), device=dev)
                kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                          attention_mask=torch.ones_like(prompt), pad_token_id=0)
                if static:
                    kw["cache_implementation"] = "static"
                with torch.no_grad():
                    t0 = time.time()
                    model.generate(prompt, **kw); model.generate(prompt, **kw)
                    sync(); warm = time.time() - t0
                    t0 = time.time()
                    model.generate(prompt, **kw)
                    sync(); dt = time.time() - t0
                out[name] = {"seconds": dt, "warmup_s": round(warm, 1)}
                del model
                if not args.cpu_smoke:
                    torch.cuda.empty_cache()
            except Exception as e:  # record and go on, as the peer script does
                out[name] = {"error": repr(e)[:300]}
            print(name, out[name], file=sys.stderr, flush=True)
    return out


def run_peer(args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--peer-only", "--preset", args.preset, "--batches",
           args.batches, "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    cmd += ["--cpu-smoke"] if args.cpu_smoke else []
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"peer subprocess failed (exit {r.returncode})"}


# ------------------------------------------------------------------ ours (jax)

def copy_bandwidth(jax, jnp, n_bytes: int) -> float:
    """Bytes/s of a large on-device copy (read + write counted), best of 10."""
    x = jnp.zeros((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)  # elementwise: one read and one write per element
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def step_bytes(cfg, batch: int, prompt_len: int, new: int) -> dict:
    """Bytes one decode step must read: weights but the embedding table, the live KV cache."""
    itemsize = 2  # bf16 weights and cache
    weights = (cfg.num_params() - cfg.vocab_size * cfg.dim) * itemsize
    live = prompt_len + new / 2  # mean number of cached positions over the steps
    kv = 2 * cfg.n_layers * batch * live * cfg.kv_heads * cfg.head_dim * itemsize
    return {"weights": weights, "kv_cache": kv}


def ours(args) -> dict:
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    import numpy as np
    from llama_jax import Llama, ModelConfig, RunOptions, generate
    from llama_jax.inference.decode import prepare
    out = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind)}
    bw = copy_bandwidth(jax, jnp, (64 << 20) if args.cpu_smoke else (4 << 30))
    out["copy_bandwidth_TBps"] = bw / 1e12
    cfg = ModelConfig.preset(args.preset)
    run = RunOptions(dtype="bfloat16", param_dtype="bfloat16")
    init = jax.jit(lambda k: nn.unbox(Llama(cfg, run).init(k, jnp.ones((1, 8), jnp.int32))["params"]))
    params = init(jax.random.PRNGKey(0))
    split = jax.jit(prepare)(params)
    for b in map(int, args.batches.split(",")):
        prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, args.prompt_len)).tolist()
        for name, p in ((f"jax_b{b}", params), (f"jax_split_b{b}", split)):
            call = lambda: generate(cfg, p, prompts, args.new_tokens, stop_ids=(), run=run)  # noqa: E731
            t0 = time.time()
            first = call(); call()
            warm = time.time() - t0
            t0 = time.time()
            res = call()  # returns host lists: the time includes the device's work
            dt = time.time() - t0
            assert all(len(r) == args.new_tokens for r in res) and res == first
            need = step_bytes(cfg, b, args.prompt_len, args.new_tokens)
            out[name] = {"seconds": dt, "warmup_s": round(warm, 1), "bytes_per_step": need}
            print(name, out[name], file=sys.stderr, flush=True)
    return out


def table(args, mine: dict, theirs: dict) -> list[dict]:
    from llama_jax import ModelConfig
    cfg = ModelConfig.preset(args.preset)
    bw, rows = mine["copy_bandwidth_TBps"] * 1e12, []
    for b in map(int, args.batches.split(",")):
        need = step_bytes(cfg, b, args.prompt_len, args.new_tokens)
        floor_ms = 1e3 * (need["weights"] + need["kv_cache"]) / bw
        for name, src in ((f"jax_b{b}", mine), (f"jax_split_b{b}", mine), (f"hf_static_b{b}", theirs),
                          (f"hf_dynamic_b{b}", theirs)):
            r = src.get(name, {})
            if "seconds" not in r:
                rows.append({"run": name, "error": r.get("error", "not run")})
                continue
            ms = 1e3 * r["seconds"] / args.new_tokens
            rows.append({"run": name, "batch": b, "tokens_per_s": round(b * args.new_tokens / r["seconds"], 1),
                         "ms_per_step": round(ms, 3), "roofline_ms_per_step": round(floor_ms, 3),
                         "roofline_share": round(floor_ms / ms, 3)})
    return rows


def main():
    args = parse()
    if args.peer_only:
        print(json.dumps(peer(args)))
        return
    if args.cpu_smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    theirs = {} if args.no_peer else run_peer(args)  # first: the GPU is still free of JAX
    mine = ours(args)
    rows = table(args, mine, theirs)
    result = {"args": vars(args), "jax": mine, "peer": theirs, "table": rows}
    path = os.path.join(os.environ.get("OUT", "."), "decode.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\ncopy bandwidth {mine['copy_bandwidth_TBps']:.2f} TB/s on {mine['device']}; {path}")
    print(f"{'run':<18}{'tok/s':>10}{'ms/step':>10}{'floor ms':>10}{'roofline':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['run']:<18}  {r['error'][:80]}")
        else:
            print(f"{r['run']:<18}{r['tokens_per_s']:>10}{r['ms_per_step']:>10}{r['roofline_ms_per_step']:>10}"
                  f"{r['roofline_share']:>10.1%}")


if __name__ == "__main__":
    main()
