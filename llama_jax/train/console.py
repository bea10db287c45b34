"""train.py's terminal (imported by train.py only: the library logs, it never prints).

Phase and summary lines from the `llama_jax` loggers print on their own lines, stamped with
the seconds since start, above the progress bar (never into it); the bar starts at the first
logged step, so its rate and ETA count training steps, not tokenizer training or compilation.
The final lines round every number to 4 significant digits.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time

from tqdm import tqdm

from llama_jax.checkpoint import CHECKPOINTS_DIR
from llama_jax.train.report import rounded

BAR_KEYS = ("loss_mean", "lr", "eval_loss")


class Console(logging.Handler):
    """Owns stderr for a run: log lines, then the bar. `active=False` (processes other than
    0) shows warnings only and no bar."""

    def __init__(self, total_steps: int, active: bool = True):
        super().__init__(logging.INFO if active else logging.WARNING)
        self.total, self.active, self.bar = total_steps, active, None
        self.t0 = time.perf_counter()
        logger = logging.getLogger("llama_jax")
        logger.setLevel(self.level)
        logger.addHandler(self)
        logger.propagate = False  # absl's root handler would print them again, into the bar

    def emit(self, record: logging.LogRecord) -> None:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {level}{record.getMessage()}"
        tqdm.write(line, file=sys.stderr)  # above the bar when there is one
        sys.stderr.flush()

    def on_log(self, step: int, row: dict) -> None:
        if not self.active:
            return
        if self.bar is None:
            self.bar = tqdm(total=self.total, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.bar.n = step
        self.bar.set_postfix({k: rounded(row[k]) for k in BAR_KEYS if row.get(k) is not None})
        if step >= self.total:  # done: what follows (the sample, the plot) prints below it
            self.bar.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        logging.getLogger("llama_jax").removeHandler(self)


def final_lines(out: dict, workdir: str, stopped: bool = False) -> list[str]:
    """What a finished run prints: eval loss, the smoothed train loss, where things are."""
    head = f"step {out['step']}" + (" (stopped by signal)" if stopped else "")
    parts = []
    if out.get("eval_loss") is not None and math.isfinite(out["eval_loss"]):
        parts.append(f"eval loss {rounded(out['eval_loss'])}")
    if out.get("train_loss") is not None:
        parts.append(f"train loss {rounded(out['train_loss'])} (mean of steps "
                     f"{out['train_loss_from_step']}-{out['step']})")
    lines = [head + (": " + ", ".join(parts) if parts else "")]
    if out.get("truncated_examples"):
        lines.append(f"truncated: {out['truncated_examples']} fine-tuning examples longer than seq_len + 1 tokens "
                     "kept their last seq_len + 1 (their start cut, the answer's end kept; read ahead included)")
    lines.append(f"checkpoints: {os.path.join(workdir, CHECKPOINTS_DIR)}")
    if out.get("plot_path"):
        lines.append(f"plot: {out['plot_path']}")
    if "sample" in out:
        where = f" ({out['sample_path']})" if out.get("sample_path") else ""
        lines.append(f"sample{where}:\n{out['sample']}")
    return lines
