"""Training input: tokenizer, this process's input shards, global batch assembly.

The input is split into `shard_count` shards independent of how many processes read
them: process p of P reads shards [p*k, (p+1)*k) with k = shard_count / P and stacks their
rows. So a run with 2 processes and 2 shards sees exactly the batches of 1 process with
2 shards, and the saved per-shard iterator states resume on any process count dividing
`shard_count`.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

from llama_jax.data import (DataConfig, DataError, Llama3Tokenizer, Tokenizer, check_vocab, load_tokenizer,
                            make_dataset, make_global_batch)
from llama_jax.data import train_tokenizer
from llama_jax.checkpoint import TOKENIZER_MODEL

log = logging.getLogger(__name__)


def process_shards(shard_count: int) -> tuple[int, ...]:
    """The input shards this process reads."""
    p, n = jax.process_index(), jax.process_count()
    if shard_count % n:
        raise DataError(f"data.shards={shard_count} must be a multiple of the process count {n}")
    k = shard_count // n
    return tuple(range(p * k, (p + 1) * k))


class ShardedInput:
    """Iterator of global batches (jax.Arrays on `sharding`) from this process's shards."""

    def __init__(self, data: DataConfig, tokenizer, seq_len: int, batch_size: int, seed: int,
                 shard_count: int, sharding):
        self.shards = process_shards(shard_count)
        self.shard_count, self._sharding = shard_count, sharding
        self._its = {i: make_dataset(data, tokenizer, seq_len, batch_size, seed=seed, shard_index=i,
                                     shard_count=shard_count) for i in self.shards}

    def next_local(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self._its.values()]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def to_global(self, local: dict[str, np.ndarray]) -> dict[str, Any]:
        """This process's rows (`next_local`) as the global batch, sharded as the input's batches."""
        return make_global_batch(local, self._sharding)

    def __next__(self) -> dict[str, Any]:
        return self.to_global(self.next_local())

    def __iter__(self):
        return self

    def truncated_examples(self) -> int:
        """How many distinct fine-tuning examples longer than a row this process's shards have
        cut to their end so far (read-ahead included; counted from this process's start)."""
        return len(set().union(*(it.stats.truncated_examples for it in self._its.values())))

    def get_states(self) -> dict[int, Any]:
        return {i: it.get_state() for i, it in self._its.items()}

    def set_states(self, states: dict[int, Any]) -> None:
        for i, it in self._its.items():
            it.set_state(states[i])


def tokenizer_for(path: str, data: DataConfig, vocab_size: int, workdir: str) -> Tokenizer | Llama3Tokenizer:
    """The configured tokenizer, or one trained on the training sources (LLaMA's recipe,
    the model's vocab_size) and kept as WORKDIR/tokenizer.model for resumes."""
    if path:
        tok = load_tokenizer(path)
    else:
        path = os.path.join(workdir, TOKENIZER_MODEL)  # where find_tokenizer_file looks
        if jax.process_index() == 0 and not os.path.exists(path):
            log.info("training a %d-piece tokenizer on %s", vocab_size, [s.describe() for s in data.sources])
            train_tokenizer(data, vocab_size, path + ".tmp")
            os.replace(path + ".tmp", path)  # atomic: a killed run never leaves half a file
        _barrier("tokenizer")
        tok = load_tokenizer(path)
    check_vocab(tok, vocab_size)
    return tok


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
