"""Generated ids to text, in the context of what came before them.

Decoding new ids on their own loses text that depends on their left context: SentencePiece
drops the space of the first piece ("▁Austral" -> "Austral", as at the start of a text),
and a character whose UTF-8 bytes are split over tokens comes out as U+FFFD. So the new
ids are decoded after the last few ids before them and the text of those is cut off
(`continuation`); a stream (`TextDecoder`) holds back tokens while they end in an
unfinished character, so that its pieces join to exactly `continuation` of all the ids.
A tokenizer here is anything with `decode(ids) -> str` (ours drop bos/eos). Ids at or past
its `vocab_size` (a model whose vocabulary is padded past its tokenizer's) have no text.
"""
from __future__ import annotations

from typing import Sequence

# Ids of left context used: decoding is local (a piece's text depends on its neighbours
# only through the start of the text and UTF-8 characters of at most 4 byte tokens).
CONTEXT_TOKENS = 8
_UNFINISHED = "\ufffd"


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _with_text(tokenizer, ids: Sequence[int]) -> list[int]:
    """`ids` without those the tokenizer has no piece for (they would raise in sentencepiece)."""
    n = getattr(tokenizer, "vocab_size", None)
    return [int(i) for i in ids if n is None or 0 <= int(i) < n]


def continuation(tokenizer, context: Sequence[int], ids: Sequence[int]) -> str:
    """The text `ids` add after `context` (its last CONTEXT_TOKENS ids are used)."""
    context = _with_text(tokenizer, context)[-CONTEXT_TOKENS:]
    head = tokenizer.decode(context)
    full = tokenizer.decode(context + _with_text(tokenizer, ids))
    return full[_common_prefix(head, full):]


class TextDecoder:
    """Text pieces of ids that arrive one by one after `context` (e.g. the prompt's ids)."""

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.context = [int(i) for i in context][-CONTEXT_TOKENS:]
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        """The new text once `token` is added ("" while it ends in an unfinished character)."""
        self.pending.append(int(token))
        text = continuation(self.tokenizer, self.context, self.pending)
        if text.endswith(_UNFINISHED):
            return ""
        self.context = (self.context + self.pending)[-CONTEXT_TOKENS:]
        self.pending = []
        return text

    def flush(self) -> str:
        """What is held back (an unfinished character decodes as U+FFFD)."""
        text = continuation(self.tokenizer, self.context, self.pending) if self.pending else ""
        self.context = (self.context + self.pending)[-CONTEXT_TOKENS:]
        self.pending = []
        return text


def decode_continuation(tokenizer, context: Sequence[int], ids: Sequence[int]) -> str:
    """The text of `ids` after `context`, exactly as a TextDecoder streams it."""
    decoder = TextDecoder(tokenizer, context)
    return "".join(decoder.push(t) for t in ids) + decoder.flush()
