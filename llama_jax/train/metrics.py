"""Training FLOPs, MFU, and the metric writers (metrics.jsonl + TensorBoard).

FLOPs per trained token (forward + backward = 3 x forward, 2 FLOPs a multiply-add):
    6 * N  +  6 * L * D * T
N: parameters without the input embedding (a lookup, no matmul; the output projection
counts). The second term is causal attention: QK^T and AV cost 2 * 2 * T * D per token
per layer forward, halved by the causal mask, times 3 for the backward pass.
Recomputation under remat is not counted (MFU counts model FLOPs, not hardware FLOPs).
"""
from __future__ import annotations

import json
import math
import os
import time

from llama_jax.config import ModelConfig

# Dense bf16 peak TFLOP/s per device, by jax `device_kind` substring (first match wins).
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0),
    ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5", 459.0), ("TPU v4", 275.0),
)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding params + 6 x layers x dim x seq_len."""
    return 6.0 * config.num_params(embeddings=False) + 6.0 * config.n_layers * config.dim * seq_len


def peak_tflops(device_kind: str, configured: float = 0.0) -> float:
    """Per-device peak: the configured value, else the table's, else 0 (unknown)."""
    if configured > 0:
        return configured
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops
    return 0.0


def mfu(tokens_per_s: float, flops_per_tok: float, n_devices: int, peak: float) -> float:
    """Model FLOPs utilisation in [0, 1]; NaN when the peak is unknown."""
    if peak <= 0:
        return math.nan
    return tokens_per_s * flops_per_tok / (n_devices * peak * 1e12)


class MetricsWriter:
    """Appends one JSON object per logged step to DIR/metrics.jsonl and mirrors scalars to
    TensorBoard (DIR/tensorboard). Inactive (writes nothing) on processes other than 0.

    `from_step`: the step the run starts from (a resume's restored step). Rows of later
    steps, logged by a run that died before checkpointing them, are dropped from
    metrics.jsonl and hidden in TensorBoard (its purge_step), so no step appears twice."""

    def __init__(self, workdir: str, active: bool = True, from_step: int = 0):
        self.active = active
        self._tb = None
        if not active:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        _truncate_after(path, from_step)
        self._jsonl = open(path, "a")
        from tensorboardX import SummaryWriter
        # The suffix keeps two runs started within one second from sharing (overwriting) a file.
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=from_step + 1,
                                 filename_suffix=f".{os.getpid()}.{time.time_ns() % 10**9:09d}")

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            self._tb.close()


def _truncate_after(path: str, step: int) -> None:
    """Keeps the rows of steps <= `step` (atomically); a line cut by a kill is dropped."""
    if not os.path.isfile(path):
        return
    keep, changed = [], False
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                ok = line.endswith("\n") and row["step"] <= step
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok:
                keep.append(line)
            changed |= not ok
    if changed:
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def _plain(v):
    v = v.item() if hasattr(v, "item") else v
    # JSON has no NaN: a non-finite value is written as null.
    return None if isinstance(v, float) and not math.isfinite(v) else v
