"""Output folders written whole or not at all (checkpoints and converter outputs).

`output_dir` yields a temporary sibling `.NAME.tmp-XXXX`, held by a flock while it is
written, and swaps it in as NAME on success; a killed writer's leftover (no live holder)
is removed by the next writer. An output that is, contains or is inside an input is refused.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import uuid
from pathlib import Path

from llama_jax.checkpoint.layout import absolute
from llama_jax.errors import input_error

log = logging.getLogger(__name__)


def check_output_apart(output: str | os.PathLike, inputs) -> None:
    """Refuse an output folder that is, contains or is inside one of `inputs` (symlinks
    resolved): replacing it would delete the input, or write into it."""
    out = Path(output).expanduser().resolve()
    for given in inputs:
        inp = Path(given).expanduser().resolve()
        how = ("is the input" if out == inp else "contains the input" if out in inp.parents
               else "is inside the input" if inp in out.parents else None)
        if how:
            raise input_error(output, f"the output folder {how} {given}; nothing was written",
                              "an output outside the input", str(out))


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, overwrite: bool = False, inputs=()):
    """Yield a temporary directory beside `path`; swap it in as `path` on success.

    A failed or interrupted write leaves no directory that looks like a checkpoint, and
    an existing `path` (with `overwrite`) stays whole until the new one is complete.
    `inputs`: folders the output must not be, contain or be inside (see check_output_apart).
    """
    check_output_apart(path, inputs)
    out = absolute(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_dirs(out.parent, f".{out.name}.tmp-")  # a killed earlier attempt's
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    held = lock_dir(tmp)  # marks it as live for remove_stale_dirs
    try:
        yield tmp
        _swap_in(tmp, out)
    finally:
        if held is not None:
            os.close(held)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is moved aside first and deleted only once
    `new` is in place (a kill in between leaves it whole, as `.NAME.old-*`)."""
    if not os.path.lexists(out):
        new.rename(out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()  # a file, or a symlink: its target is left alone


def lock_dir(path: str | os.PathLike) -> int | None:
    """Takes a flock on directory `path` (a temporary output being written); returns the
    fd to close when done, None where the filesystem has no flock."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale_dirs(parent: str | os.PathLike, prefix: str) -> list[str]:
    """Removes the directories `parent/prefix*` that no live process holds (`lock_dir`):
    leftovers of a killed writer. Directories that cannot be locked are left alone."""
    removed = []
    if not os.path.isdir(parent):
        return removed
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if not name.startswith(prefix) or not os.path.isdir(path):
            continue
        fd = lock_dir(path)
        if fd is None:
            continue  # being written now (or no flock here)
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    if removed:
        log.warning("removed %d unfinished output(s) of killed runs: %s", len(removed), removed)
    return removed
