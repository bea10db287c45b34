"""Reads back what `pretokenize` wrote: array_record shards of token ids, one record a document.

The reader lives apart from the writer (data/pretokenize.py) because `source_kinds.open_source`
opens pretokenized directories while the writer opens sources to read its corpus: kept in
one module, the two would import each other.
"""
from __future__ import annotations

import json
import os

import numpy as np

from llama_jax.data.config import DataError

META_FILE = "pretokenized.json"  # beside the shards: vocab size, shard names, document count


class PretokenizedSource:
    """Random access over a `pretokenize` output directory; items are int32 id arrays."""

    def __init__(self, directory: str):
        meta_path = os.path.join(directory, META_FILE)
        if not os.path.isfile(meta_path):
            raise DataError(f"pretokenized:{directory}: no {META_FILE} (not written by pretokenize?)")
        with open(meta_path) as f:
            meta = json.load(f)
        paths = [os.path.join(directory, s) for s in meta["shards"]]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DataError(f"pretokenized:{directory}: missing shard(s) {missing}")
        import grain
        self._records = grain.sources.ArrayRecordDataSource(paths)
        if len(self._records) != meta["documents"]:
            raise DataError(f"pretokenized:{directory}: {len(self._records)} records, "
                            f"expected {meta['documents']} from {META_FILE}")
        self.name, self.vocab_size, self.meta = f"pretokenized:{directory}", meta["vocab_size"], meta

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.frombuffer(self._records[i], dtype="<i4").astype(np.int32)

    def __repr__(self):
        return f"PretokenizedSource({self.name!r}, {len(self)} documents)"
