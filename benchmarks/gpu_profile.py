"""GPU kernel time by kind, from a jax.profiler trace of a few calls of a jitted function.

Used by train_step.py --profile: answers "how much of a step is matmuls, attention,
elementwise fusions, copies" without TensorBoard (reads the Perfetto JSON trace).
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import tempfile

import jax

_KINDS = (
    ("matmul", ("gemm", "nvjet", "cutlass", "cublas", "xmma")),
    ("attention", ("cudnn", "fmha", "flash", "sdpa")),
    ("collective", ("nccl", "all-gather", "all_gather", "reduce-scatter", "reduce_scatter", "all-reduce")),
    ("copy", ("memcpy", "memset", "copy")),
    ("fusion", ("fusion", "loop", "reduce", "convert", "transpose")),
)


def kind(name: str) -> str:
    low = name.lower()
    for k, needles in _KINDS:
        if any(n in low for n in needles):
            return k
    return "other"


def kernel_events(trace_dir: str) -> list[dict]:
    """The GPU kernel events (name, ts, dur in us) of a jax.profiler trace, by start time."""
    path = glob.glob(trace_dir + "/**/*perfetto_trace.json.gz", recursive=True)[0]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in e["args"].get("name", "")}
    return sorted((e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids), key=lambda e: e["ts"])


def profile(run_once, calls: int = 3, top: int = 15) -> dict:
    """Trace `calls` calls of `run_once()` (which must block until done); ms per call by kind."""
    tdir = tempfile.mkdtemp(prefix="trace_")
    jax.profiler.start_trace(tdir, create_perfetto_trace=True)
    for _ in range(calls):
        run_once()
    jax.profiler.stop_trace()
    by_name, count = collections.Counter(), collections.Counter()
    start, end = float("inf"), 0.0
    for e in kernel_events(tdir):
        by_name[e["name"]] += e["dur"] / 1e3 / calls
        count[e["name"]] += 1
        start, end = min(start, e["ts"]), max(end, e["ts"] + e["dur"])
    by_kind = collections.Counter()
    for name, ms in by_name.items():
        by_kind[kind(name)] += ms
    return {"ms_per_call_by_kind": {k: round(v, 1) for k, v in by_kind.most_common()},
            "gpu_ms_per_call": round(sum(by_name.values()), 1),
            # first kernel's start to last kernel's end, per call: busy time plus idle gaps
            "span_ms_per_call": round((end - start) / 1e3 / calls, 1) if count else 0.0,
            "top_kernels": [(round(ms, 2), count[n] // calls, n[:100]) for n, ms in by_name.most_common(top)]}
