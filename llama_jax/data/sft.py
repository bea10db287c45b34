"""Fine-tuning (SFT) data: JSON-lines examples as token ids plus a per-token loss weight.

Two source kinds, one example a line:
- `chat_jsonl`: `{"messages": [{"role", "content"}, ...]}` (key: `messages_field`), the
  dialog ending with the assistant's answer. It is written in the chat format of the
  tokenizer's family (`llama_jax.data.chat_format`, Meta's layouts) and weighted 1 on what the
  model must produce: each assistant turn's content and its end-of-turn token (LLaMA 2 eos,
  LLaMA 3 <|eot_id|>), never system, user, tool or header tokens. `loss_mask`: every
  assistant turn (default) or only the last.
- `prompt_completion`: `{"prompt": ..., "completion": ...}` (keys: `prompt_field`,
  `completion_field`). As TRL's prompt-completion datasets: plain text is a plain
  concatenation, `bos + encode(prompt) + encode(completion) + eos` (each part tokenized
  alone, so the boundary is a token boundary), weighted 1 on the completion and eos; a
  conversational prompt (a list of messages) goes through the chat format with the
  completion (a string, or a list holding one assistant message) as the assistant's answer,
  weighted 1 on that answer only.

Truncation: an example longer than a packed row (seq_len + 1 tokens) keeps its last
seq_len + 1 tokens (the prompt loses its start first; the answer's end is always kept),
is counted in `PipelineStats.truncated_documents` (`truncated_examples`: which ones), and the
first one logs a warning naming its file:line.
Bad rows raise one DataError naming `file:line` and the key or message.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import numpy as np

from llama_jax.data.config import DataError, LossMask, SourceConfig, SourceKind, TextUnit
from llama_jax.data import chat_format as chat
from llama_jax.data.sources import FileSource
from llama_jax.errors import InputError, input_error


@dataclasses.dataclass(frozen=True)
class SftExample:
    """One parsed row: `body` is the messages list (CHAT_JSONL) or (prompt, completion)."""
    kind: SourceKind
    body: Any
    loss_mask: LossMask
    path: str
    offset: int  # byte offset of the line; its line number is counted only for errors

    @property
    def text(self) -> str:
        """The example's strings, one per line (to train a tokenizer on)."""
        def strings(x):
            if isinstance(x, str):
                yield x
            elif isinstance(x, Mapping):
                yield from strings(x.get("content"))
            elif isinstance(x, (list, tuple)):
                for y in x:
                    yield from strings(y)
        return "\n".join(strings(self.body))

    @property
    def where(self) -> str:
        return _where(self.path, self.offset)


class SftSource:
    """Random access over fine-tuning JSON lines; items are `SftExample`s (tokenized later,
    by `encode_example`, in the pipeline's tokenize map)."""

    def __init__(self, paths: list[str], cfg: SourceConfig):
        self._lines = FileSource(paths, SourceKind.TEXT, TextUnit.LINE, name=cfg.describe())
        self.name, self._cfg = cfg.describe(), cfg

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, i: int) -> SftExample:
        text, path, offset = self._lines.line_at(i)
        cfg = self._cfg
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{_where(path, offset)}: not valid JSON: {e}") from None
        keys = ((cfg.messages_field,) if cfg.kind == SourceKind.CHAT_JSONL
                else (cfg.prompt_field, cfg.completion_field))
        if not isinstance(record, dict) or not all(k in record for k in keys):
            has = sorted(record) if isinstance(record, dict) else type(record).__name__
            missing = [k for k in keys if not isinstance(record, dict) or k not in record]
            raise DataError(f"{_where(path, offset)}: no field {missing[0]!r}; the record has {has}")
        body = record[keys[0]] if len(keys) == 1 else tuple(record[k] for k in keys)
        return SftExample(cfg.kind, body, cfg.loss_mask, path, offset)

    def __repr__(self):
        return f"SftSource({self.name!r}, {len(self)} examples)"


def _where(path: str, offset: int) -> str:
    """`path:line` of the line starting at byte `offset` (counted on demand: errors, warnings)."""
    with open(path, "rb") as f:
        line = f.read(offset).count(b"\n") + 1
    return f"{path}:{line}"


def encode_example(tokenizer, ex: SftExample) -> tuple[np.ndarray, np.ndarray]:
    """(ids, weights), int32 each of one length: weight 1 on the tokens to train on.
    Raises DataError naming the example's file:line."""
    try:
        if ex.kind == SourceKind.CHAT_JSONL:
            pieces = chat_pieces(tokenizer, ex.body, ex.loss_mask)
        else:
            pieces = prompt_completion_pieces(tokenizer, *ex.body)
    except InputError as e:
        raise DataError(f"{ex.where}: {e}") from None
    ids = np.asarray([i for p, _ in pieces for i in p], np.int32)
    weights = np.asarray([w for p, w in pieces for _ in p], np.int32)
    return ids, weights


def chat_pieces(tokenizer, messages, loss_mask: LossMask = LossMask.ASSISTANT) -> list[tuple[list[int], int]]:
    """A dialog ending with the assistant as (ids, weight) pieces whose concatenation is
    `encode_dialog(messages[:-1]) + encode_answer(messages[-1]["content"])`."""
    if not isinstance(messages, list) or not messages:
        raise input_error("messages", "a dialog is a non-empty list of {'role', 'content'} dicts",
                          got=f"{type(messages).__name__}{'' if messages else ' (empty)'}")
    last = messages[-1]
    if not isinstance(last, Mapping) or last.get("role") != "assistant":
        got = last.get("role") if isinstance(last, Mapping) else type(last).__name__
        raise input_error(f"messages[{len(messages) - 1}]", "a training dialog ends with the assistant's answer",
                          "role 'assistant'", got)
    # Checked whole first, so that an error names the message by its index in the row (the
    # turns below are encoded piece by piece, each counting its messages from 0).
    chat.check_training_dialog(tokenizer, messages)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    pieces, start = [], 0
    for a in answers:
        context = messages[start:a]
        pieces.append((chat.encode_dialog(tokenizer, context) if start == 0
                       else chat.encode_next_turn(tokenizer, context), 0))
        train = loss_mask is LossMask.ASSISTANT or a == answers[-1]
        pieces.append((chat.encode_answer(tokenizer, messages[a]["content"]), int(train)))
        start = a + 1
    return pieces


def prompt_completion_pieces(tokenizer, prompt, completion) -> list[tuple[list[int], int]]:
    """(ids, weight) pieces of a prompt-completion row (see the module docstring)."""
    if isinstance(prompt, list):  # conversational, as TRL's {"prompt": [messages], "completion": [...]}
        if isinstance(completion, list):
            if len(completion) != 1 or not isinstance(completion[0], Mapping) \
                    or completion[0].get("role") != "assistant":
                raise input_error("completion", "a conversational completion is one assistant message",
                                  got=json.dumps(completion)[:80])
            completion = completion[0].get("content")
        if not isinstance(completion, str):
            raise input_error("completion", "not a string", "a string", type(completion).__name__)
        return chat_pieces(tokenizer, prompt + [{"role": "assistant", "content": completion}],
                           LossMask.LAST_ASSISTANT)
    for key, v in (("prompt", prompt), ("completion", completion)):
        if not isinstance(v, str):
            raise input_error(key, "not a string", "a string (or, conversational, a list of messages)",
                              type(v).__name__)
    return [([tokenizer.bos_id] + tokenizer.encode(prompt, bos=False), 0),
            (tokenizer.encode(completion, bos=False) + [tokenizer.eos_id], 1)]
