"""Data sources written as one short string: the syntax of train.py's
`--config.data.sources` / `--config.eval_data.sources` and eval.py's `--perplexity`.

    SPEC   := SOURCE ["," SOURCE ...]          several sources: a weighted mixture
    SOURCE := [WEIGHT "*"] KIND ":" ARG       WEIGHT: sampling weight by documents (default 1)

    stdlib[:train|eval]     the Python standard library's .py files (the default corpus)
    text:PATH               text files, each file one document; PATH a file, directory or glob
    lines:PATH              text files, each non-empty line one document
    jsonl:PATH[#FIELD]      JSON lines, the document under FIELD (default "text")
    pretokenized:DIR        a pretokenize.py output directory
    chat_jsonl:PATH[#FIELD[:MASK]]   fine-tuning dialogs under FIELD (default "messages");
                            MASK: assistant (every assistant turn, default) | last_assistant
    prompt_completion:PATH[#PROMPT:COMPLETION]   fine-tuning pairs (default keys prompt, completion)
    tfds:NAME[:SPLIT]       a TFDS dataset, e.g. tfds:c4/en:validation

e.g. "0.7*text:notes/*.txt,0.3*jsonl:chat.jsonl#body". A comma always separates sources,
so a path cannot hold one. Where the spec names no split, `default_split` is used: TFDS
takes it as is; stdlib's held-out split is called "eval", so any default but "train"
means "eval" there.
"""
from __future__ import annotations

import os

from llama_jax.data.config import SFT_KINDS, DataError, LossMask, SourceConfig, SourceKind, TextUnit
from llama_jax.errors import input_error

SYNTAX = ("[WEIGHT*]KIND:ARG[,...] with KIND:ARG one of stdlib[:split], text:PATH, lines:PATH, "
          "jsonl:PATH[#field], pretokenized:DIR, tfds:NAME[:split], chat_jsonl:PATH[#field[:mask]], "
          "prompt_completion:PATH[#prompt:completion]")
KINDS = ("stdlib", "text", "lines", "jsonl", "pretokenized", "tfds", "chat_jsonl", "prompt_completion")


def parse_sources(spec: str, default_split: str = "train", data_dir: str | None = None,
                  where: str = "source spec") -> tuple[SourceConfig, ...]:
    """The sources of a spec (see the module docstring); `data_dir` is TFDS's data_dir.
    A malformed spec raises InputError naming `where`."""
    parts = [p.strip() for p in spec.split(",")]
    if not spec.strip() or not all(parts):
        raise input_error(where, "empty source in the spec", SYNTAX, spec)
    return tuple(_parse_one(p, default_split, data_dir, where) for p in parts)


def parse_source(spec: str, default_split: str = "test", data_dir: str | None = None,
                 where: str = "source spec") -> SourceConfig:
    """One source (no mixture, weight ignored): eval.py's `--perplexity`."""
    sources = parse_sources(spec, default_split, data_dir, where)
    if len(sources) != 1:
        raise input_error(where, "give one source here, not a mixture", "KIND:ARG", spec)
    return sources[0]


def check_paths(sources: tuple[SourceConfig, ...], where: str = "source spec") -> None:
    """Fails now, in one line, when a local source's file, directory or glob matches nothing."""
    from llama_jax.data.sources import resolve_paths
    for s in sources:
        if s.kind in (SourceKind.TEXT, SourceKind.JSONL) or s.kind in SFT_KINDS:
            resolve_paths(s.path, f"{where}: {s.describe()}")
        elif s.kind == SourceKind.PRETOKENIZED and not os.path.isdir(s.path):
            raise input_error(where, f"{s.describe()}: no such directory", "a pretokenize.py output", s.path)


def to_spec(source: SourceConfig, with_weight: bool = False) -> str:
    """The spec of one source: `parse_sources(to_spec(s))` gives `s` back (data_dir aside)."""
    k, arg = source.kind, source.path
    if k == SourceKind.STDLIB:
        body = f"stdlib:{source.split}"
    elif k == SourceKind.TEXT:
        body = f"{'text' if source.text_unit == TextUnit.FILE else 'lines'}:{arg}"
    elif k == SourceKind.JSONL:
        body = f"jsonl:{arg}#{source.field}"
    elif k == SourceKind.PRETOKENIZED:
        body = f"pretokenized:{arg}"
    elif k == SourceKind.CHAT_JSONL:
        body = f"chat_jsonl:{arg}#{source.messages_field}:{source.loss_mask.value}"
    elif k == SourceKind.PROMPT_COMPLETION:
        body = f"prompt_completion:{arg}#{source.prompt_field}:{source.completion_field}"
    else:
        body = f"tfds:{source.name}:{source.split}"
    return f"{source.weight:g}*{body}" if with_weight else body


def _parse_one(part: str, default_split: str, data_dir: str | None, where: str) -> SourceConfig:
    weight, body = 1.0, part
    head, star, tail = part.partition("*")
    if star and ":" not in head:  # "0.7*text:a.txt"; a glob's "*" comes after "KIND:"
        try:
            weight = float(head)
        except ValueError:
            raise input_error(where, f"weight {head!r} is not a number", "WEIGHT*KIND:ARG, e.g. 0.7*text:a.txt",
                              part) from None
        if not weight > 0:
            raise input_error(where, "a weight must be > 0", "WEIGHT > 0", part)
        body = tail.strip()
    kind, colon, arg = body.partition(":")
    if kind not in KINDS:
        raise input_error(where, f"unknown source kind {kind!r}", SYNTAX, part)
    if kind != "stdlib" and (not colon or not arg):
        raise input_error(where, f"{kind}: needs {'a NAME' if kind == 'tfds' else 'a PATH'}", SYNTAX, part)
    try:
        return _source(kind, arg, weight, default_split, data_dir)
    except DataError as e:
        raise input_error(where, f"{part}: {e}") from None


def _source(kind: str, arg: str, weight: float, default_split: str, data_dir: str | None) -> SourceConfig:
    if kind == "stdlib":
        split = arg or ("train" if default_split == "train" else "eval")
        return SourceConfig(kind=SourceKind.STDLIB, split=split, weight=weight)
    if kind in ("text", "lines"):
        unit = TextUnit.FILE if kind == "text" else TextUnit.LINE
        return SourceConfig(kind=SourceKind.TEXT, path=arg, text_unit=unit, weight=weight)
    if kind == "jsonl":
        path, _, field = arg.partition("#")
        return SourceConfig(kind=SourceKind.JSONL, path=path, field=field or "text", weight=weight)
    if kind == "pretokenized":
        return SourceConfig(kind=SourceKind.PRETOKENIZED, path=arg, weight=weight)
    if kind == "chat_jsonl":
        path, _, rest = arg.partition("#")
        field, _, mask = rest.partition(":")
        return SourceConfig(kind=SourceKind.CHAT_JSONL, path=path, messages_field=field or "messages",
                            loss_mask=mask or LossMask.ASSISTANT, weight=weight)
    if kind == "prompt_completion":
        path, hash_, rest = arg.partition("#")
        prompt, colon, completion = rest.partition(":")
        if hash_ and not (prompt and colon and completion):
            raise DataError(f"give both keys as #PROMPT:COMPLETION, got #{rest}")
        return SourceConfig(kind=SourceKind.PROMPT_COMPLETION, path=path, prompt_field=prompt or "prompt",
                            completion_field=completion or "completion", weight=weight)
    name, _, split = arg.partition(":")
    return SourceConfig(kind=SourceKind.TFDS, name=name, split=split or default_split, data_dir=data_dir,
                        weight=weight)
