"""Packed rows on cuDNN's packed kernel, checked on the host (docs/attention.md).

With `RunOptions.packed_segments` M >= 2 the model runs cuDNN's packed ("THD") kernel
unchecked: every row must be at most M runs of equal segment ids, ids increasing from run
to run, padding (id 0) only as the last run; any other row would be masked wrong, silently.
`PackedGuard` checks each host-local batch in numpy before it becomes a global array and
sends a batch that does not fit through a second train (or eval) step, built on first need
with `packed_segments=0` (the dense-mask kernel): slower for that batch, exact.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from llama_jax.runtime import AttentionImpl, RunOptions

log = logging.getLogger(__name__)


def rows_fit(segment_ids: np.ndarray, max_segments: int) -> bool:
    """Does every row of [B,T] segment ids fit M packed slots: at most M runs, ids increasing
    from run to run, padding (0) only as the last run (`attention.packed_layout`'s `fits`)."""
    seg = np.asarray(segment_ids).astype(np.int64)
    runs = 1 + np.count_nonzero(seg[:, 1:] != seg[:, :-1], axis=1)
    key = np.where(seg == 0, np.iinfo(np.int64).max, seg)  # padding sorts last
    ordered = np.all(key[:, 1:] >= key[:, :-1], axis=1)
    return bool(np.all(ordered & (runs <= max_segments)))


def kernel_slots(run: RunOptions, platform: str) -> int:
    """Run slots the packed kernel will use on `platform` ("gpu", "cpu", "tpu"): 0 when it
    will not run (packed_segments 0, or attention not on cuDNN), so nothing needs checking.
    (On a GPU before Hopper attend takes the dense mask anyway: checking is then harmless.)"""
    from llama_jax.attention import resolve
    if run.packed_segments < 2 or platform != "gpu":
        return 0
    return run.packed_segments if resolve(run.attention_impl, run.dtype, platform) is AttentionImpl.CUDNN else 0


def _on_every_process(ok: bool) -> bool:
    """`ok` and-ed over processes: all of them must run the same step (one collective)."""
    import jax
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


class PackedGuard:
    """Picks the step that is exact for a batch: the given one when every row fits `slots`
    (or `slots` < 2: no packed kernel), else the dense-mask step of the same kind from
    `make_dense()` ({"train": step, "eval": step}), called once, on the first such batch."""

    def __init__(self, slots: int, make_dense: Callable[[], dict[str, Callable]]):
        self.slots, self._make_dense, self._dense = slots, make_dense, None
        self.dense_batches = {"train": 0, "eval": 0}

    def step_for(self, local_batch: dict, step: Callable, kind: str = "train") -> Callable:
        """`step`, or the dense-mask `kind` step when a row of `local_batch` (this process's
        rows, numpy) does not fit on some process."""
        if self.slots < 2 or _on_every_process(rows_fit(local_batch["segment_ids"], self.slots)):
            return step
        if self._dense is None:
            log.info("a batch has rows that do not fit the packed attention kernel's %d slots: it and any "
                     "like it run the dense-mask kernel (a second step, compiled now)", self.slots)
            self._dense = self._make_dense()
        self.dense_batches[kind] += 1
        return self._dense[kind]

    def summary(self) -> str | None:
        """One line for the end of the run when a batch took the dense mask, else None."""
        n = self.dense_batches
        if not any(n.values()):
            return None
        return (f"packed rows: {n['train']} train and {n['eval']} eval batches did not fit the packed "
                f"kernel's {self.slots} slots and ran the dense-mask kernel")
