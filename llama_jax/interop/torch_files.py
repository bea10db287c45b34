"""PyTorch zip checkpoints (.pth, .bin) read and written one tensor at a time.

Reading: `torch.load(map_location="meta", weights_only=True)` unpickles names, shapes,
dtypes and each storage's byte offset in the archive, without data and without running
code; each tensor's bytes are then read with `pread`. Nothing is memory-mapped, because
touched mmap pages stay in the process's RSS until the mapping goes away; read buffers
are freed as soon as the caller drops the array.

Writing: `torch.save` under `torch.serialization.skip_data()` writes a complete archive
with space reserved for every storage (from `torch.empty` tensors, whose untouched pages
cost no memory); a meta load gives the offsets, and each tensor is `pwrite`n in place,
its CRC-32 computed as it is written and patched into the zip records on `close()`.
The result is an ordinary archive that `torch.load(..., weights_only=True)` and `zipfile` read.

torch is imported only here, and only when a .pth/.bin file is read or written: safetensors
and Orbax conversions (and every `--help`) run without it.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import ml_dtypes
import numpy as np

from llama_jax.errors import input_error
from llama_jax.interop.file_io import PreallocatedWriter, read_at
from llama_jax.interop.zip_crc import set_crc32


def import_torch(path: str):
    """torch, or a one-line error saying that reading/writing `path` needs it."""
    try:
        import torch
    except ImportError:
        raise input_error(path, "PyTorch .pth/.bin files need torch, which is not installed: pip install torch") \
            from None
    return torch


@functools.cache
def _torch_dtypes() -> dict:
    torch = import_torch("torch_files")
    return {
        torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16),
        torch.bfloat16: np.dtype(ml_dtypes.bfloat16), torch.float64: np.dtype(np.float64),
        torch.int64: np.dtype(np.int64), torch.int32: np.dtype(np.int32), torch.int8: np.dtype(np.int8),
        torch.uint8: np.dtype(np.uint8), torch.bool: np.dtype(np.bool_),
    }


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int                   # byte offset of element 0 in the file
    strides: tuple[int, ...]      # in elements


class TorchFile:
    """A PyTorch zip checkpoint holding a flat dict of tensors, read tensor by tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        torch, to_numpy = import_torch(self.path), _torch_dtypes()
        try:
            state = torch.load(self.path, map_location="meta", weights_only=True)
        except Exception as e:  # a truncated zip loses its central directory: say so
            raise ValueError(f"{self.path}: cannot read as a PyTorch zip checkpoint "
                             f"(truncated, not a torch.save file, or pickled code?): {type(e).__name__}: "
                             f"{(str(e).strip().splitlines() or [''])[0][:200]}") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{self.path}: expected a flat dict of tensors (a state dict)")
        size = os.path.getsize(self.path)
        self.entries: dict[str, TensorEntry] = {}
        for name, t in state.items():
            if t.dtype not in to_numpy:
                raise ValueError(f"{self.path}: tensor {name}: unsupported dtype {t.dtype}")
            storage_offset = getattr(t.untyped_storage(), "_checkpoint_offset", None)
            if storage_offset is None:
                raise ValueError(f"{self.path}: tensor {name}: no storage offset (legacy, non-zip torch file?)")
            dtype = to_numpy[t.dtype]
            entry = TensorEntry(tuple(t.shape), dtype, storage_offset + t.storage_offset() * dtype.itemsize,
                                tuple(t.stride()))
            if entry.offset + _span(entry) > size:
                raise ValueError(f"{self.path}: tensor {name} needs bytes up to {entry.offset + _span(entry)} "
                                 f"but the file has {size} (truncated?)")
            self.entries[name] = entry

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> np.dtype:
        return self.entries[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a fresh contiguous numpy array (bfloat16 via ml_dtypes)."""
        e = self.entries[name]
        raw = read_at(self.path, _span(e), e.offset, f"{self.path}: tensor {name}").view(e.dtype)
        if _is_contiguous(e):
            return raw.reshape(e.shape)
        strided = np.lib.stride_tricks.as_strided(raw, e.shape, [s * e.dtype.itemsize for s in e.strides])
        return np.ascontiguousarray(strided)


def _span(e: TensorEntry) -> int:
    """Bytes from element 0 to the last element of a (possibly strided) tensor."""
    if any(s == 0 for s in e.shape):
        return 0
    return (sum((n - 1) * s for n, s in zip(e.shape, e.strides)) + 1) * e.dtype.itemsize


def _is_contiguous(e: TensorEntry) -> bool:
    expected, stride = [], 1
    for n in reversed(e.shape):
        expected.append(stride)
        stride *= n
    return tuple(reversed(expected)) == e.strides or int(np.prod(e.shape)) <= 1


class TorchFileWriter(PreallocatedWriter):
    """Writes a state dict whose names, shapes and dtypes are known up front, tensor by tensor."""

    def __init__(self, path: str | os.PathLike, specs: dict[str, tuple[tuple[int, ...], np.dtype]]):
        self.path, self.specs = str(path), dict(specs)
        torch = import_torch(self.path)
        to_torch = {v: k for k, v in _torch_dtypes().items()}
        # Untouched torch.empty storages: virtual memory only, never read under skip_data.
        skeleton = {n: torch.empty(shape, dtype=to_torch[np.dtype(dt)]) for n, (shape, dt) in specs.items()}
        with torch.serialization.skip_data():
            torch.save(skeleton, self.path)
        del skeleton
        meta = torch.load(self.path, map_location="meta", weights_only=True)
        self._offsets = {n: t.untyped_storage()._checkpoint_offset for n, t in meta.items()}
        self._fd = os.open(self.path, os.O_WRONLY)
        self._pending = set(self.specs)
        self._crcs = {}

    def close(self) -> None:
        super().close()
        # The skeleton's zip records carry the CRC-32 of placeholder bytes: set the real ones.
        set_crc32(self.path, {self._offsets[n]: crc for n, crc in self._crcs.items()})
