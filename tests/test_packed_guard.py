"""The host-side guard of the unchecked packed attention kernel (train/packed_guard.py).

`rows_fit` must say exactly what `attention.packed_layout`'s `fits` says; the guard must send
a batch that does not fit to the dense-mask step; and train.py's loop with the guard must
train as the XLA path does. On CPUs the cuDNN kernels are stood in for by the XLA path over
the mask each applies (the packed one masks by runs, as in tests/test_attention_packed.py),
so a batch that reached the packed stand-in without fitting would change the loss.
"""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import attention as A
from llama_jax.data.packing import pack_documents
from llama_jax.runtime import AttentionImpl, RunOptions
from llama_jax.train import loop as trainer
from llama_jax.train import packed_guard as G
from train_helpers import losses, tiny_config, tokenizer_path  # noqa: F401 (fixture)

EDGE_ROWS = [[1, 1, 1, 2, 2, 3, 0, 0], [1] * 8, [0] * 8, [1, 2, 3, 4, 0, 0, 0, 0], [1, 2, 3, 0, 0, 0, 0, 0],
             [1, 1, 2, 2, 1, 1, 0, 0], [0, 0, 1, 1, 2, 2, 2, 2], [1, 1, 0, 0, 2, 2, 0, 0],
             [2, 2, 1, 1, 1, 1, 1, 1], [5, 5, 5, 5, 9, 9, 9, 9], [1, 2, 3, 4, 5, 6, 7, 8]]


def _fits(rows, m):
    return np.asarray(jax.jit(A.packed_layout, static_argnums=1)(jnp.asarray(rows, jnp.int32), m)[2])


def _random_rows(r, b, t):
    """Rows of random runs: mostly the packer's form, some with ids that repeat, decrease,
    or padding that is not last."""
    rows = []
    for _ in range(b):
        cuts = np.sort(r.choice(np.arange(1, t), size=int(r.integers(0, 8)), replace=False))
        ids = np.cumsum(r.integers(1, 3, len(cuts) + 1))
        kind = r.integers(0, 4)
        if kind == 1:
            ids[-1] = 0                                        # padding tail
        elif kind == 2:
            ids = r.integers(0, 4, len(ids))                   # anything: repeats, zeros, decreases
        rows.append(np.repeat(ids, np.diff(np.r_[0, cuts, t])))
    return np.stack(rows).astype(np.int32)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
def test_rows_fit_agrees_with_packed_layout(m):
    r = np.random.default_rng(m)
    packer = [np.stack([row["segment_ids"] for row in pack_documents(
        [list(r.integers(3, 50, r.integers(0, 40))) for _ in range(30)], 32, bos=1, eos=2)])
        for _ in range(3)]
    batches = [np.asarray(EDGE_ROWS, np.int32), *packer, *(_random_rows(r, 16, 24) for _ in range(20))]
    seen = set()
    for seg in batches:
        want = _fits(seg, m)
        for row, w in zip(seg, want):
            assert G.rows_fit(row[None], m) == w, (row, m)
            seen.add(bool(w))
        assert G.rows_fit(seg, m) == want.all()
    assert seen == {True, False}  # both answers were exercised


def test_kernel_slots():
    run = RunOptions(dtype="bfloat16", packed_segments=16)
    assert G.kernel_slots(run, "gpu") == 16
    assert G.kernel_slots(run.replace(attention_impl="cudnn", dtype="float32"), "gpu") == 16
    assert G.kernel_slots(run, "cpu") == G.kernel_slots(run, "tpu") == 0
    assert G.kernel_slots(run.replace(dtype="float32"), "gpu") == 0       # AUTO: the XLA path in float32
    assert G.kernel_slots(run.replace(attention_impl="xla"), "gpu") == 0
    assert G.kernel_slots(run.replace(packed_segments=0), "gpu") == 0


def test_packed_segments_option():
    run = RunOptions(packed_segments=16)
    assert RunOptions.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    assert RunOptions().packed_segments == 0
    for bad in (1, -2, True, 2.5, "16"):
        with pytest.raises(ValueError, match=r"packed_segments=.*must be 0 \(the dense mask\) or an integer >= 2"):
            RunOptions(packed_segments=bad)


def test_guard_routes_a_batch_that_does_not_fit_to_the_dense_step(caplog):
    made = []

    def make_dense():
        made.append(1)
        return {"train": "dense train", "eval": "dense eval"}
    fits = {"segment_ids": np.asarray([[1, 1, 2, 0], [1, 1, 1, 1]])}
    too_many = {"segment_ids": np.asarray([[1, 2, 3, 0], [1, 1, 1, 1]])}
    out_of_order = {"segment_ids": np.asarray([[1, 1, 1, 1], [2, 1, 1, 1]])}
    guard = G.PackedGuard(3, make_dense)
    with caplog.at_level(logging.INFO, logger=G.__name__):
        assert guard.step_for(fits, "packed train") == "packed train"
        assert not made and guard.summary() is None
        assert guard.step_for(too_many, "packed train") == "dense train"
        assert guard.step_for(out_of_order, "packed eval", "eval") == "dense eval"
        assert guard.step_for(too_many, "packed train") == "dense train"
        assert guard.step_for(fits, "packed eval", "eval") == "packed eval"
    assert made == [1]  # built once, on the first batch that needed it
    assert guard.dense_batches == {"train": 2, "eval": 1}
    assert sum("do not fit" in r.message for r in caplog.records) == 1
    assert "2 train and 1 eval batches" in guard.summary()
    # No packed kernel (slots 0): nothing is checked, every batch takes the given step.
    off = G.PackedGuard(0, make_dense)
    assert off.step_for(too_many, "packed train") == "packed train" and off.summary() is None


def _short_documents(path):
    """JSON lines of short documents: rows of 32 tokens hold 1 to 3 of them."""
    r = np.random.default_rng(0)
    words = "def return import class self None for in while if else print value index".split()
    with open(path, "w") as f:
        for _ in range(2000):
            n = int(r.integers(2, 60)) if r.random() < 0.8 else int(r.integers(100, 300))
            f.write(json.dumps({"text": " ".join(r.choice(words, n))}) + "\n")


def _runs_as_ids(seqlen, offsets, t):
    pos = jnp.arange(t)[None, None, :]
    start, length = offsets[:, :-1, None], seqlen[:, :, None]
    inside = (start >= 0) & (pos >= start) & (pos < start + length)  # [B, M, T]
    return jnp.where(inside.any(1), jnp.argmax(inside, axis=1), -1 - jnp.arange(t)[None])


def test_loop_with_the_guard_trains_as_xla(tmp_path, monkeypatch, tokenizer_path):  # noqa: F811
    """train() with packed_segments=2 on stand-in cuDNN kernels, stopped at step 3 and resumed:
    the losses of the XLA run, and the first batch (a row of 3 documents) took the dense step.
    Without the guard the same run's first loss differs: the check is what keeps it exact."""
    _short_documents(tmp_path / "docs.jsonl")
    monkeypatch.setattr(A, "packed_supported", lambda n, k: True)
    monkeypatch.setattr(A, "_cudnn_packed", lambda q, k, v, s, o: A._xla(
        q, k, v, _runs_as_ids(s, o, q.shape[1]), _runs_as_ids(s, o, q.shape[1]), 0))
    monkeypatch.setattr(A, "_cudnn", lambda q, k, v, qs, ks: A._xla(q, k, v, qs, ks, 0))
    monkeypatch.setattr(G, "kernel_slots", lambda run, platform: run.packed_segments)
    data = {"data.tokenizer": tokenizer_path, "mesh": (1, 8, 1), "optimizer.total_steps": 6,
            "data.sources": [{"kind": "jsonl", "path": str(tmp_path / "docs.jsonl")}]}
    packed = {**data, "run.attention_impl": "cudnn", "run.packed_segments": 2}

    trainer.train(tiny_config(**data, **{"run.attention_impl": "xla"}), str(tmp_path / "xla"))
    want = losses(str(tmp_path / "xla"))
    first = trainer.train(tiny_config(**packed, steps=3), str(tmp_path / "guarded"))
    trainer.train(tiny_config(**packed), str(tmp_path / "guarded"))
    # The stand-ins compute what the XLA path computes over the same mask: equal to the bit.
    assert losses(str(tmp_path / "guarded")) == want
    assert 1 <= first["dense_mask_batches"]["train"] < 3, first  # some batches packed, some dense

    monkeypatch.setattr(G, "kernel_slots", lambda run, platform: 0)  # no guard: packed kernel throughout
    trainer.train(tiny_config(**packed, steps=1), str(tmp_path / "unguarded"))
    got = losses(str(tmp_path / "unguarded"))[1]
    assert abs(got - want[1]) > 2e-6 * want[1], (got, want[1])  # even assert_same_losses would see it
