"""Rolling perplexity: every token of every document scored exactly once.

A document's tokens are cut into windows of the model's context. The first window is
conditioned on bos; each later one (disjoint by default) on the token before it, or with
`stride` < context, on the `context - stride` tokens before it, as in lm-evaluation-harness's
`get_rolling_token_windows` + `make_disjoint_window` (stride None). Reports token
perplexity, bits per byte and word perplexity (words: whitespace-separated, as the
harness counts them for WikiText).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Iterable, Sequence

from llama_jax.data import spec as spec_lib
from llama_jax.data.config import DataError, SourceConfig


def rolling_windows(tokens: Sequence[int], bos: int, max_length: int,
                    stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs whose continuations tile `tokens` exactly once.

    Each pair fits the model: len(context) + len(continuation) <= max_length + 1.
    """
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, {max_length}], got {stride}")
    full = [bos] + list(tokens)  # predicting full[p] needs full[:p]
    out, p, q = [], 1, min(1 + max_length, len(full))
    while p < len(full):
        start = max(0, q - 1 - max_length)
        out.append((full[start:p], full[p:q]))
        p, q = q, min(q + stride, len(full))
    return out


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity."""
    return len(re.split(r"\s+", text))


def _exp(x: float) -> float:
    """exp, with inf past float range: a few words carrying many tokens (undecodable bytes,
    each its own token) give a word perplexity beyond 1e308, not an OverflowError."""
    return math.exp(x) if x < 709.0 else math.inf


@dataclasses.dataclass
class PerplexityResult:
    loglikelihood: float = 0.0  # natural log, summed over all scored tokens
    tokens: int = 0
    bytes: int = 0
    words: int = 0
    documents: int = 0

    def add(self, text: str, n_tokens: int, ll: float) -> None:
        self.loglikelihood += ll
        self.tokens += n_tokens
        self.bytes += len(text.encode("utf-8"))
        self.words += count_words(text)
        self.documents += 1

    def metrics(self) -> dict:
        """token_perplexity, bits_per_byte, word_perplexity and the counts behind them."""
        nll = -self.loglikelihood
        if not self.tokens:
            raise DataError("perplexity: no tokens to score (an empty corpus?); a perplexity of nothing is not 1")
        return {"token_perplexity": _exp(nll / self.tokens),
                "bits_per_byte": nll / max(self.bytes, 1) / math.log(2),
                "word_perplexity": _exp(nll / max(self.words, 1)),
                "loglikelihood": self.loglikelihood, "tokens": self.tokens, "bytes": self.bytes,
                "words": self.words, "documents": self.documents}


def perplexity(scorer, tokenizer, documents: Iterable[str], *, stride: int | None = None,
               chunk_documents: int = 64, progress: Callable[[int], None] | None = None) -> dict:
    """Rolling perplexity of `documents` (an iterable of str) under `scorer` (a Scorer).

    Documents are scored `chunk_documents` at a time so that windows of different
    documents share batches. `progress(n)` is called with the number of documents done.
    """
    result, chunk = PerplexityResult(), []

    def flush():
        requests, owners = [], []
        for d, (text, ids) in enumerate(chunk):
            for pair in rolling_windows(ids, tokenizer.bos_id, scorer.max_length, stride):
                requests.append(pair)
                owners.append(d)
        lls = [0.0] * len(chunk)
        for d, (ll, _) in zip(owners, scorer.loglikelihood(requests)):
            lls[d] += ll
        for (text, ids), ll in zip(chunk, lls):
            result.add(text, len(ids), ll)
        if progress is not None:
            progress(len(chunk))
        chunk.clear()

    for text in documents:
        ids = tokenizer.encode(text, bos=False)
        if ids:  # an empty document has nothing to score
            chunk.append((text, ids))
        if len(chunk) >= chunk_documents:
            flush()
    if chunk:
        flush()
    return result.metrics()


def parse_source(spec: str, data_dir: str | None = None) -> SourceConfig:
    """One source in `llama_jax.data.spec`'s syntax (train.py's too): `stdlib[:split]`,
    `text:PATH`, `lines:PATH`, `jsonl:PATH[#field]`, `pretokenized:DIR`, `tfds:NAME[:split]`
    (split default "test"; stdlib's "eval"; TFDS reads `data_dir`)."""
    return spec_lib.parse_source(spec, "test", data_dir, where="perplexity source")
