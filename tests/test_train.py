"""Training on 8 CPU devices: loss falls, mesh and accumulation invariance, stop + resume
onto another mesh, sharded init, non-finite loss; train.py as a process: SIGTERM, kill -9,
two processes with jax.distributed, config errors. One module, so that the one-process
reference run is computed once."""
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from llama_jax.train import loop as trainer

from llama_jax.train import checkpoint as train_checkpoint
from train_helpers import REPO, STEPS, as_flags, assert_same_losses, losses, tiny_config
from train_helpers import reference, tokenizer_path  # noqa: F401  (fixtures)


def run(tmp_path, name, tokenizer_path, **overrides):
    workdir = str(tmp_path / name)
    cfg = tiny_config(**{"data.tokenizer": tokenizer_path, **overrides})
    trainer.train(cfg, workdir)
    return workdir


def test_loss_falls_on_the_tiny_config(tmp_path, tokenizer_path):
    sys.path.insert(0, REPO)
    from configs import tiny
    cfg = tiny.get_config()
    cfg.data.tokenizer = tokenizer_path  # the same recipe tiny.py would train, made once for all tests
    out = trainer.train(cfg, str(tmp_path))
    got = losses(str(tmp_path))
    first, last = np.mean([got[s] for s in (5, 10)]), np.mean([got[s] for s in (35, 40)])
    assert got[5] > 5.5 and last < first - 1.0, got
    assert np.isfinite(out["eval_loss"]) and out["eval_loss"] < first


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_same_losses_on_every_mesh(tmp_path, tokenizer_path, reference, mesh):
    assert_same_losses(losses(run(tmp_path, "m", tokenizer_path, mesh=mesh)), reference)


@pytest.mark.parametrize("overrides", [{"micro_batches": 2}, {"run.remat_policy": "full"},
                                       {"run.layer_loop": "unrolled", "run.remat_policy": "dots_flash",
                                        "run.fuse_gate_up": True, "micro_batches": 2}])
def test_gradient_accumulation_and_remat_match_the_plain_step(tmp_path, tokenizer_path, reference, overrides):
    got = losses(run(tmp_path, "acc", tokenizer_path, mesh=(1, 8, 1), **overrides))
    assert_same_losses(got, reference)


def test_stop_and_resume_onto_another_mesh(tmp_path, tokenizer_path, reference):
    # Stop after 3 steps of the 6-step schedule on (2, 2, 2), resume on (1, 2, 4).
    workdir = run(tmp_path, "r", tokenizer_path, mesh=(2, 2, 2), steps=3, **{"optimizer.total_steps": STEPS})
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
    assert os.path.isfile(os.path.join(workdir, "checkpoints", "3", "model_config.json"))
    cfg = tiny_config(**{"data.tokenizer": tokenizer_path, "mesh": (1, 2, 4)})
    out = trainer.train(cfg, workdir)
    assert out["step"] == STEPS
    assert_same_losses(losses(workdir), reference)


def test_init_is_sharded_and_step_dir_loads_as_params_checkpoint(tmp_path, tokenizer_path):
    from llama_jax import load_checkpoint, sharding
    from llama_jax.train import config as train_config
    cfg = tiny_config(**{"data.tokenizer": tokenizer_path, "mesh": (1, 2, 4)})
    run_ = trainer.setup(cfg, str(tmp_path))
    wq = run_.state.params["layers"]["attention"]["wq"]  # [L, D, N, H]: D over fsdp, N over tensor
    assert wq.addressable_shards[0].data.shape == (2, 32, 1, 16)
    mu = run_.state.opt_state[1][0].mu["output"]        # Adam moments shard like their params
    assert mu.sharding == run_.state.params["output"].sharding
    trainer.save(run_)
    run_.manager.wait_until_finished()
    config, params = load_checkpoint(os.path.join(str(tmp_path), "checkpoints", "0"),
                                     mesh=sharding.make_mesh((1, 8, 1)))
    assert config.architecture == train_config.model_config(cfg).architecture
    np.testing.assert_array_equal(np.asarray(params["output"]), np.asarray(run_.state.params["output"]))

    # Fine-tuning from that step directory, onto another mesh: same params, fresh optimizer,
    # and the checkpoint's tokenizer (data.tokenizer left empty).
    step0 = os.path.join(str(tmp_path), "checkpoints", "0")
    cfg2 = tiny_config(**{"init_from": step0, "mesh": (2, 2, 2), "model.n_layers": 1})
    tuned = trainer.setup(cfg2, str(tmp_path / "finetune"))
    assert tuned.model.n_layers == 2 and int(tuned.state.step) == 0  # the checkpoint's architecture
    assert tuned.tokenizer.path == os.path.join(step0, "tokenizer.model")
    for a, b in zip(jax.tree.leaves(tuned.state.params), jax.tree.leaves(run_.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.asarray(tuned.state.opt_state[1][0].mu["output"]).any()
    trainer.save(tuned)
    tuned.manager.wait_until_finished()
    resumed = trainer.setup(cfg2, str(tmp_path / "finetune"))  # resumes: still the checkpoint's 2 layers
    assert resumed.model.n_layers == 2 and resumed.start_step == 0


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tokenizer_path):
    # A huge learning rate with no warmup: step 1 is finite, its update overflows step 2.
    workdir = str(tmp_path)
    cfg = tiny_config(**{"data.tokenizer": tokenizer_path, "checkpoint_every": 1, "optimizer.peak_lr": 1e30,
                         "optimizer.warmup_steps": 0, "optimizer.clip_norm": 0.0})
    with pytest.raises(trainer.NonFiniteLoss, match="not finite"):
        trainer.train(cfg, workdir)
    manager = train_checkpoint.make_manager(os.path.join(workdir, "checkpoints"), 3)
    good = manager.latest_step()
    assert good is not None and good < STEPS
    run_ = trainer.setup(cfg, workdir)  # the kept checkpoint restores, and is finite
    assert int(run_.state.step) == good
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(run_.state.params))

def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu", PYTHONPATH=REPO)


def _train(workdir, devices=8, extra=(), **overrides):
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
           *as_flags(overrides), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _wait_for_checkpoint(p, workdir, step, timeout=180):
    start = time.time()
    while not any(s >= step for s in _steps(workdir)):
        assert p.poll() is None, p.stdout.read()
        assert time.time() - start < timeout, "no checkpoint in time"
        time.sleep(0.01)


def test_sigterm_saves_and_exits_0_then_kill_9_then_resume_matches(tmp_path, tokenizer_path, reference):
    workdir = tmp_path / "run"
    over = {"data.tokenizer": tokenizer_path, "checkpoint_every": 1, "keep_checkpoints": 10}
    p = _train(workdir, **over)
    _wait_for_checkpoint(p, workdir, 1)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    stopped = max(_steps(workdir))
    assert stopped < STEPS and "stopped by signal" in out, out
    assert max(losses(workdir)) == stopped  # the step it finished is the step it saved

    p = _train(workdir, **over)  # resumes, then dies by kill -9 mid-run
    _wait_for_checkpoint(p, workdir, stopped + 1)
    p.kill()
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    killed_at = max(_steps(workdir))
    assert killed_at < STEPS

    cfg = tiny_config(**{**over, "mesh": (1, 8, 1)})
    assert trainer.train(cfg, str(workdir))["step"] == STEPS
    assert_same_losses(losses(workdir), reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, **overrides):
    port = _free_port()
    procs = [_train(workdir, devices=4, extra=["--coordinator_address", f"127.0.0.1:{port}",
                                               "--num_processes", "2", "--process_id", str(i)], **overrides)
             for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out


def test_two_processes_train_checkpoint_resume_and_match_one_process(tmp_path, tokenizer_path, reference):
    # 3 steps of the 6-step schedule, a checkpoint, then a resume to 6: 2 x 4 CPU devices.
    _two_processes(tmp_path, **{"data.tokenizer": tokenizer_path, "steps": 3, "optimizer.total_steps": STEPS})
    assert _steps(tmp_path) == [3]
    shards = sorted(n for n in os.listdir(tmp_path / "checkpoints" / "3" / "data") if n.startswith("shard"))
    assert shards == ["shard_0-of-2.json", "shard_1-of-2.json"]  # each process wrote its own
    _two_processes(tmp_path, **{"data.tokenizer": tokenizer_path})
    assert _steps(tmp_path)[-1] == STEPS
    assert_same_losses(losses(tmp_path), reference)


@pytest.mark.parametrize("flag, message", [
    ("--config.no_such_key=1", "error: --config.no_such_key: unknown key of configs/tiny.py"),
    ("--config.model.dimm=1", "(did you mean --config.model.dim?)"),
    ("--config.steps=many", "error: train.py: flag --config.steps=many: invalid"),
    ("--config.run.fp8_history=2.5", "(expected an integer: the config has run.fp8_history = 16)")])
def test_unknown_key_or_wrong_type_is_an_error(tmp_path, flag, message):
    p = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path), flag],
                       cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1  # one line, no list of every key
    assert message in p.stderr
    assert not os.path.exists(tmp_path / "metrics.jsonl")
