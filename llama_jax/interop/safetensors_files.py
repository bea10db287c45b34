"""safetensors files read and written one tensor at a time, with pread/pwrite.

The format is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` and
the raw little-endian bytes. Reading with pread (not mmap) keeps RSS at one tensor;
writing the header first (all shapes are known up front) lets tensors arrive in any order.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from llama_jax.errors import input_error
from llama_jax.interop.file_io import PreallocatedWriter, pread_exact, read_at

ST_TO_NUMPY = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NUMPY_TO_ST = {v: k for k, v in ST_TO_NUMPY.items()}
MAX_HEADER_BYTES = 100_000_000  # the reference reader's limit


def _parse_header(raw: bytes, path: str) -> dict:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise input_error(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise input_error(path, "header is not a JSON object", "{name: {dtype, shape, data_offsets}}",
                          type(header).__name__)
    return header


def _check_entry(name: str, info, data_bytes: int, path: str) -> tuple[tuple[int, ...], np.dtype, int, int]:
    """(shape, dtype, begin, end) of one header entry, each checked against the file."""
    where = f"{path}: tensor {name}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise input_error(where, "malformed header entry", "keys dtype, shape, data_offsets",
                          sorted(info) if isinstance(info, dict) else type(info).__name__)
    if info["dtype"] not in ST_TO_NUMPY:
        raise input_error(where, "unsupported dtype", sorted(ST_TO_NUMPY), info["dtype"])
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise input_error(where, "bad shape", "a list of non-negative integers", shape)
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise input_error(where, "bad data_offsets", "[begin, end] with 0 <= begin <= end", offsets)
    dtype, (begin, end) = ST_TO_NUMPY[info["dtype"]], offsets
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != nbytes:
        raise input_error(where, f"data_offsets span in bytes does not match shape {tuple(shape)} {info['dtype']}",
                          nbytes, end - begin)
    if end > data_bytes:
        raise input_error(where, f"needs bytes up to {end} of the data section (truncated?)",
                          f"end <= {data_bytes}", end)
    return tuple(shape), dtype, begin, end


def _check_entries(header: dict, data_bytes: int, path: str) -> dict[str, tuple[tuple[int, ...], np.dtype, int, int]]:
    """Every entry checked, and no two tensors sharing bytes (ordered by begin, non-overlapping)."""
    entries = {name: _check_entry(name, info, data_bytes, path) for name, info in header.items()}
    previous, prev_end = None, 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < prev_end:
            raise input_error(f"{path}: tensor {name}", f"data_offsets overlap tensor {previous}",
                              f"begin >= {prev_end}", begin)
        if end > begin:
            previous, prev_end = name, end
    return entries


class SafetensorsFile:
    """One .safetensors file: names, shapes and dtypes from its header; tensors on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        size = os.path.getsize(self.path)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if size < 8:
                raise input_error(self.path, "too short for a safetensors file (truncated?), in bytes", ">= 8", size)
            (n,) = struct.unpack("<Q", pread_exact(fd, 8, 0, self.path).tobytes())
            if n > MAX_HEADER_BYTES:
                raise input_error(self.path, "header length in bytes is not sane (not a safetensors file?)",
                                  f"<= {MAX_HEADER_BYTES}", n)
            if 8 + n > size:
                raise input_error(self.path, "header length in bytes runs past the end of the file (truncated?)",
                                  f"<= {size - 8}", n)
            header = _parse_header(pread_exact(fd, n, 8, self.path).tobytes(), self.path)
        finally:
            os.close(fd)
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.entries = _check_entries(header, size - self._data_start, self.path)

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> np.dtype:
        return self.entries[name][1]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][0]

    def read(self, name: str) -> np.ndarray:
        shape, dtype, begin, end = self.entries[name]
        raw = read_at(self.path, end - begin, self._data_start + begin, f"{self.path}: tensor {name}")
        return raw.view(dtype).reshape(shape)


class SafetensorsWriter(PreallocatedWriter):
    """Writes one .safetensors file whose tensors (name -> (shape, dtype)) are known up front.

    Tensors are laid out in the order given; `close()` fails unless all were written.
    """

    def __init__(self, path: str | os.PathLike, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
                 metadata: dict[str, str] | None = None):
        self.path, self.specs = str(path), dict(specs)
        header, offset = {}, 0
        for name, (shape, dtype) in self.specs.items():
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": NUMPY_TO_ST[np.dtype(dtype)], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = metadata or {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the reference writer pads the header to 8 bytes
        self._data_start = 8 + len(blob)
        self._offsets = {n: self._data_start + h["data_offsets"][0]
                         for n, h in header.items() if n != "__metadata__"}
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._fd, struct.pack("<Q", len(blob)) + blob)
        os.ftruncate(self._fd, self._data_start + offset)
        self._pending = set(self.specs)
