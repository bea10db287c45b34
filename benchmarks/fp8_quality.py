"""FP8 training quality (issue 22): the same run in bf16 and in FP8, loss curves side by side.

The LLaMA-1.1B shape of benchmarks/train_step.py ("1b") trained by the trainer itself
(llama_jax.train.loop.train, what train.py runs) on the embedded default corpus (Python's
stdlib, train.py's default source), twice: `run.matmul_precision` bf16, then fp8. Same seed,
same tokenizer (trained once, by the first run, then passed to the second), same data order,
same schedule. Loss logged every 10 steps (--log-every): the step's own loss ("loss") and the
mean over the steps since the previous log ("loss_mean", train.py's smoothed figure); the
table compares both. The goal: FP8 within 1% of bf16 at every logged step after warmup.

`--runs` picks the runs (the first is the reference the others are compared with):
  bf16          RunOptions.matmul_precision=bf16
  fp8           fp8, current scaling, e5m2 gradients (the FP8 defaults)
  fp8_e4m3      fp8 with fp8_grad_format=e4m3 (gradients in e4m3 too)
  fp8_delayed   fp8 with fp8_scaling=delayed
  bf16_unfused  bf16 with fuse_gate_up=False: the same arithmetic in another summation order and
                kernels, so its distance from bf16 is the noise floor of any change of rounding

    python benchmarks/fp8_quality.py                                  # one H200, ~5 min
    python benchmarks/fp8_quality.py --runs bf16,fp8,fp8_e4m3         # ~9 min
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
from cli_help import DocstringHelp  # noqa: E402
# Legends in plot.py's small font (digits and "aeilnoprstv"): "loss 16" is bf16, "loss 8" FP8,
# "rel 8 vs 16" is the second run / the first - 1 in percent.
LABELS = {"bf16": "loss 16", "fp8": "loss 8", "fp8_e4m3": "loss 8 e4", "fp8_delayed": "loss 8 late",
          "bf16_unfused": "loss 16 v2"}
PALETTE = [(31, 119, 180), (255, 127, 14), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
DIFF_LABEL = "rel 8 vs 16"  # the second run / the first - 1, in percent
COLORS = {**{label: PALETTE[i] for i, label in enumerate(LABELS.values())}, DIFF_LABEL: (44, 160, 44)}
RUNS = {"bf16": {"matmul_precision": "bf16"}, "fp8": {"matmul_precision": "fp8"},
        "fp8_e4m3": {"matmul_precision": "fp8", "fp8_grad_format": "e4m3"},
        "fp8_delayed": {"matmul_precision": "fp8", "fp8_scaling": "delayed"},
        "bf16_unfused": {"matmul_precision": "bf16", "fuse_gate_up": False}}


def config(args, name: str, tokenizer: str):
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
                     remat_policy="dots_flash" if gpu else "none", layer_loop="unrolled",
                     **{"fuse_gate_up": gpu, **RUNS[name]})
    c.optimizer.warmup_steps = args.warmup
    c.optimizer.total_steps = args.steps
    c.data.tokenizer = tokenizer
    return c


def curve(workdir: str, key: str = "loss") -> dict[int, float]:
    from llama_jax.train.plot import read_metrics
    return {int(r["step"]): float(r[key]) for r in read_metrics(workdir) if key in r}


def table(curves: dict, warmup: int, ref: str = "bf16", other: str = "fp8") -> list[dict]:
    """Per logged step after warmup: both losses and `other`'s relative difference from `ref`."""
    steps = sorted(s for s in curves[ref] if s > warmup and s in curves[other])
    return [{"step": s, ref: curves[ref][s], other: curves[other][s],
             "rel_diff": curves[other][s] / curves[ref][s] - 1.0} for s in steps]


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
                              plot.HEIGHT - plot.BOTTOM), x_range, {DIFF_LABEL: diff})
    finally:
        plot.COLORS.clear()
        plot.COLORS.update(saved)
    plot._text(img, plot.WIDTH // 2 - 16, plot.HEIGHT - 22, "step")
    with open(path, "wb") as f:
        f.write(plot.png_bytes(img))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=DocstringHelp)
    ap.add_argument("--shape", default="1b", help="1b (LLaMA-1.1B, train_step.py's) or tiny (CPU smoke)")
    ap.add_argument("--steps", type=int, default=500, help="optimizer steps a run")
    ap.add_argument("--batch", type=int, default=8, help="global rows a step")
    ap.add_argument("--seq", type=int, default=2048, help="tokens a row")
    ap.add_argument("--warmup", type=int, default=50, help="optimizer warmup steps; the table starts after")
    ap.add_argument("--log-every", type=int, default=10, help="steps between logged (compared) losses")
    ap.add_argument("--seed", type=int, default=0, help="parameters and data order, the same for every run")
    ap.add_argument("--workdir", default="", help="the runs' workdirs; default: $OUT/fp8_quality_runs (. without "
                    "$OUT), removed at the end unless --keep (a given --workdir is kept)")
    ap.add_argument("--keep", action="store_true", help="keep the workdirs (checkpoints)")
    ap.add_argument("--runs", default="bf16,fp8",
                    help=f"comma-separated, the first the reference (above): {', '.join(sorted(RUNS))}")
    ap.add_argument("--json", default="fp8_quality.json", help="results file under $OUT (the PNG beside it)")
    args = ap.parse_args(argv)
    runs = args.runs.split(",")
    if len(runs) < 2 or len(set(runs)) != len(runs) or not set(runs) <= set(RUNS):
        ap.error(f"--runs {args.runs!r}: two or more distinct runs of {sorted(RUNS)}")
    from llama_jax.train import loop as trainer
    out_dir = os.environ.get("OUT", ".")
    base = args.workdir or os.path.join(out_dir, "fp8_quality_runs")
    curves, means, seconds, tokenizer = {}, {}, {}, ""
    for name in runs:
        workdir = os.path.join(base, name)
        t0 = time.time()
        trainer.train(config(args, name, tokenizer), workdir)
        seconds[name] = round(time.time() - t0, 1)
        tokenizer = tokenizer or os.path.join(base, runs[0], "tokenizer.model")  # the first run trained it
        curves[name], means[name] = curve(workdir), curve(workdir, "loss_mean")
        print(f"{name}: {seconds[name]} s", flush=True)
        with open(os.path.join(out_dir, "partial_" + args.json), "w") as f:  # what is done, should a later run fail
            json.dump({"seconds": seconds, "curves": curves, "curves_loss_mean": means}, f)
    if not args.keep and not args.workdir:
        shutil.rmtree(base, ignore_errors=True)
    ref = runs[0]
    compared = {}
    for name in runs[1:]:
        rows, mean_rows = table(curves, args.warmup, ref, name), table(means, args.warmup, ref, name)
        worst = max((abs(r["rel_diff"]) for r in rows), default=float("nan"))
        worst_mean = max((abs(r["rel_diff"]) for r in mean_rows), default=float("nan"))
        compared[name] = {"table": rows, "table_loss_mean": mean_rows,
                          "max_abs_rel_diff_after_warmup": worst, "within_1pct": bool(worst <= 0.01),
                          "max_abs_rel_diff_loss_mean": worst_mean, "within_1pct_loss_mean": bool(worst_mean <= 0.01),
                          "mean_rel_diff": float(np.mean([r["rel_diff"] for r in rows])) if rows else float("nan")}
    res = {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "seconds": seconds, "reference": ref,
           "curves": {k: [[s, v[s]] for s in sorted(v)] for k, v in curves.items()},
           "curves_loss_mean": {k: [[s, v[s]] for s in sorted(v)] for k, v in means.items()}, "compared": compared}
    if "fp8" in compared and ref == "bf16":  # the issue's figure, at the top level as before
        res.update({k: compared["fp8"][k] for k in ("table", "max_abs_rel_diff_after_warmup", "within_1pct")})
    import jax
    res["jax"], res["device"] = jax.__version__, jax.devices()[0].device_kind
    path = os.path.join(out_dir, args.json)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    os.remove(os.path.join(out_dir, "partial_" + args.json))
    draw(curves, compared[runs[1]]["table"], os.path.splitext(path)[0] + ".png")
    print("\n".join(table_lines(compared, ref, args.log_every)))
    print(f"seconds {seconds}")


def table_lines(compared: dict, ref: str, log_every: int) -> list[str]:
    """The printed comparison: per logged step, the loss and the mean since the last log."""
    out, means = [], f"{log_every}-step means"
    for name, c in compared.items():
        out.append(f"\n{name} against {ref}: {'step':>6s} {ref:>9s} {name:>9s} {'rel':>8s} | {means} {'rel':>8s}")
        for r, m in zip(c["table"], c["table_loss_mean"]):
            out.append(f"{'':>{len(name) + len(ref) + 10}s}{r['step']:6d} {r[ref]:9.4f} {r[name]:9.4f} "
                       f"{100 * r['rel_diff']:7.3f}% | {100 * m['rel_diff']:7.3f}%")
        out.append(f"{name}: max |{name}/{ref} - 1| after warmup: {100 * c['max_abs_rel_diff_after_warmup']:.3f}% "
                   f"per step, {100 * c['max_abs_rel_diff_loss_mean']:.3f}% of {means}, mean "
                   f"{100 * c['mean_rel_diff']:.3f}% (goal: 1%)")
    return out


if __name__ == "__main__":
    main()
