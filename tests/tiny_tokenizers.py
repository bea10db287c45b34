"""Tiny tokenizers for the chat and fine-tuning tests, built once here: a SentencePiece model
(LLaMA 2's kind) trained on a few stdlib files plus the chat markup, and a tiktoken BPE file
(LLaMA 3's kind) of the 256 bytes and a few merges, so that chat words are single tokens."""
import base64
import glob
import os

import pytest

from llama_jax.data import Llama3Tokenizer, train_tokenizer

MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"\n\n", b"us", b"er",
          b"user", b"as", b"sist", b"ant", b"assist", b"assistant", b"sy", b"stem", b"system", b" t", b"urn"]
MARKUP = "[INST] <<SYS>> <</SYS>> [/INST] "


def sentencepiece(directory, vocab_size, extra_texts=(MARKUP + "hello world",) * 20):
    """A SentencePiece tokenizer trained on json/*.py of the stdlib and `extra_texts`."""
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "json", "*.py")))
    texts = [open(f).read() for f in files] + list(extra_texts)
    return train_tokenizer(texts, vocab_size, str(directory / "tokenizer.model"))


def tiktoken(directory, merges=MERGES):
    """A Llama3Tokenizer whose ranks are the 256 bytes, then `merges` in order."""
    path = directory / "tokenizer.model"
    with open(path, "w") as f:
        for rank, t in enumerate([bytes([b]) for b in range(256)] + merges):
            f.write(f"{base64.b64encode(t).decode()} {rank}\n")
    return Llama3Tokenizer(str(path))


def fixtures(sp_vocab_size, extra_texts=(MARKUP + "hello world",) * 20, merges=MERGES):
    """Module-scoped `sp` and `tik` fixtures: `sp, tik = tiny_tokenizers.fixtures(600)` in a test module."""
    @pytest.fixture(scope="module")
    def sp(tmp_path_factory):
        return sentencepiece(tmp_path_factory.mktemp("sp"), sp_vocab_size, extra_texts)

    @pytest.fixture(scope="module")
    def tik(tmp_path_factory):
        return tiktoken(tmp_path_factory.mktemp("tik"), merges)

    return sp, tik
