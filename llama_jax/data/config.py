"""Data configuration: which sources, in which proportions, read how.

Plain frozen dataclasses so a trainer can build them in code or from an
ml_collections ConfigDict (`DataConfig.from_dict`). Validation happens once here,
never in the per-document hot path.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping


class DataError(ValueError):
    """A data problem the user must fix: missing file or dataset, empty corpus, bad key."""


class SourceKind(enum.Enum):
    STDLIB = "stdlib"              # the Python standard library's own source (always present)
    TEXT = "text"                  # local text files (path, directory or glob)
    JSONL = "jsonl"                # local JSON-lines files, one document per line under `field`
    TFDS = "tfds"                  # tensorflow-datasets by name and split
    PRETOKENIZED = "pretokenized"  # array_record shards written by `pretokenize`
    CHAT_JSONL = "chat_jsonl"      # fine-tuning: JSON lines {"messages": [{"role", "content"}, ...]}
    PROMPT_COMPLETION = "prompt_completion"  # fine-tuning: JSON lines {"prompt": ..., "completion": ...}


# Fine-tuning kinds: their documents carry a loss mask (data/sft.py) and are packed whole.
SFT_KINDS = frozenset({SourceKind.CHAT_JSONL, SourceKind.PROMPT_COMPLETION})
_FILE_KINDS = (SourceKind.TEXT, SourceKind.JSONL, SourceKind.PRETOKENIZED) + tuple(SFT_KINDS)


class LossMask(enum.Enum):
    """Which tokens of a chat_jsonl dialog are trained: the assistant's answers (content and
    end of turn), never system/user/tool/header tokens."""
    ASSISTANT = "assistant"            # every assistant turn
    LAST_ASSISTANT = "last_assistant"  # only the dialog's last assistant turn


class TextUnit(enum.Enum):
    FILE = "file"   # a whole file is one document
    LINE = "line"   # each non-empty line is one document


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    kind: SourceKind = SourceKind.STDLIB
    path: str = ""            # TEXT / JSONL / PRETOKENIZED: a file, a directory or a glob
    name: str = ""            # TFDS: dataset name, e.g. "c4/en" or "lm1b"
    split: str = "train"      # TFDS split; STDLIB: "train" or "eval" (held-out ~1% of files)
    field: str = "text"       # JSONL key or TFDS feature holding the text
    data_dir: str | None = None  # TFDS data_dir (None: TFDS's default)
    text_unit: TextUnit = TextUnit.FILE
    weight: float = 1.0       # sampling weight in a mixture (by documents)
    messages_field: str = "messages"      # CHAT_JSONL: the key holding the dialog
    prompt_field: str = "prompt"          # PROMPT_COMPLETION: the key of the prompt
    completion_field: str = "completion"  # PROMPT_COMPLETION: the key of the completion
    loss_mask: LossMask = LossMask.ASSISTANT  # CHAT_JSONL: all assistant turns or the last

    def __post_init__(self):
        object.__setattr__(self, "kind", SourceKind(self.kind))
        object.__setattr__(self, "text_unit", TextUnit(self.text_unit))
        try:
            object.__setattr__(self, "loss_mask", LossMask(self.loss_mask))
        except ValueError:
            raise DataError(f"SourceConfig.loss_mask must be one of {[m.value for m in LossMask]}, "
                            f"got {self.loss_mask!r}") from None
        if self.weight <= 0:
            raise DataError(f"SourceConfig.weight must be > 0, got {self.weight} for {self.describe()}")
        if self.kind in _FILE_KINDS and not self.path:
            raise DataError(f"SourceConfig(kind={self.kind.value}) needs `path` (file, directory or glob)")
        if self.kind == SourceKind.TFDS and not self.name:
            raise DataError("SourceConfig(kind=tfds) needs `name`, e.g. 'c4/en'")
        if self.kind == SourceKind.STDLIB and self.split not in ("train", "eval"):
            raise DataError(f"SourceConfig(kind=stdlib).split must be 'train' or 'eval', got {self.split!r}")

    def describe(self) -> str:
        """A short human name used in errors and logs."""
        if self.kind == SourceKind.TFDS:
            return f"tfds:{self.name}[{self.split}]"
        if self.kind == SourceKind.STDLIB:
            return f"stdlib[{self.split}]"
        return f"{self.kind.value}:{self.path}"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    sources: tuple[SourceConfig, ...] = (SourceConfig(),)
    shuffle: bool = True
    num_epochs: int | None = None   # None: repeat forever (training); 1: one pass (eval)
    read_threads: int = 2           # threads tokenizing documents in parallel
    prefetch_buffer: int = 256      # documents read ahead per process

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        if not self.sources:
            raise DataError("DataConfig.sources is empty: give at least one source")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise DataError(f"DataConfig.num_epochs must be None or > 0, got {self.num_epochs}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataConfig":
        """Builds a DataConfig from a dict or ConfigDict (sources as a list of dicts)."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DataError(f"DataConfig: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        src_known = {f.name for f in dataclasses.fields(SourceConfig)}
        sources = []
        for i, s in enumerate(d.pop("sources", ({},))):
            s = dict(s)
            bad = set(s) - src_known
            if bad:
                raise DataError(f"DataConfig.sources[{i}]: unknown keys {sorted(bad)}; known: {sorted(src_known)}")
            sources.append(SourceConfig(**s))
        return cls(sources=tuple(sources), **d)


def paper_mixture(root: str) -> DataConfig:
    """The LLaMA paper's mixture (Table 1 sampling proportions) as an example config.

    C4 and Wikipedia come from TFDS; the others from JSONL files under `root`
    (TFDS has no builder for them).
    """
    def jsonl(name, w):
        return SourceConfig(kind=SourceKind.JSONL, path=f"{root}/{name}/*.jsonl", weight=w)

    return DataConfig(sources=(
        jsonl("commoncrawl", 0.67),
        SourceConfig(kind=SourceKind.TFDS, name="c4/en", split="train", weight=0.15),
        jsonl("github", 0.045),
        SourceConfig(kind=SourceKind.TFDS, name="wikipedia/20230601.en", split="train", weight=0.045),
        jsonl("books", 0.045),
        jsonl("arxiv", 0.025),
        jsonl("stackexchange", 0.02),
    ))
