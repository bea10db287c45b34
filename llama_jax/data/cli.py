"""Shared argparse flags for the thin data CLIs (train_tokenizer.py, pretokenize.py).

The library never parses argv; these helpers are imported only by the repo-root scripts.
"""
from __future__ import annotations

import argparse

from llama_jax.data.config import SourceConfig, SourceKind, TextUnit


def add_source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="stdlib", choices=[k.value for k in SourceKind if k != SourceKind.PRETOKENIZED],
                   help="corpus kind (default: the Python standard library's source)")
    p.add_argument("--path", default="", help="text/jsonl: a file, a directory or a glob")
    p.add_argument("--field", default="text", help="jsonl key / TFDS feature holding the text")
    p.add_argument("--text-unit", default="file", choices=[u.value for u in TextUnit])
    p.add_argument("--name", default="", help="tfds: dataset name, e.g. c4/en")
    p.add_argument("--split", default="train")
    p.add_argument("--data-dir", default=None, help="tfds: data_dir")


def source_from_flags(args: argparse.Namespace) -> SourceConfig:
    return SourceConfig(kind=SourceKind(args.source), path=args.path, field=args.field,
                        text_unit=TextUnit(args.text_unit), name=args.name, split=args.split,
                        data_dir=args.data_dir)
