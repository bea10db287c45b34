"""LLaMA 3's tokenizer: a tiktoken BPE (`tokenizer.model` = lines of `base64(token_bytes) rank`,
128000 ranks) plus 256 special tokens after the ranks, as in Meta's llama3 reference;
and `load_tokenizer(path)`, which picks this or the SentencePiece `Tokenizer` from the file.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
from typing import Iterator, Sequence

from llama_jax.data.config import DataError
from llama_jax.data.tokenizer import Tokenizer, read_model_file

# LLaMA 3's pre-tokenizer split (the cl100k pattern): contractions, letter runs with one
# leading non-letter, up to 3 digits, punctuation runs, newlines, other whitespace.
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
           r"|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+"
           r"|\s+(?!\S)"
           r"|\s+")
NUM_SPECIAL_TOKENS = 256
# Meta's order; ids are n_ranks + index (128000.. for the released 128000-rank file).
# Llama 3.1 named five of Llama 3.0's reserved tokens (meta-llama/llama-models, commit
# 1f0feb7, models/llama3_1/api/tokenizer.py): 128004 <|finetune_right_pad_id|>, 128005
# <|step_id|>, 128008 <|eom_id|> (end of message: a tool call awaits its result), 128010
# <|python_tag|>, and renumbered the rest <|reserved_special_token_2..246|>. One file
# serves every Llama 3.x, so we use the 3.1 names for all of them: every id, and the text of
# every token Llama 3.0 uses, stay as they were (3.0's list: SPECIAL_TOKENS_LLAMA3_0).
_NAMED = ["<|begin_of_text|>", "<|end_of_text|>",
          "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
          "<|finetune_right_pad_id|>", "<|step_id|>",
          "<|start_header_id|>", "<|end_header_id|>",
          "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
SPECIAL_TOKENS = _NAMED + [f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_NAMED))]
# meta-llama/llama3, llama/tokenizer.py (Llama 3.0).
SPECIAL_TOKENS_LLAMA3_0 = ([
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
    "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, NUM_SPECIAL_TOKENS - 5)])
assert len(SPECIAL_TOKENS) == len(SPECIAL_TOKENS_LLAMA3_0) == NUM_SPECIAL_TOKENS

# tiktoken is slow (or overflows its stack) on huge strings and on huge runs of only
# whitespace / only non-whitespace: Meta's reference encodes in bounded pieces.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"\s{{{_MAX_RUN_CHARS + 1},}}|\S{{{_MAX_RUN_CHARS + 1},}}")
_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+")


def parse_ranks(data: bytes, path: str = "<in-memory>") -> dict[bytes, int]:
    """{token bytes: rank} of a tiktoken BPE file (the format `tiktoken.load_tiktoken_bpe`
    reads; parsed here because that caches local files by path name, so an edited file
    at the same path would load stale)."""
    ranks = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise DataError(f"{path}:{n}: not a tiktoken BPE line (base64 token, space, rank): "
                            f"{line[:80]!r}") from None
    if not ranks:
        raise DataError(f"{path}: empty tiktoken BPE file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError(f"{path}: tiktoken ranks must be 0..{len(ranks) - 1}, each once")
    return ranks


class Llama3Tokenizer:
    """LLaMA 3's tiktoken BPE with `Tokenizer`'s interface: bos <|begin_of_text|> = n_ranks
    (128000), eos <|end_of_text|> = n_ranks + 1, eot <|eot_id|> = n_ranks + 9, eom
    <|eom_id|> = n_ranks + 8 (3.1 on), no pad (-1), vocab_size = n_ranks + 256. Special-token text inside `encode`'s input is plain text."""

    def __init__(self, model_path: str | None = None, *, model_bytes: bytes | None = None):
        import tiktoken
        model_bytes = read_model_file(model_path) if model_bytes is None else model_bytes
        self.path = model_path or "<in-memory>"
        self._bytes = model_bytes
        ranks = parse_ranks(model_bytes, self.path)
        self.n_ranks = len(ranks)
        self.special_tokens = {t: self.n_ranks + i for i, t in enumerate(SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(name=os.path.basename(self.path), pat_str=PAT_STR,
                                      mergeable_ranks=ranks, special_tokens=self.special_tokens)

    # Picklable (grain worker processes) by the file's bytes, like Tokenizer by its proto.
    def __getstate__(self):
        return {"path": self.path, "bytes": self._bytes}

    def __setstate__(self, state):
        self.__init__(model_bytes=state["bytes"])
        self.path = state["path"]

    @property
    def vocab_size(self) -> int:
        return self.n_ranks + NUM_SPECIAL_TOKENS

    @property
    def bos_id(self) -> int:
        return self.special_tokens["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        return self.special_tokens["<|end_of_text|>"]

    @property
    def eot_id(self) -> int:
        return self.special_tokens["<|eot_id|>"]

    @property
    def eom_id(self) -> int:
        return self.special_tokens["<|eom_id|>"]

    @property
    def pad_id(self) -> int:
        return -1

    @property
    def unk_id(self) -> int:
        return -1  # byte-level BPE: every text encodes, nothing is unknown

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, with bos first / eos last when asked (prompts: bos only)."""
        ids = [self.bos_id] if bos else []
        for i in range(0, len(text), _MAX_ENCODE_CHARS):
            for piece in _bounded_runs(text[i:i + _MAX_ENCODE_CHARS], _MAX_RUN_CHARS):
                ids += self._enc.encode(piece, allowed_special=set(), disallowed_special=())
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; bos/eos/pad are dropped (other special tokens decode as their text)."""
        return self._enc.decode([int(i) for i in ids if int(i) not in (self.bos_id, self.eos_id, -1)])

    def id_to_piece(self, i: int) -> str:
        return self._enc.decode_single_token_bytes(int(i)).decode("utf-8", errors="replace")

    def __repr__(self):
        return f"Llama3Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _bounded_runs(s: str, max_run: int) -> Iterator[str]:
    """`s` cut so no piece holds more than `max_run` consecutive whitespace or
    consecutive non-whitespace characters (Meta's guard against slow encodes)."""
    if max_run == _MAX_RUN_CHARS and not _LONG_RUN.search(s):
        yield s  # the usual case, without a Python loop over every character
        return
    start, run, prev_space = 0, 0, None
    for j, c in enumerate(s):
        space = c.isspace()
        run = run + 1 if space == prev_space else 1
        prev_space = space
        if run > max_run:
            yield s[start:j]
            start, run = j, 1
    yield s[start:]


def is_tiktoken_file(path: str) -> bool:
    """Whether the file's first line is `base64 rank` (a tiktoken BPE file)."""
    with open(path, "rb") as f:
        first = f.readline(4096).rstrip(b"\r\n")
    if not _LINE.fullmatch(first):
        return False
    try:
        base64.b64decode(first.split()[0], validate=True)
    except binascii.Error:
        return False
    return True


def load_tokenizer(path: str) -> Tokenizer | Llama3Tokenizer:
    """The tokenizer in `path`: a LLaMA 3 tiktoken BPE file or a SentencePiece model (LLaMA 1/2)."""
    if not path or not os.path.isfile(path):
        raise DataError(f"tokenizer model not found: {path!r}")
    if is_tiktoken_file(path):
        return Llama3Tokenizer(path)
    try:
        return Tokenizer(path)
    except DataError:
        raise DataError(f"{path}: neither a SentencePiece model (LLaMA 1/2) nor a tiktoken BPE file "
                        f"(LLaMA 3: lines of 'base64_token rank')") from None
