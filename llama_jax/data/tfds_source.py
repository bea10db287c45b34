"""TFDS sources: `tfds.data_source` (array_record, random access, no TensorFlow), with
`tfds.load` as a fallback for datasets prepared as tfrecord when TensorFlow is installed.

tensorflow_datasets is imported lazily so that machines without it can still train on
local files.
"""
from __future__ import annotations

import importlib.util
import itertools
from typing import Any, Callable, Iterable

from llama_jax.data.config import DataError, SourceConfig
from llama_jax.data.decoding import DecodeCounter


class TfdsSource:
    """Random-access view of one TFDS split that yields the text of `field` as str."""

    def __init__(self, records, cfg: SourceConfig):
        self._records, self._field, self.name = records, cfg.field, cfg.describe()
        self.decode_errors = DecodeCounter()
        if len(records) == 0:
            raise DataError(f"{self.name}: empty corpus (0 records)")
        first = records[0]
        if not isinstance(first, dict) or cfg.field not in first:
            keys = sorted(first) if isinstance(first, dict) else type(first).__name__
            raise DataError(f"{self.name}: no feature {cfg.field!r}; the records have {keys}")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> str:
        value = self._records[i][self._field]
        if isinstance(value, bytes):
            return self.decode_errors.decode(value, f"{self.name} record {i}")
        return str(value)

    def __repr__(self):
        return f"TfdsSource({self.name!r}, {len(self)} documents)"


def _first_line(e: BaseException) -> str:
    """TFDS errors can carry its whole ~290-line dataset catalogue: keep the first line."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def open_tfds(cfg: SourceConfig):
    """Opens a TFDS split; never downloads (prepare datasets beforehand with `tfds build`)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"{cfg.describe()}: tensorflow_datasets is not installed "
                        "(pip install tensorflow-datasets array_record)") from None
    try:
        records = tfds.data_source(cfg.name, split=cfg.split, data_dir=cfg.data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"{cfg.describe()}: TFDS dataset {cfg.name!r} not found in data_dir="
                        f"{cfg.data_dir or 'default'} (no network downloads are attempted)") from None
    except (ValueError, NotImplementedError, KeyError, AssertionError) as e:
        # Prepared as tfrecord (no random access) or a bad split name.
        if "file format" in str(e) and importlib.util.find_spec("tensorflow") is not None:
            return TfdsLoadSource(cfg)
        hint = (" (prepared as tfrecord: rebuild with `tfds build --file_format=array_record` or install "
                "tensorflow-cpu for the tfds.load fallback)") if "file format" in str(e) else ""
        raise DataError(f"{cfg.describe()}: cannot open through tfds.data_source: {_first_line(e)}{hint}") from None
    return TfdsSource(records, cfg)


class TfdsLoadSource:
    """Sequential fallback over `tfds.load` (needs TensorFlow). Not random access: the
    pipeline reads it as an iterator whose state is the number of records consumed."""

    def __init__(self, cfg: SourceConfig):
        self.cfg, self.name = cfg, cfg.describe()
        self.decode_errors = DecodeCounter()

    def records(self, shard_index: int, shard_count: int,
                num_epochs: int | None) -> Callable[[], Iterable[str]]:
        """A factory of this shard's documents in a fixed order (not shuffled), repeated
        `num_epochs` times (None: forever)."""
        def factory():
            import tensorflow_datasets as tfds
            split = tfds.even_splits(self.cfg.split, n=shard_count, drop_remainder=False)[shard_index]
            epochs = itertools.count() if num_epochs is None else range(num_epochs)
            for _ in epochs:
                try:
                    ds = tfds.load(self.cfg.name, split=split, data_dir=self.cfg.data_dir,
                                   shuffle_files=False, download=False)
                except ValueError as e:  # DatasetNotFoundError's message lists every TFDS dataset
                    raise DataError(f"{self.name}: tfds.load: {_first_line(e)}") from None
                for i, ex in enumerate(tfds.as_numpy(ds)):
                    yield self.decode_errors.decode(ex[self.cfg.field], f"{self.name} record {i}")
        return factory


def iterable_dataset(factory: Callable[[], Iterable[Any]]):
    """A grain IterDataset over a re-creatable iterable; state = elements consumed, and
    restoring re-reads and skips that many (correct, O(position))."""
    import grain

    class _Iter(grain.DatasetIterator):
        def __init__(self):
            super().__init__()
            self._it, self._n = iter(factory()), 0

        def __next__(self):
            x = next(self._it)
            self._n += 1
            return x

        def get_state(self):
            return {"consumed": self._n}

        def set_state(self, state):
            self._it, self._n = iter(factory()), 0
            for _ in range(state["consumed"]):
                next(self)

    class _Dataset(grain.IterDataset):
        def __iter__(self):
            return _Iter()

    return _Dataset()
