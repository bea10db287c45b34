"""Positional file I/O shared by the torch zip and safetensors readers and writers.

Tensors are read with pread into fresh buffers (not mmap: touched mapped pages stay in
the process's RSS until the mapping goes away) and written with pwrite into files whose
layout is fixed up front, so one tensor at a time is in memory and tensors may arrive in
any order.
"""
from __future__ import annotations

import os
import zlib

import numpy as np

_CHUNK = 1 << 30  # pread/pwrite move at most ~2 GB per call


def pread_exact(fd: int, nbytes: int, offset: int, what: str) -> np.ndarray:
    """Read exactly `nbytes` at `offset` into a fresh uint8 array; a short file is an error naming `what`."""
    buf = np.empty(nbytes, np.uint8)
    view, pos = memoryview(buf), 0
    while pos < nbytes:
        n = os.preadv(fd, [view[pos:pos + _CHUNK]], offset + pos)
        if n == 0:
            raise ValueError(f"{what}: file ends at byte {offset + pos}, expected {nbytes - pos} more bytes (truncated?)")
        pos += n
    return buf


def read_at(path: str, nbytes: int, offset: int, what: str) -> np.ndarray:
    """`pread_exact` on `path`, opened for this read only."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return pread_exact(fd, nbytes, offset, what)
    finally:
        os.close(fd)


def pwrite_all(fd: int, data: np.ndarray, offset: int, crc32: bool = False) -> int:
    """Write `data`'s bytes at `offset`; returns their CRC-32 (computed on the bytes as
    they are written) when `crc32`, else 0."""
    view, pos, crc = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8)), 0, 0
    while pos < len(view):
        n = os.pwrite(fd, view[pos:pos + _CHUNK], offset + pos)
        if crc32:
            crc = zlib.crc32(view[pos:pos + n], crc)
        pos += n
    return crc


class PreallocatedWriter:
    """Fills a file laid out up front (`_fd`, absolute `_offsets` by name), tensor by tensor.

    `close()` fails unless every tensor in `specs` was written.
    """
    path: str
    specs: dict[str, tuple[tuple[int, ...], np.dtype]]
    _fd: int
    _offsets: dict[str, int]
    _pending: set[str]
    _crcs: dict[str, int] | None = None  # CRC-32 per name, for formats that record one

    def write(self, name: str, array: np.ndarray) -> None:
        shape, dtype = self.specs[name]
        if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
            raise ValueError(f"{self.path}: tensor {name}: got {array.shape} {array.dtype}, "
                             f"expected {tuple(shape)} {np.dtype(dtype)}")
        crc = pwrite_all(self._fd, array, self._offsets[name], crc32=self._crcs is not None)
        if self._crcs is not None:
            self._crcs[name] = crc
        self._pending.discard(name)

    def close(self) -> None:
        os.close(self._fd)
        if self._pending:
            raise ValueError(f"{self.path}: tensors never written: {sorted(self._pending)[:8]}")
