"""The training input pipeline: sources -> shard -> shuffle -> tokenize -> mix -> pack ->
batch, built from grain datasets so that its iterator state is small and restorable.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from llama_jax.data import packing
from llama_jax.data.config import SFT_KINDS, DataConfig, DataError, SourceConfig
from llama_jax.data.source_kinds import open_source

_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What a saved iterator state is only valid for."""
    seq_len: int
    local_batch_size: int
    seed: int
    shard_index: int
    shard_count: int
    sources: tuple[str, ...]


class DataIterator:
    """Yields batches (dict of numpy [local_batch, seq_len], see `packing`); checkpointable.

    `get_state()` is a small JSON-serialisable dict (indices and offsets, no data);
    `set_state(state)` makes the next batches identical to those the saved iterator would
    have produced.
    """

    def __init__(self, grain_iter, layout: _Layout, stats: packing.PipelineStats, fine_tuning: bool = False):
        self._it, self._layout, self.stats = grain_iter, layout, stats
        self._fine_tuning = fine_tuning

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = packing.pad_batch(next(self._it), self._layout.local_batch_size)
        if self._fine_tuning and not batch["loss_mask"].any():
            # A step on such a batch trains on nothing and says nothing (levanter/marin #7237).
            raise DataError(f"a batch of {', '.join(self._layout.sources)} has no token to train on "
                            "(the loss mask is all zero)")
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "layout": dataclasses.asdict(self._layout),
                "grain": self._it.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("layout", {})
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
        mine = dataclasses.asdict(self._layout)
        if state.get("version") != _STATE_VERSION or saved != mine:
            diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
            raise DataError(f"data iterator state does not match this pipeline (saved, now): {diff}")
        self._it.set_state(state["grain"])


def _source_dataset(src, cfg: SourceConfig, index: int, data: DataConfig, tokenize, seed: int,
                    shard_index: int, shard_count: int):
    import grain
    if not hasattr(src, "__getitem__"):  # sequential fallback (tfds.load): shard inside the reader
        from llama_jax.data.tfds_source import iterable_dataset
        return iterable_dataset(src.records(shard_index, shard_count, data.num_epochs)).map(tokenize)
    ds = grain.MapDataset.source(src)[shard_index::shard_count]
    if len(ds) == 0:
        raise DataError(f"{cfg.describe()}: {len(src)} documents cannot feed {shard_count} shards "
                        f"(shard {shard_index} is empty)")
    if data.shuffle:
        # Each source gets its own stream of seeds; grain folds in the epoch on repeat.
        ds = ds.shuffle(seed=(seed * 1_000_003 + index) % 2**32)
    ds = ds.repeat(data.num_epochs).map(tokenize)
    opts = grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=data.prefetch_buffer)
    return ds.to_iter_dataset(opts)


def make_dataset(data_config: DataConfig, tokenizer, seq_len: int, global_batch_size: int,
                 seed: int = 0, shard_index: int | None = None,
                 shard_count: int | None = None) -> DataIterator:
    """Builds this process's iterator of local batches of `global_batch_size // shard_count`.

    Shards default to `jax.process_index()` / `jax.process_count()`. Each source's
    documents are split round-robin between shards (disjoint, together covering all),
    shuffled per epoch with `seed`, tokenized, mixed by `weight` (per document), and packed
    (whole, first fit, when any source is a fine-tuning kind: see `packing`).
    """
    import grain
    if isinstance(data_config, dict) or hasattr(data_config, "to_dict"):
        data_config = DataConfig.from_dict(data_config)
    if shard_index is None or shard_count is None:
        import jax
        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index {shard_index} not in [0, shard_count={shard_count})")
    if global_batch_size % shard_count:
        raise DataError(f"global_batch_size {global_batch_size} is not divisible by shard_count {shard_count}")
    if seq_len <= 0:
        raise DataError(f"seq_len must be > 0, got {seq_len}")
    local_batch = global_batch_size // shard_count
    stats = packing.PipelineStats()
    fine_tuning = any(cfg.kind in SFT_KINDS for cfg in data_config.sources)
    tokenize = packing.TokenizeDocument(tokenizer, seq_len + 1, stats, whole_documents=fine_tuning)
    sources = [open_source(cfg) for cfg in data_config.sources]
    _check_pretokenized(sources, tokenizer)
    parts = {f"{i}:{cfg.describe()}": _source_dataset(src, cfg, i, data_config, tokenize, seed, shard_index, shard_count)
             for i, (cfg, src) in enumerate(zip(data_config.sources, sources))}
    if len(parts) == 1:
        ds = next(iter(parts.values()))
    else:
        weights = {k: cfg.weight for k, cfg in zip(parts, data_config.sources)}
        ds = grain.IterDataset.mix(parts, weights)
    ds = packing.pack(ds, seq_len, whole_documents=fine_tuning, bins=local_batch).map(packing.row_to_example)
    ds = ds.batch(local_batch, drop_remainder=False)
    layout = _Layout(seq_len, local_batch, seed, shard_index, shard_count, tuple(parts))
    return DataIterator(iter(ds), layout, stats, fine_tuning)


def _check_pretokenized(sources, tokenizer):
    for src in sources:
        vocab = getattr(src, "vocab_size", None)
        if vocab is not None and vocab != tokenizer.vocab_size:
            raise DataError(f"{src.name}: pre-tokenized with a vocab of {vocab} tokens, but the "
                            f"tokenizer {getattr(tokenizer, 'path', '')!r} has {tokenizer.vocab_size}")


def make_global_batch(local_batch: dict[str, np.ndarray], sharding) -> dict[str, Any]:
    """Assembles per-process local batches into global jax.Arrays sharded by `sharding`
    (e.g. NamedSharding(mesh, P(("data", "fsdp")))); the batch axis is split over processes."""
    import jax
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
