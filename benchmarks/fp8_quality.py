"""FP8 training quality (issue 22): the same run in bf16 and in FP8, loss curves side by side.

The LLaMA-1.1B shape of benchmarks/train_step.py ("1b") trained by the trainer itself
(llama_jax.train.loop.train, what train.py runs) on the embedded default corpus (Python's
stdlib, train.py's default source), twice: `run.matmul_precision` bf16, then fp8. Same seed,
same tokenizer (trained once, by the first run, then passed to the second), same data order,
same schedule. Loss logged every 10 steps. The goal: FP8 within 1% of bf16 at every logged
step after warmup.

    python benchmarks/fp8_quality.py                                  # one H200, ~5 min
    python benchmarks/fp8_quality.py --shape tiny --steps 20 --batch 8 --seq 64   # CPU smoke

Sizes: 500 steps of 8 x 2048 tokens (16k tokens a step, ~0.25 s at ~65k tokens/s: ~2 min a
run), bf16 compute, float32 master params and AdamW state, warmup 50 steps. Writes
$OUT/fp8_quality.json (both curves, the table, the largest relative difference after
warmup), $OUT/fp8_quality.png (drawn as train/plot.py draws, no plotting library: loss curves
above, fp8 / bf16 - 1 in percent below, legends in plot.py's font: "loss 16", "loss 8") and
prints the table. The workdirs (a checkpoint at the last step) go under --workdir.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Legends in plot.py's small font (digits and "aeilnoprstv"): "loss 16" is bf16, "loss 8" FP8,
# "rel 8 vs 16" is fp8 / bf16 - 1 in percent.
LABELS = {"bf16": "loss 16", "fp8": "loss 8", "diff": "rel 8 vs 16"}
COLORS = {LABELS["bf16"]: (31, 119, 180), LABELS["fp8"]: (255, 127, 14), LABELS["diff"]: (44, 160, 44)}


def config(args, precision: str, tokenizer: str):
    """train.py's default job (base_config: the stdlib corpus) at the benchmark's shape."""
    import train_step
    from llama_jax.train.config import base_config, model_dict, run_dict
    c = base_config()
    shape = train_step.shape(args.shape).to_dict()
    shape.pop("generation", None)
    c.model = model_dict("tiny", **{k: v for k, v in shape.items() if v is not None})
    c.steps, c.log_every, c.seed = args.steps, args.log_every, args.seed
    c.eval_every, c.eval_batches = 0, 0
    c.checkpoint_every, c.keep_checkpoints = args.steps, 1  # the trainer saves the last step anyway
    c.batch_size, c.seq_len = args.batch, args.seq
    gpu = args.shape != "tiny"
    c.run = run_dict(dtype="bfloat16" if gpu else "float32", param_dtype="float32",
                     remat_policy="dots_flash" if gpu else "none", layer_loop="unrolled", fuse_gate_up=gpu,
                     matmul_precision=precision)
    c.optimizer.warmup_steps = args.warmup
    c.optimizer.total_steps = args.steps
    c.data.tokenizer = tokenizer
    return c


def curve(workdir: str) -> dict[int, float]:
    from llama_jax.train.plot import read_metrics
    return {int(r["step"]): float(r["loss"]) for r in read_metrics(workdir) if "loss" in r}


def table(curves: dict, warmup: int) -> list[dict]:
    """Per logged step after warmup: both losses and fp8's relative difference from bf16."""
    steps = sorted(s for s in curves["bf16"] if s > warmup and s in curves["fp8"])
    return [{"step": s, "bf16": curves["bf16"][s], "fp8": curves["fp8"][s],
             "rel_diff": curves["fp8"][s] / curves["bf16"][s] - 1.0} for s in steps]


def draw(curves: dict, rows: list[dict], path: str) -> None:
    """Loss curves above, the relative difference (%) below, as train/plot.py draws its figure."""
    from llama_jax.train import plot
    img = np.full((plot.HEIGHT, plot.WIDTH, 3), 255, np.uint8)
    series = {LABELS[k]: (np.array(sorted(v), float), np.array([v[s] for s in sorted(v)], float)) for k, v in curves.items()}
    x_range = (0.0, float(max(max(v) for v in curves.values())))
    panel_h = (plot.HEIGHT - plot.TOP - plot.GAP - plot.BOTTOM) * 2 // 3
    saved = dict(plot.COLORS)
    plot.COLORS.update(COLORS)  # plot.py colours its series by name
    try:
        plot._panel(img, (plot.LEFT, plot.TOP, plot.WIDTH - plot.RIGHT, plot.TOP + panel_h), x_range, series)
        if rows:
            diff = (np.array([r["step"] for r in rows], float), 100 * np.array([r["rel_diff"] for r in rows]))
            plot._panel(img, (plot.LEFT, plot.TOP + panel_h + plot.GAP, plot.WIDTH - plot.RIGHT,
                              plot.HEIGHT - plot.BOTTOM), x_range, {LABELS["diff"]: diff})
    finally:
        plot.COLORS.clear()
        plot.COLORS.update(saved)
    plot._text(img, plot.WIDTH // 2 - 16, plot.HEIGHT - 22, "step")
    with open(path, "wb") as f:
        f.write(plot.png_bytes(img))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b", help="1b (LLaMA-1.1B, train_step.py's) or tiny (CPU smoke)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8, help="global rows a step")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=50, help="optimizer warmup steps; the table starts after")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="", help="default: $OUT/fp8_quality_runs (removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the workdirs (checkpoints)")
    args = ap.parse_args(argv)
    from llama_jax.train import loop as trainer
    out_dir = os.environ.get("OUT", ".")
    base = args.workdir or os.path.join(out_dir, "fp8_quality_runs")
    curves, seconds, tokenizer = {}, {}, ""
    for precision in ("bf16", "fp8"):
        workdir = os.path.join(base, precision)
        t0 = time.time()
        trainer.train(config(args, precision, tokenizer), workdir)
        seconds[precision] = round(time.time() - t0, 1)
        tokenizer = tokenizer or os.path.join(base, "bf16", "tokenizer.model")  # the bf16 run trained it
        curves[precision] = curve(workdir)
    if not args.keep and not args.workdir:
        shutil.rmtree(base, ignore_errors=True)
    rows = table(curves, args.warmup)
    worst = max((abs(r["rel_diff"]) for r in rows), default=float("nan"))
    res = {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "seconds": seconds,
           "curves": {k: [[s, v[s]] for s in sorted(v)] for k, v in curves.items()}, "table": rows,
           "max_abs_rel_diff_after_warmup": worst, "within_1pct": bool(worst <= 0.01)}
    import jax
    res["jax"], res["device"] = jax.__version__, jax.devices()[0].device_kind
    with open(os.path.join(out_dir, "fp8_quality.json"), "w") as f:
        json.dump(res, f, indent=1)
    draw(curves, rows, os.path.join(out_dir, "fp8_quality.png"))
    print(f"{'step':>6s} {'bf16':>9s} {'fp8':>9s} {'fp8/bf16-1':>11s}")
    for r in rows:
        print(f"{r['step']:6d} {r['bf16']:9.4f} {r['fp8']:9.4f} {100 * r['rel_diff']:10.3f}%")
    print(f"max |fp8/bf16 - 1| after warmup: {100 * worst:.3f}% (goal: 1%); seconds {seconds}")


if __name__ == "__main__":
    main()
