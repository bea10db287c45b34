"""What the command-line scripts share: one flag style, one-line errors, quiet logs.

Imported by the repo-root scripts and `python -m llama_jax generate` only (the library never
parses argv). Nothing here imports jax, so `--help` stays fast: scripts import their heavy
modules after parsing.

Flags are spelled with hyphens (`--max-new-tokens`); the underscore spelling
(`--max_new_tokens`) is accepted as an alias, so older commands keep working.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import sys
from llama_jax.errors import input_error


class ArgumentParser(argparse.ArgumentParser):
    """argparse with hyphen/underscore aliases and errors raised as one-line `InputError`s."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._canonical(args), namespace)

    def _canonical(self, args: list[str]) -> list[str]:
        known = {s for a in self._actions for s in a.option_strings}
        out = []
        for a in args:
            name, eq, value = a.partition("=")
            alias = "--" + name[2:].replace("_", "-")
            if a.startswith("--") and name not in known and alias in known:
                a = alias + eq + value
            out.append(a)
        return out

    def error(self, message):
        flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        hint = ""
        if message.startswith("unrecognized arguments:"):
            words = [w.split("=")[0] for w in message.split(":", 1)[1].split() if w.startswith("-")]
            close = [m for w in words for m in difflib.get_close_matches(w.replace("_", "-"), flags, 1)]
            hint = f"; did you mean {', '.join(close)}?" if close else f"; see {self.prog} --help"
        raise input_error(None, message + hint)  # "argument --x: ..." names the flag


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
    return v


def check_sampling_flags(a: argparse.Namespace) -> None:
    """`--temperature` and `--top-p`, as `generate` and `chat` both take them: one-line errors."""
    if not a.temperature >= 0:  # also nan
        raise input_error("--temperature", "out of range (0: greedy)", ">= 0", a.temperature)
    if not 0 < a.top_p <= 1:
        raise input_error("--top-p", "out of range", "0 < top_p <= 1", a.top_p)


# Messages Orbax logs (through absl) on every conversion or load that say nothing to a user:
# small chunks in tiny models, the numpy-only handler registry, no OCDBT subdirs to merge.
_BENIGN = ("Setting the target_byte_size too small", "ArrayMetadata persistence is disabled",
           "Skipping merge of OCDBT checkpoints", "Variant folder")


class _DropBenign(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not any(b in msg for b in _BENIGN)


def quiet_logs() -> None:
    """For CLIs: absl/Orbax/jax INFO lines off, known benign warnings dropped. Call it in a
    script's main, never at import (the library sets no logging state of its own)."""
    for name in ("absl", "jax", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    absl = logging.getLogger("absl")
    if not any(isinstance(f, _DropBenign) for f in absl.filters):
        absl.addFilter(_DropBenign())
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass
