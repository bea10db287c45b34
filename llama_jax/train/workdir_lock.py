"""One training run per workdir: an exclusive lock on WORKDIR/train.lock.

`fcntl.flock` locks belong to the open file: the operating system drops them when the
holder exits in any way (kill -9 included), so a lock is never stale. The file records
the holder (host, pid, start time, command) for the refusal message. Network filesystems
that support flock (NFSv4, Lustre, GPFS) lock across hosts. Where flock is not supported
the lock falls back to that record alone, and says so: a live holder on this host is
detected by its pid, one on another host is not. A multi-host run locks on process 0 only.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time

from llama_jax.errors import InputError

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirBusy(InputError):
    """Another run holds the workdir."""


def _record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}


def _holder(path: str) -> dict:
    try:
        with open(path) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def _busy(workdir: str, holder: dict) -> WorkdirBusy:
    who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
           if holder else "another process")
    return WorkdirBusy(f"{workdir}: in use by another training run ({who}); wait for it to finish, stop it, "
                       f"or use another --workdir")


def _alive_here(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    if holder["pid"] == os.getpid():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def hold(workdir: str):
    """Holds WORKDIR's lock for the body; raises WorkdirBusy (naming the holder) if taken."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(workdir, _holder(path)) from None
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            log.warning("%s: the filesystem does not support flock (%s); falling back to the holder record "
                        "(a run on another host is not detected)", path, e.strerror)
            if _alive_here(_holder(path)):
                raise _busy(workdir, _holder(path)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_record()) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def hold_for_run(workdir: str):
    """`hold` on process 0 of a (multi-host) run; every process learns whether it was refused,
    so that all of them stop with WorkdirBusy instead of the others waiting on process 0."""
    import jax
    stack = contextlib.ExitStack()
    refused = None
    if jax.process_index() == 0:
        try:
            stack.enter_context(hold(workdir))
        except WorkdirBusy as e:
            refused = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils
        if int(multihost_utils.broadcast_one_to_all(np.int32(refused is not None))) and refused is None:
            refused = WorkdirBusy(f"{workdir}: in use by another training run (process 0 names it)")
    if refused is not None:
        stack.close()
        raise refused
    with stack:
        yield

