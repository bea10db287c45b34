"""Pre-tokenize a corpus once into array_record shards, and read it back as a source.

Where on-the-fly tokenization cannot keep up with a large model's step, tokenize once:
each record is one document's ids (int32, little-endian, without bos/eos; the pipeline
adds them). `pretokenized.json` beside the shards records the tokenizer's vocab size so a
mismatched tokenizer is an error, not silently wrong ids.
"""
from __future__ import annotations

import contextlib
import json
import os

import numpy as np

from llama_jax.data.config import DataConfig, DataError, SourceConfig
from llama_jax.data.sources import _DecodeCounter, open_source

META_FILE = "pretokenized.json"


def pretokenize(source: SourceConfig | DataConfig, tokenizer, output_dir: str,
                docs_per_shard: int = 100_000, progress=None) -> dict:
    """Tokenizes every document of `source` (in order) into `output_dir`; returns the metadata.

    `progress`, if given, is called with the number of documents written so far. A failure
    (a bad record, an empty corpus) removes the shards written so far: no shard is left
    without its index, and no index describes other shards.
    """
    cfgs = source.sources if isinstance(source, DataConfig) else (source,)
    os.makedirs(output_dir, exist_ok=True)
    if os.path.exists(os.path.join(output_dir, META_FILE)):
        os.remove(os.path.join(output_dir, META_FILE))  # describes shards about to be replaced
    shards: list[str] = []
    try:
        n_docs, n_tokens = _write_shards(cfgs, tokenizer, output_dir, docs_per_shard, shards, progress)
        if n_tokens == 0:
            raise DataError(f"pretokenize: empty corpus ({n_docs} documents, 0 tokens in "
                            f"{[c.describe() for c in cfgs]})")
    except BaseException:
        for s in shards:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(output_dir, s))
        raise
    meta = {"vocab_size": tokenizer.vocab_size, "tokenizer": getattr(tokenizer, "path", ""),
            "documents": n_docs, "tokens": n_tokens, "shards": shards,
            "sources": [c.describe() for c in cfgs]}
    with open(os.path.join(output_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def _write_shards(cfgs, tokenizer, output_dir: str, docs_per_shard: int, shards: list[str], progress):
    """Writes the documents of `cfgs` into shards (each name appended to `shards` when it is
    opened, so that a failure can remove it); returns (documents, tokens)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    n_docs, n_tokens, writer = 0, 0, None
    try:
        for cfg in cfgs:
            src = open_source(cfg)
            for i in range(len(src)):
                if writer is None or n_docs % docs_per_shard == 0:
                    if writer is not None:
                        writer.close()
                    shards.append(f"tokens-{len(shards):05d}.array_record")
                    # group_size:1 keeps every record independently seekable (random access).
                    writer = ArrayRecordWriter(os.path.join(output_dir, shards[-1]), "group_size:1")
                ids = np.asarray(tokenizer.encode(src[i], bos=False, eos=False), dtype="<i4")
                writer.write(ids.tobytes())
                n_docs, n_tokens = n_docs + 1, n_tokens + len(ids)
                if progress is not None:
                    progress(n_docs)
    finally:
        if writer is not None:
            writer.close()
    return n_docs, n_tokens


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
        self.decode_errors = _DecodeCounter()  # always 0: ids are not decoded

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.frombuffer(self._records[i], dtype="<i4").astype(np.int32)

    def __repr__(self):
        return f"PretokenizedSource({self.name!r}, {len(self)} documents)"
