"""What a training run says about itself: the start-of-run summary, WORKDIR/config.json,
the sample (WORKDIR/samples/step_N.txt and TensorBoard text), the smoothed final train
loss, and WORKDIR/plot.png at the end. Process 0 writes; the others only compute.

The summary goes to the `llama_jax.train.report` logger (train.py prints it cleanly above
the progress bar); nothing here prints.
"""
from __future__ import annotations

import json
import logging
import math
import os

import jax

from llama_jax import lora as lora_lib
from llama_jax.checkpoint import CHECKPOINTS_DIR, checkpoints_dir
from llama_jax.runtime import MatmulPrecision, RunOptions
from llama_jax.train import config as train_config
from llama_jax.train.plot import plot_run, read_metrics

log = logging.getLogger(__name__)

TAIL_FRACTION = 0.1  # the final train loss averages the logged losses of the last 10% of steps


def start(run) -> None:
    """Writes WORKDIR/config.json and logs the start-of-run summary."""
    if jax.process_index() == 0:
        write_config(run)
    for line in summary_lines(run):
        log.info("%s", line)


def resolved_config(run) -> dict:
    """The run's config as used: the effective model (a resumed or fine-tuned run keeps its
    checkpoint's architecture), the tokenizer file and the input shard count."""
    d = run.cfg.to_dict()
    d["model"] = {"preset": d["model"].get("preset"), **run.model.to_dict()}
    d["data"]["tokenizer"] = os.path.abspath(getattr(run.tokenizer, "path", "") or d["data"]["tokenizer"])
    d["data"]["shards"] = run.input.shard_count
    return d


def write_config(run) -> str:
    path = os.path.join(run.workdir, "config.json")
    os.makedirs(run.workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(resolved_config(run), f, indent=2, default=str)
    os.replace(path + ".tmp", path)
    return path


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _sources(sources) -> str:
    """Configured sources (dicts) in the spec syntax of `--config.data.sources`."""
    from llama_jax.data import SourceConfig
    from llama_jax.data.spec import to_spec
    parsed = [SourceConfig(**dict(s)) for s in sources]
    return ",".join(to_spec(s, with_weight=len(parsed) > 1) for s in parsed) or "none"


def summary_lines(run) -> list[str]:
    """Parameters, tokens per step, devices, mesh, data, where the output goes, fresh or resumed."""
    cfg, m = run.cfg, run.model
    if run.start_step:
        how = f"resuming from {os.path.join(run.workdir, CHECKPOINTS_DIR, str(run.start_step))}"
    elif cfg.init_from:
        how = f"fine-tuning from {cfg.init_from}"
    else:
        how = f"fresh start (seed {cfg.seed})"
    per_step = cfg.batch_size * cfg.seq_len
    devices = jax.devices()
    mesh = " x ".join(f"{name} {size}" for name, size in run.mesh.shape.items())
    ckpt = checkpoints_dir(run.workdir)
    kv = f", {m.n_kv_heads} kv" if m.n_kv_heads and m.n_kv_heads != m.n_heads else ""
    lines = [
        f"run: {how}; steps {run.start_step} -> {cfg.steps}",
        f"model: {_count(m.num_params())} parameters ({_count(m.num_params(embeddings=False))} without the "
        f"embedding): {m.n_layers} layers, dim {m.dim}, {m.n_heads} heads{kv}, vocab {m.vocab_size}; "
        f"compute {cfg.run.dtype}, params {cfg.run.param_dtype}{_matmuls(cfg)}",
        f"tokens per step: {cfg.batch_size} x {cfg.seq_len} = {per_step:,}"
        + (f" in {cfg.micro_batches} micro-batches" if cfg.micro_batches > 1 else "")
        + f"; {_count(per_step * (cfg.steps - run.start_step))} tokens to go",
        f"devices: {len(devices)} x {devices[0].device_kind} ({jax.process_count()} process(es)); mesh {mesh}",
        f"data: {_sources(cfg.data.sources)}; eval: {_sources(cfg.eval_data.sources)}; "
        f"tokenizer {getattr(run.tokenizer, 'path', '')}",
        f"output: {os.path.abspath(run.workdir)} (config.json, metrics.jsonl, tensorboard/, plot.png); "
        f"checkpoints in {ckpt} every {cfg.checkpoint_every} steps, the last {cfg.keep_checkpoints} kept",
    ]
    lora = train_config.lora_config(cfg)
    if lora is not None:  # the params above are the frozen base, in lora.base_dtype, not params_dtype
        lines.insert(2, f"LoRA: rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g} on "
                        f"{','.join(lora.targets)}: {_count(lora_lib.num_params(m, lora))} adapter parameters "
                        f"trained ({lora_lib.num_params(m, lora) / m.num_params():.2%}); the base frozen, held in "
                        f"{cfg.lora.base_dtype}")
    unused = _unused_fp8(cfg)
    if unused:
        lines.insert(2, f"note: {unused} set, but the weight matmuls run in the compute dtype "
                        "(FP8 needs --config.run.matmul_precision=fp8): no effect")
    return lines


def _matmuls(cfg) -> str:
    """How the layers' weight matmuls run, when not in the compute dtype."""
    r = train_config.run_options(cfg)
    if r.matmul_precision is not MatmulPrecision.FP8:
        return ""
    how = f"delayed scaling over {r.fp8_history} steps" if r.fp8_delayed else "current scaling"
    return f"; weight matmuls in FP8 ({how}, {r.fp8_grad_format.value} gradients)"


def _unused_fp8(cfg) -> str:
    """The FP8 keys given other values than their defaults in a run without FP8 matmuls."""
    r, default = train_config.run_options(cfg), RunOptions()
    if r.matmul_precision is MatmulPrecision.FP8:
        return ""
    keys = ("fp8_scaling", "fp8_history", "fp8_grad_format", "fp8_cast_kernel")
    return ", ".join(f"run.{k}={cfg.run[k]}" for k in keys if getattr(r, k) != getattr(default, k))


def train_loss_tail(rows: list[dict], last_step: int) -> tuple[float, int] | None:
    """(mean train loss over the last ~10% of the run's steps, the first step it covers):
    steadier than the mean since the last log. Each logged `loss_mean` covers the steps
    since the row before it, and is weighted by their number."""
    logged = [r for r in rows if r.get("loss_mean") is not None and r["step"] <= last_step]
    if not logged:
        return None
    cut = last_step - max(1, round(TAIL_FRACTION * last_step))
    first = next(i for i, r in enumerate(logged) if r["step"] > cut or r is logged[-1])
    start = logged[first - 1]["step"] if first else 0
    total = weight = 0.0
    for r in logged[first:]:
        total, weight = total + r["loss_mean"] * (r["step"] - start), weight + (r["step"] - start)
        start = r["step"]
    return total / weight, (logged[first - 1]["step"] if first else 0) + 1


def finish(run, out: dict) -> dict:
    """Writes the sample and the plot (process 0); adds the smoothed train loss to `out`."""
    rows = read_metrics(run.workdir)
    truncated = run.input.truncated_examples()
    if truncated:  # the first one was a warning naming its file:line; the count is said at the end
        out["truncated_examples"] = truncated
    tail = train_loss_tail(rows, out["step"])
    if tail is not None:
        out["train_loss"], out["train_loss_from_step"] = tail
    if jax.process_index() != 0:
        return out
    if out.get("sample") is not None:
        out["sample_path"] = write_sample(run.workdir, out["step"], out["sample"])
    try:
        out["plot_path"] = plot_run(run.workdir, rows=rows)
    except (OSError, ValueError) as e:  # a plot is never worth a failed run
        log.warning("no plot: %s", e)
    return out


def write_sample(workdir: str, step: int, text: str) -> str:
    """WORKDIR/samples/step_N.txt, and the text in TensorBoard under `sample` at `step`."""
    path = os.path.join(workdir, "samples", f"step_{step}.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")
    from tensorboardX import SummaryWriter
    with SummaryWriter(os.path.join(workdir, "tensorboard"), filename_suffix=".sample") as tb:
        # TensorBoard renders text as Markdown: a code block keeps indentation and newlines.
        tb.add_text("sample", "```\n" + text + "\n```", step)
    return path


def rounded(x: float | None, digits: int = 4) -> str:
    """A metric for people: 4 significant digits; "n/a" for none or NaN."""
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}g}"
