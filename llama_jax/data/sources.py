"""Random-access document sources: local text/JSONL files and the stdlib corpus.

Each source has `__len__` and `__getitem__(i) -> str` (grain's RandomAccessDataSource
protocol), so grain can shard, shuffle and checkpoint by index without reading ahead.
Line-oriented files are indexed once (byte offsets, 16 bytes a document) and read by
seek, so a large JSONL never sits in memory.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig

import numpy as np

from llama_jax.data.config import DataError, SourceKind, TextUnit
from llama_jax.data.decoding import DecodeCounter

# Directories left out of the stdlib corpus: tests are large and repetitive, and
# site-packages is whatever the user installed, so not the same on every machine.
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_EVAL_PERCENT = 1  # stdlib files whose path hash falls in the first 1% are held out


def resolve_paths(pattern: str, what: str) -> list[str]:
    """Expands a file, a directory (recursively) or a glob into a sorted file list."""
    if os.path.isdir(pattern):
        files = [os.path.join(d, f) for d, _, fs in os.walk(pattern) for f in fs]
    elif any(c in pattern for c in "*?["):
        files = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    elif os.path.isfile(pattern):
        files = [pattern]
    else:
        raise DataError(f"{what}: no such file or directory: {pattern!r}")
    if not files:
        raise DataError(f"{what}: no files match {pattern!r}")
    return sorted(files)


def _line_spans(path: str) -> np.ndarray:
    """Byte [start, end) of every line of `path` holding some non-whitespace, as int64 [n, 2]."""
    data = np.fromfile(path, dtype=np.uint8)
    newlines = np.flatnonzero(data == ord("\n"))
    starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
    ends = np.concatenate([newlines, [len(data)]]).astype(np.int64)
    # Whitespace-only lines are not documents: count non-whitespace bytes per line with
    # one cumulative sum instead of a Python loop over lines.
    solid = ~np.isin(data, np.frombuffer(b" \t\r\n\f\v", np.uint8))
    cum = np.concatenate([[0], np.cumsum(solid)])
    keep = cum[ends] - cum[starts] > 0
    return np.stack([starts[keep], ends[keep]], axis=1)


class FileSource:
    """Documents from local files: whole text files, text lines, or JSONL records."""

    def __init__(self, paths: list[str], kind: SourceKind, text_unit: TextUnit = TextUnit.FILE,
                 field: str = "text", name: str = ""):
        self.name = name or (paths[0] if len(paths) == 1 else f"{len(paths)} files")
        self._paths, self._kind, self._field = list(paths), kind, field
        self.decode_errors = DecodeCounter()
        self._whole_files = kind == SourceKind.TEXT and text_unit == TextUnit.FILE
        if self._whole_files:
            self._index = np.arange(len(paths), dtype=np.int64)[:, None]
            if not any(os.path.getsize(p) for p in paths):  # documents of nothing: no corpus
                self._index = self._index[:0]
        else:
            parts = []
            for i, p in enumerate(self._paths):
                spans = _line_spans(p)
                parts.append(np.concatenate([np.full((len(spans), 1), i), spans], axis=1))
            # Row: (file index, byte start, byte end).
            self._index = np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)
        if len(self._index) == 0:
            raise DataError(f"{self.name}: empty corpus (0 documents in {len(paths)} file(s))")

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> str:
        row = self._index[i]
        path = self._paths[int(row[0])]
        if self._whole_files:
            with open(path, "rb") as f:
                return self.decode_errors.decode(f.read(), path)
        start, end = int(row[1]), int(row[2])
        with open(path, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
        text = self.decode_errors.decode(raw, f"{path} bytes {start}:{end}")
        if self._kind == SourceKind.TEXT:
            return text
        return self._field_of(text, path, start)

    def line_at(self, i: int) -> tuple[str, str, int]:
        """(text, path, byte offset) of line document `i` (line-indexed sources only)."""
        row = self._index[i]
        path, start, end = self._paths[int(row[0])], int(row[1]), int(row[2])
        with open(path, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
        return self.decode_errors.decode(raw, f"{path} bytes {start}:{end}"), path, start

    def _field_of(self, line: str, path: str, offset: int) -> str:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} (byte {offset}): not valid JSON: {e}") from None
        if not isinstance(record, dict) or self._field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path} (byte {offset}): no field {self._field!r}; the record has {keys}")
        value = record[self._field]
        if not isinstance(value, str):
            raise DataError(f"{path} (byte {offset}): field {self._field!r} is {type(value).__name__}, expected str")
        return value

    def __repr__(self):
        return f"FileSource({self.name!r}, {len(self)} documents)"


def stdlib_files(split: str = "train") -> list[str]:
    """The stdlib corpus: the Python standard library's .py files, sorted, minus tests.

    A file is held out for `split="eval"` when the SHA-1 of its path relative to the
    stdlib root (first 4 bytes, as an integer) is 0 modulo 100: deterministic on any
    machine with the same Python version, and about 1% of files.
    """
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _STDLIB_SKIP_DIRS)
        files.extend(os.path.join(d, n) for n in sorted(names) if n.endswith(".py"))
    files.sort()
    want_eval = split == "eval"
    out = [f for f in files if _is_eval(os.path.relpath(f, root)) == want_eval]
    if not out:
        raise DataError(f"stdlib corpus: no .py files found under {root!r} for split {split!r}")
    return out


def _is_eval(relpath: str) -> bool:
    digest = hashlib.sha1(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < _EVAL_PERCENT
