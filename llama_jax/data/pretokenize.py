"""Pre-tokenize a corpus once into array_record shards (read back by data/pretokenized_source).

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

from llama_jax.data.config import SFT_KINDS, DataConfig, DataError, SourceConfig
from llama_jax.data.pretokenized_source import META_FILE
from llama_jax.data.source_kinds import open_source


def pretokenize(source: SourceConfig | DataConfig, tokenizer, output_dir: str,
                docs_per_shard: int = 100_000, progress=None) -> dict:
    """Tokenizes every document of `source` (in order) into `output_dir`; returns the metadata.

    `progress`, if given, is called with the number of documents written so far. A failure
    (a bad record, an empty corpus) removes the shards written so far: no shard is left
    without its index, and no index describes other shards.
    """
    cfgs = source.sources if isinstance(source, DataConfig) else (source,)
    sft = [c.describe() for c in cfgs if c.kind in SFT_KINDS]
    if sft:  # records hold ids only; a fine-tuning example's loss mask would be lost
        raise DataError(f"pretokenize: fine-tuning sources {sft} are tokenized on the fly, not pretokenized")
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
