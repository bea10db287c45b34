"""SentencePiece tokenizer: load LLaMA's `tokenizer.model`, or train one with the paper's
recipe (BPE, digits split, byte fallback), and check it against a model's vocabulary.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

from llama_jax.data.config import DataError

log = logging.getLogger(__name__)


def read_model_file(model_path: str | None) -> bytes:
    """The bytes of a tokenizer model file, or a DataError naming the missing path."""
    if not model_path or not os.path.isfile(model_path):
        raise DataError(f"tokenizer model not found: {model_path!r}")
    with open(model_path, "rb") as f:
        return f.read()


class Tokenizer:
    """A SentencePiece model. LLaMA's: unk 0, bos 1, eos 2, no pad (pad_id -1)."""

    def __init__(self, model_path: str | None = None, *, model_proto: bytes | None = None):
        import sentencepiece as spm
        model_proto = read_model_file(model_path) if model_proto is None else model_proto
        self.path = model_path or "<in-memory>"
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises bare RuntimeError/OSError
            raise DataError(f"{self.path}: not a SentencePiece model ({e})") from None

    # Picklable (grain worker processes) by its serialized proto, not by a file path.
    def __getstate__(self):
        return {"path": self.path, "proto": self._proto}

    def __setstate__(self, state):
        self.__init__(model_proto=state["proto"])
        self.path = state["path"]

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, with bos first / eos last when asked (prompts: bos only)."""
        ids = self._sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; bos/eos/pad are dropped."""
        ids = [int(i) for i in ids if int(i) not in (self.bos_id, self.eos_id, -1)]
        return self._sp.DecodeIds(ids)

    def id_to_piece(self, i: int) -> str:
        return self._sp.IdToPiece(int(i))

    def __repr__(self):
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raises DataError when the tokenizer emits ids the model's embedding cannot hold."""
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"tokenizer {tokenizer.path!r} has vocab_size {tokenizer.vocab_size} but the model's "
            f"vocab_size is {model_vocab_size}: expected tokenizer.vocab_size <= model vocab_size")
    if tokenizer.vocab_size < model_vocab_size:
        log.info("tokenizer vocab %d < model vocab %d: the extra embedding rows stay unused",
                 tokenizer.vocab_size, model_vocab_size)
