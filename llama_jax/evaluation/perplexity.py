"""Rolling perplexity: every token of every document scored exactly once.

A document's tokens are cut into windows of the model's context. The first window is
conditioned on bos; each later one (disjoint by default) on the token before it, or with
`stride` < context, on the `context - stride` tokens before it, as in lm-evaluation-harness's
`get_rolling_token_windows` + `make_disjoint_window` (stride None). Reports token
perplexity, bits per byte and word perplexity (words: whitespace-separated, as the
harness counts them for WikiText). Pretokenized documents (token ids) are scored as they
are; their bits per byte and word perplexity come from the decoded text when it encodes
back to the same ids, else they are None ("not available"). Fine-tuning examples
(`chat_jsonl`, `prompt_completion`) are encoded as training encodes them and only their
loss-masked tokens (the answers, the completion) are scored, each conditioned on all that
comes before it in its window, prompts included: the perplexity of the answers.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Iterable, Sequence

from llama_jax.data import spec as spec_lib
from llama_jax.data.config import DataError, SourceConfig
from llama_jax.data.sft import SftExample, encode_example


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


def masked_requests(tokens: Sequence[int], mask: Sequence[int], bos: int, max_length: int,
                    stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score exactly the tokens whose mask is nonzero, each
    with the context `rolling_windows` gives it: a window's continuation is cut into its
    masked runs, every run conditioned on the window's context and the tokens before it."""
    out, p = [], 0
    for context, cont in rolling_windows(tokens, bos, max_length, stride):
        keep = [bool(w) for w in mask[p:p + len(cont)]] + [False]
        start = None
        for i, k in enumerate(keep):
            if k and start is None:
                start = i
            elif not k and start is not None:
                out.append((context + cont[:start], cont[start:i]))
                start = None
        p += len(cont)
    return out


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity."""
    return len(re.split(r"\s+", text))


def _exp(x: float) -> float:
    """exp, with inf past float range: a few words carrying many tokens (undecodable bytes,
    each its own token) give a word perplexity beyond 1e308, not an OverflowError."""
    return math.exp(x) if x < 709.0 else math.inf


NO_TEXT = ("not available: pretokenized ids that do not decode exactly (decode then encode gives other "
           "ids, or another tokenizer made them); token perplexity only")
ANSWERS_ONLY = ("not available: fine-tuning examples, only their loss-masked (answer) tokens are scored; "
                "token perplexity only")


@dataclasses.dataclass
class PerplexityResult:
    loglikelihood: float = 0.0  # natural log, summed over all scored tokens
    tokens: int = 0
    bytes: int = 0
    words: int = 0
    documents: int = 0
    without_text: int = 0  # documents (pretokenized ids) with no exact text: no bytes or words
    masked: int = 0  # fine-tuning examples, scored on their loss mask only (no bytes or words)

    def add(self, text: str | None, n_tokens: int, ll: float, masked: bool = False) -> None:
        self.loglikelihood += ll
        self.tokens += n_tokens
        self.documents += 1
        self.masked += masked
        if text is None:
            self.without_text += 1
            return
        self.bytes += len(text.encode("utf-8"))
        self.words += count_words(text)

    def metrics(self) -> dict:
        """token_perplexity, bits_per_byte, word_perplexity and the counts behind them;
        bits_per_byte and word_perplexity are None (with `text_metrics` saying why) when
        some document had ids but no exact text."""
        nll = -self.loglikelihood
        if not self.tokens:
            raise DataError("perplexity: no tokens to score (an empty corpus?); a perplexity of nothing is not 1")
        out = {"token_perplexity": _exp(nll / self.tokens),
               "bits_per_byte": nll / max(self.bytes, 1) / math.log(2),
               "word_perplexity": _exp(nll / max(self.words, 1)),
               "loglikelihood": self.loglikelihood, "tokens": self.tokens, "bytes": self.bytes,
               "words": self.words, "documents": self.documents}
        if self.masked:
            out["scored"] = "answers"  # the loss-masked tokens of fine-tuning examples
        if self.without_text:
            why = ANSWERS_ONLY if self.masked else NO_TEXT
            out.update(bits_per_byte=None, word_perplexity=None, bytes=None, words=None,
                       text_metrics=f"{why} ({self.without_text} of {self.documents} documents)")
        return out


def _document(doc, tokenizer, vocab_size: int | None, exact_ids: bool):
    """(text or None, ids, loss mask or None) of a document: a str is encoded; token ids (a
    pretokenized source's) are scored as they are, their text the decoded ids when that is
    exact; a fine-tuning example is encoded as training does, with its loss mask."""
    if isinstance(doc, str):
        return doc, tokenizer.encode(doc, bos=False), None
    if isinstance(doc, SftExample):
        ids, mask = (x.tolist() for x in encode_example(tokenizer, doc))
        if ids[:1] == [tokenizer.bos_id]:  # rolling_windows puts bos in front itself
            ids, mask = ids[1:], mask[1:]
        return None, ids, mask
    ids = [int(i) for i in doc]
    if ids and vocab_size is not None and not 0 <= min(ids) <= max(ids) < vocab_size:
        raise DataError(f"perplexity: token id {max(ids) if max(ids) >= vocab_size else min(ids)} is outside the "
                        f"model's vocabulary of {vocab_size} (pretokenized with another tokenizer?)")
    if not exact_ids:
        return None, ids, None
    text = tokenizer.decode(ids)
    return (text if tokenizer.encode(text, bos=False) == ids else None), ids, None


def perplexity(scorer, tokenizer, documents: Iterable, *, stride: int | None = None,
               chunk_documents: int = 64, progress: Callable[[int], None] | None = None,
               exact_ids: bool = True) -> dict:
    """Rolling perplexity of `documents` under `scorer` (a Scorer).

    A document is a str, or a sequence of token ids (a pretokenized source's, without bos),
    scored as given; ids beyond the model's vocabulary are an error. A fine-tuning example
    (`SftExample`) counts only its loss-masked tokens (see `masked_requests`). Bits per byte and word
    perplexity need text: ids get theirs by decoding when encoding the decoded text gives
    the same ids back (`exact_ids=False`: ids from another tokenizer never do), else those
    two metrics are None. Documents are scored `chunk_documents` at a time so that windows
    of different documents share batches. `progress(n)` is called with the number of
    documents done.
    """
    result, chunk = PerplexityResult(), []
    config = getattr(scorer, "config", None)
    vocab_size = getattr(config, "vocab_size", None)

    def flush():
        requests, owners = [], []
        for d, (text, ids, mask) in enumerate(chunk):
            pairs = (rolling_windows(ids, tokenizer.bos_id, scorer.max_length, stride) if mask is None
                     else masked_requests(ids, mask, tokenizer.bos_id, scorer.max_length, stride))
            requests += pairs
            owners += [d] * len(pairs)
        lls = [0.0] * len(chunk)
        for d, (ll, _) in zip(owners, scorer.loglikelihood(requests)):
            lls[d] += ll
        for (text, ids, mask), ll in zip(chunk, lls):
            result.add(text, len(ids) if mask is None else sum(map(bool, mask)), ll, masked=mask is not None)
        if progress is not None:
            progress(len(chunk))
        chunk.clear()

    for doc in documents:
        text, ids, mask = _document(doc, tokenizer, vocab_size, exact_ids)
        if any(mask) if mask is not None else ids:  # an empty document has nothing to score
            chunk.append((text, ids, mask))
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
