"""`open_source(cfg)`: a configured source of any kind as a random-access document source."""
from __future__ import annotations

from llama_jax.data.config import SFT_KINDS, DataError, SourceConfig, SourceKind, TextUnit
from llama_jax.data.sft import SftSource
from llama_jax.data.sources import FileSource, resolve_paths, stdlib_files


def open_source(cfg: SourceConfig):
    """Opens one configured source as a random-access document source."""
    if cfg.kind == SourceKind.STDLIB:
        return FileSource(stdlib_files(cfg.split), SourceKind.TEXT, TextUnit.FILE, name=cfg.describe())
    if cfg.kind in (SourceKind.TEXT, SourceKind.JSONL):
        paths = resolve_paths(cfg.path, cfg.describe())
        return FileSource(paths, cfg.kind, cfg.text_unit, cfg.field, name=cfg.describe())
    if cfg.kind in SFT_KINDS:
        return SftSource(resolve_paths(cfg.path, cfg.describe()), cfg)
    if cfg.kind == SourceKind.TFDS:
        from llama_jax.data.tfds_source import open_tfds  # lazy: tensorflow_datasets is optional
        return open_tfds(cfg)
    if cfg.kind == SourceKind.PRETOKENIZED:
        from llama_jax.data.pretokenized_source import PretokenizedSource  # lazy: grain, array_record
        return PretokenizedSource(cfg.path)
    raise DataError(f"unknown source kind {cfg.kind}")
