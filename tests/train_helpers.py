"""Shared pieces of the training tests: a small config, a tokenizer, metrics readers."""
import json
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


# configs/tiny.py shrunk: 6 float32 steps of 16 x 32 tokens, logged every step.
# n_kv_heads=4 so that every parameter divides a tensor axis of 4; data.shards=2 so that
# a single process reads the same batches as two processes.
TEST_OVERRIDES = {"steps": STEPS, "log_every": 1, "eval_every": 0, "eval_batches": 0, "checkpoint_every": 100,
                  "batch_size": 16, "seq_len": 32, "model.n_kv_heads": 4, "optimizer.warmup_steps": 2,
                  "data.shards": 2}


def random_batch(vocab_size: int, b: int = 8, t: int = 32) -> dict:
    """A train-step batch of b unpacked rows of t random tokens, every token counted (seeded)."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, vocab_size, (b, t + 1)).astype(np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((b, t), np.float32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "segment_ids": np.ones((b, t), np.int32)}


def tiny_config(**overrides):
    """configs/tiny.py with TEST_OVERRIDES and `overrides` ("a.b" keys) applied."""
    sys.path.insert(0, REPO)
    from configs import tiny
    c = tiny.get_config()
    for key, value in {**TEST_OVERRIDES, **overrides}.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def as_flags(overrides: dict) -> list[str]:
    """The --config.KEY=VALUE flags that make train.py's configs/tiny.py tiny_config(**overrides)."""
    return [f"--config.{k}={v}" for k, v in {**TEST_OVERRIDES, **overrides}.items()]


def losses(workdir) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged twice (before a kill, then after the
    resume) keeps its last value."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                out[row["step"]] = row["loss"]
    return out


def assert_same_losses(got: dict, want: dict, rtol: float = 2e-6):
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for s in want:
        assert abs(got[s] - want[s]) <= rtol * abs(want[s]), (s, got[s], want[s])


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tokenizer_path):
    """Losses by step of the uninterrupted 6-step run on mesh (1, 8, 1), one process."""
    from llama_jax.train import loop as trainer
    workdir = str(tmp_path_factory.mktemp("reference"))
    trainer.train(tiny_config(**{"data.tokenizer": tokenizer_path, "mesh": (1, 8, 1)}), workdir)
    return losses(workdir)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    from llama_jax.data import SourceConfig, train_tokenizer
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_tokenizer(SourceConfig(), 512, path, max_chars=2_000_000)
    return path
