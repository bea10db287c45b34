"""Resuming whatever a kill or a damaged disk left: the newest intact step, and no leftovers.

- `restore_intact` restores the newest step whose arrays match their checksums. A damaged
  newer step is moved (not deleted) to `checkpoints/.damaged/` with a warning, so that the
  run can save that step number again; if no step restores, nothing is moved and the
  newest step's error is raised (a wrong config fails every step alike: that is no damage).
- `purge_deleted` removes the steps Orbax pruned into `checkpoints/.deleted/` (a kill while
  deleting leaves them there, never as half a step).
- `set_aside_incomplete` moves step directories that lack an item (half-deleted by an
  older version, or by hand) out of the list of steps.
- `remove_if_empty` drops a `checkpoints/` directory a failed run created and never used.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
import jax

from llama_jax.train import checkpoint as train_checkpoint

log = logging.getLogger(__name__)

DAMAGED_DIR = ".damaged"


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _move_aside(directory: str, step: int, into: str) -> str:
    dst_root = os.path.join(directory, into)
    dst = os.path.join(dst_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
        os.makedirs(dst_root, exist_ok=True)
        os.replace(os.path.join(directory, str(step)), dst)
    return dst


def _items_named(e: Exception) -> str:
    """" (opt_state)": the step items an error's text names (a checksum mismatch names its item;
    a storage read error names the file it read, somewhere in its full text), else ""."""
    text = str(e)
    named = [i for i in train_checkpoint.STEP_ITEMS if re.search(rf"(^|[/\\ '\"]){re.escape(i)}([/\\ '\":]|$)", text)]
    return f" ({', '.join(named)})" if named else ""


def restore_intact(manager, abstract_state, shardings, shards: tuple[int, ...], shard_count: int):
    """(step, state, data states) of the newest intact step, or None when there are no steps."""
    directory = str(manager.directory)
    steps = sorted(manager.all_steps(), reverse=True)
    failures: list[tuple[int, Exception]] = []
    for step in steps:
        try:
            state, data = train_checkpoint.restore(manager, step, abstract_state, shardings, shards, shard_count)
        except Exception as e:  # damage shows as a checksum mismatch or as any error reading the step
            log.warning("checkpoint %s/%d cannot be restored%s: %s", directory, step, _items_named(e),
                        str(e).splitlines()[0])
            failures.append((step, e))
            continue
        for bad, e in failures:
            dst = _move_aside(directory, bad, DAMAGED_DIR)
            log.warning("checkpoint step %d is damaged (moved to %s); resuming from step %d instead", bad, dst, step)
        if failures:
            _barrier("set_aside_damaged")
            manager.reload()
        return step, state, data
    if failures:
        raise failures[0][1]
    return None


def purge_deleted(directory: str, background: bool = False) -> None:
    """Removes what Orbax pruned into `directory/.deleted` (process 0; other processes skip),
    in a thread with `background` (a big step takes a while to delete)."""
    root = os.path.join(directory, train_checkpoint.DELETED_DIR)
    if jax.process_index() != 0 or not os.path.isdir(root):
        return
    def purge(names):
        for name in names:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    names = os.listdir(root)
    if background:
        threading.Thread(target=purge, args=(names,), daemon=True).start()
    else:
        purge(names)


def set_aside_incomplete(manager) -> None:
    """Moves step directories missing an item (train_checkpoint.STEP_ITEMS) into `.deleted/` (then purged)."""
    directory = str(manager.directory)
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()]  # all, as readers list them
    bad = [s for s in steps if not train_checkpoint.is_complete(os.path.join(directory, str(s)))]
    for step in bad:
        log.warning("checkpoint %s/%d is incomplete (half deleted?): removed from the steps", directory, step)
        _move_aside(directory, step, train_checkpoint.DELETED_DIR)
    if bad:
        _barrier("set_aside_incomplete")
        manager.reload()
        purge_deleted(directory)


def remove_if_empty(directory: str) -> None:
    """Removes `directory` if it holds nothing but empty bookkeeping directories."""
    if jax.process_index() != 0 or not os.path.isdir(directory):
        return
    for name in (train_checkpoint.DELETED_DIR,):
        sub = os.path.join(directory, name)
        if os.path.isdir(sub) and not os.listdir(sub):
            os.rmdir(sub)
    if not os.listdir(directory):
        os.rmdir(directory)
