"""Nothing lost, whatever happens to a run: kills at random points of checkpoint writes and
pruning resume exactly; a damaged newest step falls back to an intact one; a second run on
a workdir is refused while the first lives (and not after a kill -9); non-finite states
are never saved; bad settings fail before anything is written; no leftovers."""
import errno
import fcntl
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from llama_jax import checkpoint

from llama_jax.train import checks as train_checks

from llama_jax.train import config as train_config

from llama_jax.train import loop as trainer

from llama_jax.train import workdir_lock
from llama_jax.errors import InputError
from train_helpers import REPO, STEPS, as_flags, assert_same_losses, losses, tiny_config
from train_helpers import reference, tokenizer_path  # noqa: F401  (fixtures)


def _env() -> dict:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
                PYTHONPATH=REPO)


def _train(workdir, **overrides) -> subprocess.Popen:
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir), *as_flags(overrides)]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _logged_steps(workdir) -> list[int]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def _ckpt_dir(workdir) -> str:
    return os.path.join(str(workdir), "checkpoints")


def _kill_when(p, cond, timeout=240) -> bool:
    """SIGKILLs `p` as soon as cond() holds; False if the run ended first."""
    start = time.time()
    while p.poll() is None:
        if cond():
            p.kill()
            p.communicate(timeout=60)
            return True
        assert time.time() - start < timeout, "condition never met"
        time.sleep(0.001)
    return False


def _listing(workdir) -> list[str]:
    d = _ckpt_dir(workdir)
    return os.listdir(d) if os.path.isdir(d) else []


def test_kills_during_checkpoint_writes_and_pruning_resume_exactly(tmp_path, tokenizer_path, reference):
    # Every step is saved and every save prunes (keep 2): SIGKILL while a step is being
    # written (Orbax's temporary directory exists), right after a prune (a step renamed into
    # .deleted, not yet removed), and at a random moment; then run to the end.
    workdir = tmp_path / "run"
    over = {"data.tokenizer": tokenizer_path, "checkpoint_every": 1, "keep_checkpoints": 2, "mesh": (1, 8, 1)}
    def steps():
        return [int(n) for n in _listing(workdir) if n.isdigit()]
    def writing():
        return any("tmp" in n for n in _listing(workdir))
    def pruned():
        d = os.path.join(_ckpt_dir(workdir), ".deleted")
        return os.path.isdir(d) and bool(os.listdir(d))
    delay, seen = random.Random(os.getpid()).uniform(0.0, 1.0), {}
    def later():
        seen.setdefault("t", time.time())
        return time.time() - seen["t"] > delay
    kills = 0
    for event in (writing, pruned, later):
        before = set(steps())
        # Only once this run has saved a step of its own (startup leftovers do not count).
        kills += _kill_when(_train(workdir, **over), lambda: bool(set(steps()) - before) and event())
        assert not [n for n in _listing(workdir) if n.isdigit() and
                    not os.path.isdir(os.path.join(_ckpt_dir(workdir), n, "params"))], _listing(workdir)
    assert kills >= 2
    out = trainer.train(tiny_config(**over), str(workdir))
    assert out["step"] == STEPS
    assert_same_losses(losses(workdir), reference)
    logged = _logged_steps(workdir)
    assert logged == sorted(set(logged)) == list(range(1, STEPS + 1))  # no step twice
    assert sorted(steps()) == [STEPS - 1, STEPS]
    assert not os.listdir(os.path.join(_ckpt_dir(workdir), ".deleted"))


def test_damaged_newest_step_falls_back_to_an_intact_one(tmp_path, tokenizer_path, caplog):
    workdir = str(tmp_path)
    cfg = tiny_config(**{"data.tokenizer": tokenizer_path, "checkpoint_every": 2, "keep_checkpoints": 3})
    trainer.train(cfg, workdir)
    first = losses(workdir)
    ckpts = _ckpt_dir(workdir)
    # Step 6's optimizer state damaged (flipped bytes in its largest data file); step 2 half
    # deleted (as a kill while an older version pruned it).
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(ckpts, "6", "opt_state")) for f in fs]
    largest = max((f for f in files if os.sep + "d" + os.sep in f), key=os.path.getsize)
    data = bytearray(open(largest, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(largest, "wb").write(bytes(data))
    os.rename(os.path.join(ckpts, "2", "opt_state"), os.path.join(str(tmp_path), "gone"))
    with caplog.at_level(logging.WARNING):
        out = trainer.train(cfg, workdir)
    text = caplog.text
    assert "opt_state" in text and "is damaged" in text and "resuming from step 4 instead" in text, text
    assert out["step"] == STEPS
    assert sorted(n for n in os.listdir(ckpts) if n.isdigit()) == ["4", "6"]  # 6 saved again; 2 gone
    assert [n.split("-")[0] for n in os.listdir(os.path.join(ckpts, ".damaged"))] == ["6"]  # kept aside
    assert _logged_steps(workdir) == list(range(1, STEPS + 1))
    assert_same_losses(losses(workdir), first, rtol=0)  # steps 5 and 6 again, exactly


def test_a_state_with_inf_is_never_saved(tmp_path, tokenizer_path):
    # peak_lr 3.4e38 is finite, but the first update (lr x ~1.002) overflows some parameters
    # while the loss and gradient norm of that step are finite.
    cfg = tiny_config(**{"data.tokenizer": tokenizer_path, "checkpoint_every": 1, "steps": 1,
                         "optimizer.peak_lr": 3.4e38, "optimizer.warmup_steps": 0, "optimizer.clip_norm": 0.0,
                         "optimizer.total_steps": STEPS})
    with pytest.raises(trainer.NonFiniteLoss, match=r"step 1: \d+ arrays of the state hold NaN or inf \(params/"):
        trainer.train(cfg, str(tmp_path))
    assert not os.path.exists(_ckpt_dir(tmp_path))  # nothing saved, no empty checkpoints/ left


@pytest.mark.parametrize("key, value, message", [
    ("keep_checkpoints", 0, "config.keep_checkpoints: must keep at least one checkpoint (expected >= 1, got 0)"),
    ("optimizer.peak_lr", float("nan"), "config.optimizer.peak_lr: must be a finite float32 number"),
    ("optimizer.peak_lr", 1e39, "config.optimizer.peak_lr: must be a finite float32 number"),
    ("optimizer.b2", float("inf"), "config.optimizer.b2: must be a finite float32 number"),
    ("seq_len", 1025, "config.seq_len: exceeds the model's context"),  # the tiny preset's max_seq_len: 1024
    ("sample.max_new_tokens", 1024, "config.sample.max_new_tokens: leaves no room for the prompt"),
    ("optimizer.warmup_steps", 10**6, "config.optimizer.warmup_steps: 1000000 warmup steps leave nothing of a "),
    ("init_from", "no/such/ckpt", "config.init_from: not a llama_jax checkpoint: "),
])
def test_bad_settings_fail_before_anything_is_written(tmp_path, key, value, message):
    cfg = tiny_config(**{key: value})
    with pytest.raises(InputError) as e:
        trainer.train(cfg, str(tmp_path / "w"))
    assert str(e.value).startswith(message)
    assert not os.path.exists(tmp_path / "w")


def test_sample_too_long_for_the_prompt_fails_before_training(tokenizer_path):
    from llama_jax.data import load_tokenizer
    cfg = tiny_config(**{"sample.max_new_tokens": 1022, "sample.prompt": "def main(argv):"})
    with pytest.raises(InputError, match="config.sample.max_new_tokens: with the prompt exceeds"):
        train_checks.check_sample_prompt(cfg, train_config.model_config(cfg), load_tokenizer(tokenizer_path))


def test_train_py_refuses_keep_checkpoints_0_in_one_line(tmp_path):
    p = _train(tmp_path / "w", keep_checkpoints=0)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2
    line = err.strip().splitlines()[-1]  # train.py's own range check or the trainer's: either names the key
    assert line.startswith("error: config.keep_checkpoints: ") and line.endswith("got 0)"), err
    assert not os.path.exists(tmp_path / "w")


def test_failed_setup_leaves_nothing_behind(tmp_path, tokenizer_path):
    cfg = tiny_config(**{"data.tokenizer": tokenizer_path,
                         "data.sources": [{"kind": "text", "path": str(tmp_path / "no_such.txt")}]})
    with pytest.raises(ValueError, match="no_such.txt"):
        trainer.train(cfg, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")  # neither checkpoints/ nor train.lock nor the directory
    os.mkdir(tmp_path / "mine")  # a workdir the user made: kept, but without our lock
    with pytest.raises(ValueError, match="no_such.txt"):
        trainer.train(cfg, str(tmp_path / "mine"))
    assert os.listdir(tmp_path / "mine") == []


@pytest.mark.parametrize("flags, message", [
    (["--config.steps=3", "--config.optimizer.warmup_steps=5"],
     "error: config.optimizer.warmup_steps: 5 warmup steps leave nothing of a 3-step schedule "
     "(expected warmup_steps < optimizer.total_steps (or steps), got 5)"),
    (["--config.init_from=nope/ckpt"], "error: config.init_from: not a llama_jax checkpoint: "),
    (["--stepz", "5"], "error: train.py: Unknown command line flag 'stepz' (did you mean --config.steps?)"),
])
def test_train_py_bad_settings_fail_in_one_line_before_the_workdir_is_made(tmp_path, flags, message):
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"), *flags]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith(message) and len(p.stderr.splitlines()) == 1, p.stderr
    assert not os.path.exists(tmp_path / "w")


_HOLDER = """
import sys, time
from llama_jax.train import workdir_lock
with workdir_lock.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_second_run_is_refused_while_the_first_lives_and_not_after_kill_9(tmp_path, monkeypatch):
    workdir = str(tmp_path / "w")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        p = _train(workdir)  # train.py: one line naming the holder, exit 2
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"error: {workdir}: in use by another training run (pid {holder.pid} on "), err
        with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {holder.pid}"):
            trainer.train(tiny_config(), workdir)
        # A filesystem without flock: the holder record alone still refuses a live holder here.
        def no_flock(fd, op):
            raise OSError(errno.ENOLCK, "No locks available")
        monkeypatch.setattr(fcntl, "flock", no_flock)
        with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {holder.pid}"):
            with workdir_lock.hold(workdir):
                pass
    finally:
        holder.kill()
        holder.wait()
    with workdir_lock.hold(workdir):  # ... a dead holder's record does not block it
        pass
    monkeypatch.undo()
    with workdir_lock.hold(workdir):  # the OS dropped the dead holder's flock
        assert json.load(open(os.path.join(workdir, workdir_lock.LOCK_FILE)))["pid"] == os.getpid()


_WRITER = """
import sys, time
from llama_jax import checkpoint
with checkpoint.output_dir(sys.argv[1]) as tmp:
    (tmp / "part").write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    time.sleep(600)
"""


def test_a_killed_writers_temporary_output_is_removed_by_the_next_write(tmp_path):
    out = tmp_path / "ckpt"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], env=_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        tmp = writer.stdout.readline().strip()
        with checkpoint.output_dir(tmp_path / "other"):
            pass
        with checkpoint.output_dir(out) as mine:  # a live writer's directory is left alone
            assert os.path.isdir(tmp)
            (mine / "x").write_text("1")
    finally:
        writer.kill()
        writer.wait()
    with checkpoint.output_dir(out, overwrite=True):
        assert not os.path.exists(tmp)  # the killed writer's
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "other"]


def test_pretokenize_leaves_no_shard_on_a_bad_record_or_an_empty_corpus(tmp_path, tokenizer_path):
    from llama_jax.data import DataError, SourceConfig, load_tokenizer, pretokenize
    tok = load_tokenizer(tokenizer_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' * 5 + "{not json\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="not valid JSON"):
        pretokenize(SourceConfig(kind="jsonl", path=str(bad)), tok, str(out), docs_per_shard=2)
    assert os.listdir(out) == []
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="1 documents, 0 tokens"):
        pretokenize(SourceConfig(kind="jsonl", path=str(empty)), tok, str(out))
    assert os.listdir(out) == []
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty corpus"):  # training would run on bos/eos alone
        pretokenize(SourceConfig(kind="text", path=str(tmp_path / "empty.txt")), tok, str(out))


def _events(logdir):
    """Every Event in a TensorBoard directory (TFRecord framing: length, crc, data, crc)."""
    import struct
    from tensorboardX.proto import event_pb2
    out = []
    for name in sorted(os.listdir(logdir)):
        data = open(os.path.join(logdir, name), "rb").read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            e = event_pb2.Event()
            e.ParseFromString(data[i + 12:i + 12 + n])
            out.append(e)
            i += 12 + n + 4
    return out


def test_a_resume_drops_the_metrics_rows_after_its_step(tmp_path):
    from llama_jax.train.metrics import MetricsWriter
    w = MetricsWriter(str(tmp_path))
    for step in range(1, 5):
        w.write(step, {"loss": float(step)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a kill mid-line
    w = MetricsWriter(str(tmp_path), from_step=2)  # resumed from the checkpoint of step 2
    w.write(3, {"loss": 30.0})
    w.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    # TensorBoard hides the first run's steps >= 3 (a SessionLog START with purge step 3).
    starts = [e.step for e in _events(tmp_path / "tensorboard") if e.HasField("session_log")
              and e.session_log.status == e.session_log.START]
    assert 3 in starts
