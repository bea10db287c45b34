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

from llama_jax.torch_io import PreallocatedWriter, pread_exact

ST_TO_NUMPY = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NUMPY_TO_ST = {v: k for k, v in ST_TO_NUMPY.items()}


class SafetensorsFile:
    """One .safetensors file: names, shapes and dtypes from its header; tensors on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        size = os.path.getsize(self.path)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if size < 8:
                raise ValueError(f"{self.path}: {size} bytes, too short for a safetensors file (truncated?)")
            (n,) = struct.unpack("<Q", pread_exact(fd, 8, 0, self.path).tobytes())
            if 8 + n > size:
                raise ValueError(f"{self.path}: header of {n} bytes runs past the end of the file (truncated?)")
            header = json.loads(pread_exact(fd, n, 8, self.path).tobytes())
        finally:
            os.close(fd)
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.entries: dict[str, tuple[tuple[int, ...], np.dtype, int, int]] = {}
        for name, info in header.items():
            if info["dtype"] not in ST_TO_NUMPY:
                raise ValueError(f"{self.path}: tensor {name}: unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            shape, dtype = tuple(info["shape"]), ST_TO_NUMPY[info["dtype"]]
            if end - begin != int(np.prod(shape)) * dtype.itemsize:
                raise ValueError(f"{self.path}: tensor {name}: {end - begin} bytes for shape {shape} {dtype}")
            if self._data_start + end > size:
                raise ValueError(f"{self.path}: tensor {name} needs bytes up to {self._data_start + end} "
                                 f"but the file has {size} (truncated?)")
            self.entries[name] = (shape, dtype, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> np.dtype:
        return self.entries[name][1]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][0]

    def read(self, name: str) -> np.ndarray:
        shape, dtype, begin, end = self.entries[name]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            raw = pread_exact(fd, end - begin, self._data_start + begin, f"{self.path}: tensor {name}")
        finally:
            os.close(fd)
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
