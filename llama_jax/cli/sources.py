"""Shared flags for the thin data CLIs: argparse flags (train_tokenizer.py, pretokenize.py)
and train.py's source specs (`--config.data.sources=SPEC`).

The library never parses argv; these helpers are imported only by the repo-root scripts.
"""
from __future__ import annotations

import argparse
import os

from llama_jax.data.config import SourceConfig, SourceKind, TextUnit


_KINDS = tuple(k.value for k in SourceKind if k != SourceKind.PRETOKENIZED)


def add_source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="stdlib",
                   help="the corpus: a source spec as train.py's and eval.py's (stdlib[:split], text:PATH, "
                        "lines:PATH, jsonl:PATH[#field], tfds:NAME[:split]), or a bare kind "
                        f"({', '.join(_KINDS)}) with --path/--field/--name (default: the Python standard "
                        "library's source)")
    p.add_argument("--path", default="", help="with a bare --source text/jsonl: a file, a directory or a glob")
    p.add_argument("--field", default="text", help="jsonl key / TFDS feature holding the text")
    p.add_argument("--text-unit", default="file", choices=[u.value for u in TextUnit])
    p.add_argument("--name", default="", help="tfds: dataset name, e.g. c4/en")
    p.add_argument("--split", default="train")
    p.add_argument("--data-dir", default=None, help="tfds: data_dir")


def source_from_flags(args: argparse.Namespace) -> SourceConfig:
    """--source as a spec (`text:notes.txt`), or the older bare kind with --path etc."""
    from llama_jax.errors import input_error
    if args.source in _KINDS:  # "--source text --path notes.txt"
        return SourceConfig(kind=SourceKind(args.source), path=args.path, field=args.field,
                            text_unit=TextUnit(args.text_unit), name=args.name, split=args.split,
                            data_dir=args.data_dir)
    from llama_jax.data.spec import check_paths, parse_source
    if args.path:
        raise input_error("--path", "give the path in the --source spec, not both", "--source KIND:PATH",
                          f"--source {args.source} --path {args.path}")
    cfg = parse_source(args.source, args.split, args.data_dir, where="--source")
    if cfg.kind == SourceKind.PRETOKENIZED:
        raise input_error("--source", "already pretokenized: give a text source", "KIND:ARG with KIND in "
                          f"{', '.join(_KINDS)}, lines", args.source)
    check_paths((cfg,), "--source")
    return cfg


# train.py's list-valued config keys, given as one source spec (llama_jax.data.spec):
# config_flags cannot override a list, so train.py takes these flags out of argv first.
SOURCE_KEYS = {"data.sources": "train", "eval_data.sources": "validation"}


def take_source_flags(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """(argv without `--config.data.sources[=]SPEC` / `--config.eval_data.sources[=]SPEC`,
    {key: SPEC})."""
    rest, specs, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg[len("--config."):].partition("=") if arg.startswith("--config.") else ("", "", "")
        if key in SOURCE_KEYS:
            if not eq:  # "--config.data.sources SPEC"
                i += 1
                value = argv[i] if i < len(argv) else ""
            specs[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, specs


def source_dicts(key: str, spec: str) -> list[dict]:
    """The config value (a list of SourceConfig dicts) of `--config.KEY=SPEC`; the paths
    are checked now, so a typo fails before anything is built."""
    import dataclasses
    import enum

    from llama_jax.data.spec import check_paths, parse_sources
    where = f"--config.{key}"
    sources = parse_sources(spec, SOURCE_KEYS[key], where=where)
    check_paths(sources, where)
    out = []
    for s in sources:
        d = {k: v.value if isinstance(v, enum.Enum) else v for k, v in dataclasses.asdict(s).items() if v is not None}
        if d["path"]:  # as config.json records it, and a resume from another directory reads it
            d["path"] = os.path.abspath(d["path"])
        out.append(d)
    return out
