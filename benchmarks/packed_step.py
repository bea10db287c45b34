"""Packed rows at the speed of unpacked ones: the 1.1B train step three ways, then train.py.

(a) unpacked rows (no segment ids: cuDNN's plain causal kernel), (b) packed rows (documents
of random lengths, segment ids, positions restarting per document) through the dense-mask
kernel (`attend(max_segments=0)`: the [B,1,T,T] mask cuDNN reads as a bias), (c) the same
rows through cuDNN's packed layout (run lengths and offsets, llama_jax/attention.py),
unchecked as the model runs it (`RunOptions.packed_segments`; `--checked` adds (c) behind
attend's run-time `lax.cond` fallback). The step, shapes and timing are
benchmarks/train_step.py's (`ours`): only the batch and the attention kernel differ. Then
`train.py` on the real packed job (the stdlib corpus, its own 32000-piece tokenizer, the
same 1.1B shape and run options, `packed_segments` M: the packed kernel behind the host-side
guard), steady state from its metrics.jsonl: the mean of the logged rows covering the last
`--train-window` steps. It runs first, alone on the GPU (batch `--batch` on one device), as
train_step.py's peer does.

    python benchmarks/packed_step.py --checked  # one H200: about 3 minutes
    python benchmarks/packed_step.py --precision fp8 --variants packed_cudnn_thd  # FP8: unpacked, packed, train.py
    python benchmarks/packed_step.py --cpu-smoke  # tiny shapes on CPUs (tests/test_benchmarks.py)
Writes $OUT/packed_step.json (or ./packed_step.json) and prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from cli_help import DocstringHelp  # noqa: E402
import train_step  # noqa: E402  (its `ours`, `shape`, timing: one definition of the step)


def packed_rows(vocab: int, b: int, t: int, doc_len: tuple[int, int], seed: int = 0) -> dict:
    """b full rows of t tokens packed by data/packing.py's rule from documents of uniform
    random length in doc_len (numpy: tokens, targets, segment_ids, positions, loss_mask)."""
    import numpy as np
    from llama_jax.data.packing import pack_documents
    r = np.random.default_rng(seed)
    need = b * (t + 1) // max(1, (doc_len[0] + doc_len[1]) // 2) + 2 * b + 2
    docs = [r.integers(3, vocab, int(r.integers(doc_len[0], doc_len[1] + 1))) for _ in range(need)]
    rows = [row for row in pack_documents(docs, t, bos=1, eos=2) if (row["segment_ids"] > 0).all()][:b]
    assert len(rows) == b, "too few documents for full rows"
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def packed_batch_fn(rows: dict):
    """A stand-in for train_step.random_batch that places these packed rows instead."""
    def make(cfg, mesh, b, t):
        import jax
        from llama_jax.train import state as train_state
        bs = train_state.batch_sharding(mesh)
        return {k: jax.device_put(v, bs) for k, v in rows.items()}
    return make


@contextlib.contextmanager
def patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def step_runs(args, rows: dict) -> dict:
    """(a), (b), (c) through train_step.ours; the batch and the model's attend are swapped in."""
    from llama_jax import attention, model

    def attend(max_segments: int, checked: bool):  # the model's call, with this kernel choice
        return lambda *a, **kw: attention.attend(*a, **{**kw, "max_segments": max_segments, "checked": checked})
    variants = {
        "unpacked": (train_step.random_batch, model.attend),
        "packed_dense_mask": (packed_batch_fn(rows), attend(0, False)),
        "packed_cudnn_thd": (packed_batch_fn(rows), attend(args.max_segments, False)),
    }
    if args.checked:  # what the run-time fallback (lax.cond to the dense mask) costs
        variants["packed_cudnn_thd_checked"] = (packed_batch_fn(rows), attend(args.max_segments, True))
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",") or k == "unpacked"}
    out = {}
    for key, (batch_fn, attend_fn) in variants.items():
        try:
            with patched(train_step, "random_batch", batch_fn), patched(model, "attend", attend_fn):
                out[key] = train_step.ours(args.shape, args, precision=args.precision)
        except Exception as e:  # a failed variant is a result too; the others still run
            out[key] = {"error": repr(e)[:500]}
        print(key, json.dumps(out[key]), flush=True)
    base = out["unpacked"].get("tokens_per_s")
    for r in out.values():
        if base and "tokens_per_s" in r:
            r["ratio_to_unpacked"] = round(r["tokens_per_s"] / base, 4)
    return out


def train_py_command(args, workdir: str) -> list[str]:
    """train.py on the stdlib corpus with the benchmark's model shape and run options."""
    d = train_step.shape(args.shape).to_dict()
    d["n_kv_heads"] = d["n_kv_heads"] or d["n_heads"]  # None (MHA) would keep configs/tiny.py's value
    model = [f"--config.model.{k}={v}" for k, v in d.items() if v is not None and not isinstance(v, (dict, list))]
    run = {"dtype": "bfloat16", "remat_policy": args.remat or train_step.default_remat(args.shape, 1),
           "layer_loop": args.layer_loop, "fuse_gate_up": bool(args.fuse_gate_up), "attention_impl": args.attention,
           "packed_segments": args.max_segments, "matmul_precision": args.precision}
    return [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", workdir,
            # Far more steps than run, no eval, no checkpoint: the run is stopped once timed,
            # so neither a last-step eval nor a 17 GB save falls into (or after) the window.
            "--config.steps=100000", "--config.eval_every=0", "--config.checkpoint_every=100000",
            f"--config.log_every={args.train_log_every}", f"--config.batch_size={args.batch}",
            f"--config.seq_len={args.seq}", "--config.data.read_threads=2", "--config.data.prefetch_buffer=64",
            "--config.optimizer.warmup_steps=10", *model, *[f"--config.run.{k}={v}" for k, v in run.items()]]


def train_py_run(args) -> dict:
    """Run train.py until it logs step --train-steps, stop it, read its steady-state rows."""
    workdir = tempfile.mkdtemp(prefix="packed_step_train_")
    cmd = train_py_command(args, workdir)
    metrics = os.path.join(workdir, "metrics.jsonl")
    log_path = os.path.join(workdir, "train.log")
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rows = []
    try:
        while time.time() - t0 < args.train_timeout and proc.poll() is None:
            time.sleep(1.0)
            rows = _read_rows(metrics)
            if rows and rows[-1]["step"] >= args.train_steps:
                break
    finally:
        if proc.poll() is None:  # our own child and its session: it would run 100000 steps
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    first = args.train_steps - args.train_window
    window = [r for r in rows if first < r["step"] <= args.train_steps and r.get("tokens_per_s")]
    with open(log_path) as f:
        log_text = f.read()
    res = {"command": " ".join(cmd[1:]), "wall_s": round(time.time() - t0, 1), "logged_steps": [r["step"] for r in rows],
           # train/packed_guard.py's line: a batch did not fit the packed kernel (the dense step ran it)
           "dense_mask_batches_seen": "do not fit the packed attention kernel" in log_text}
    if not window:
        return {**res, "error": "no steady-state rows; train.py's log tail: " + log_text[-1500:]}
    tokens_per_step = args.batch * args.seq
    step_s = sum(tokens_per_step / r["tokens_per_s"] for r in window) / len(window)
    return {**res, "window_steps": [r["step"] for r in window], "step_s": round(step_s, 4),
            "tokens_per_s": round(tokens_per_step / step_s), "loss_last": window[-1].get("loss")}


def _read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


def row_stats(rows: dict, max_segments: int) -> dict:
    seg = rows["segment_ids"]
    runs = 1 + (seg[:, 1:] != seg[:, :-1]).sum(axis=1)
    return {"documents_per_row_mean": round(float(runs.mean()), 2), "documents_per_row_max": int(runs.max()),
            "max_segments": max_segments, "all_rows_fit": bool((runs <= max_segments).all())}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=DocstringHelp)
    ap.add_argument("--shape", default="1b", help="train_step.shape: 1b, 7b, tiny")
    ap.add_argument("--batch", type=int, default=8, help="rows a step")
    ap.add_argument("--seq", type=int, default=2048, help="tokens a row")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--doc-len", default="64,1024", help="document lengths, uniform in [lo, hi] tokens")
    ap.add_argument("--max-segments", type=int, default=0, help="packed kernel's runs per row, the step's and "
                    "train.py's packed_segments (0: attention.default_max_segments(seq), 16 at 2048)")
    ap.add_argument("--train-steps", type=int, default=40, help="train.py: stop after this step")
    ap.add_argument("--train-window", type=int, default=20, help="train.py: time the last this many steps")
    ap.add_argument("--train-log-every", type=int, default=10, help="train.py: steps between logged rows")
    ap.add_argument("--train-timeout", type=float, default=420.0, help="train.py: seconds before it is stopped")
    ap.add_argument("--no-train", action="store_true", help="skip the train.py run")
    ap.add_argument("--checked", action="store_true", help="also (c) behind attend's run-time lax.cond fallback "
                    "to the dense mask (the rows here all fit: it measures what that check costs)")
    ap.add_argument("--precision", default="bf16", help="bf16 or fp8 (RunOptions.matmul_precision, current "
                    "scaling), every variant and train.py")
    ap.add_argument("--variants", default="", help="comma-separated subset of packed_dense_mask, packed_cudnn_thd, "
                    "packed_cudnn_thd_checked (unpacked always runs); default all but the checked one")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, 2 steps, train.py for 4 steps")
    ap.add_argument("--json", default="packed_step.json", help="results file under $OUT (or .)")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.shape, args.batch, args.seq, args.steps, args.doc_len = "tiny", 2, 128, 2, "8,48"
        args.train_steps, args.train_window, args.train_log_every = 4, 2, 2
        # One CPU device and two plain matmuls: compiles dominate a smoke run (train.py inherits this).
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "").replace(
            "--xla_force_host_platform_device_count=8", "") + " --xla_force_host_platform_device_count=1").strip()
    # The fields train_step.ours reads, at train_step.py's defaults.
    args.remat, args.attention, args.layer_loop, args.fuse_gate_up = "", "auto", "unrolled", int(not args.cpu_smoke)
    args.hlo, args.profile, args.top, args.peak, args.fp8_history = "", False, 15, 989.0, 16
    from llama_jax.attention import default_max_segments  # (jax imported, not started: no GPU memory taken)
    args.max_segments = args.max_segments or (8 if args.cpu_smoke else default_max_segments(args.seq))
    return args


def main(argv=None):
    args = parse(argv)
    # train.py first, in its own process, before this one starts JAX: JAX takes most of the
    # GPU's memory once started, and would leave the subprocess too little.
    train = None if args.no_train else train_py_run(args)
    if train is not None:
        print("train_py", json.dumps(train), flush=True)
    import jax
    from llama_jax import attention
    cfg = train_step.shape(args.shape)
    lo, hi = (int(x) for x in args.doc_len.split(","))
    rows = packed_rows(cfg.vocab_size, args.batch * jax.device_count(), args.seq, (lo, hi))
    out = {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
           "device": jax.devices()[0].device_kind,
           "packed_kernel": attention.packed_supported(cfg.n_heads, cfg.n_kv_heads or cfg.n_heads),
           "rows": row_stats(rows, args.max_segments)}
    out.update(step_runs(args, rows))
    if train is not None:
        base = out["unpacked"].get("tokens_per_s")
        if base and "tokens_per_s" in train:
            train["ratio_to_unpacked"] = round(train["tokens_per_s"] / base, 4)
        out["train_py"] = train
    with open(os.path.join(os.environ.get("OUT", "."), args.json), "w") as f:
        json.dump(out, f, indent=1)
    print(f"\n{'run':24s} {'tok/s':>9s} {'ratio':>7s}  (packed kernel: {out['packed_kernel']}, {out['rows']})")
    for key in ("unpacked", "packed_dense_mask", "packed_cudnn_thd", "packed_cudnn_thd_checked", "train_py"):
        if key not in out:
            continue
        r = out.get(key, {})
        print(f"{key:24s} {r.get('tokens_per_s', 'n/a'):>9} {r.get('ratio_to_unpacked', ''):>7}  {r.get('error', '')[:200]}")


if __name__ == "__main__":
    main()
