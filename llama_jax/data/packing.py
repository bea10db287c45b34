"""Packing tokenized documents into fixed rows, and the batch contract.

Each document becomes `[bos] + ids + [eos]`. Documents are concatenated greedily and cut
into rows of `seq_len + 1` tokens (grain's ConcatThenSplitIterDataset). A document longer
than the room left in a row is split: its first part ends the row, the rest starts the
next row(s). Nothing is dropped; each piece is its own segment with positions restarting
at 0 (attention cannot see the earlier piece anyway, so the piece is a document of its own
to the model). Split documents are counted in `PipelineStats.split_documents`.

Fine-tuning examples (data/sft.py) carry a per-token weight (1: a token the model must
produce) and are packed whole instead (grain's FirstFitPackIterDataset, rows of whole
examples, padded): a row never starts in the middle of an example, so an answer always sees
its prompt. An example longer than a row keeps its last seq_len + 1 tokens (a plain text
document mixed into such a pipeline keeps its first), counted in
`PipelineStats.truncated_documents`; the first one logs a warning. Plain text has weight 1
everywhere; the weights travel through packing and grain's iterator state with the ids.

Batch contract (numpy, shape [batch, seq_len] each):
  tokens       int32   row[:-1]; padding is 0
  targets      int32   row[1:]
  segment_ids  int32   1..k per document piece within the row, 0 for padding
  positions    int32   position within its document piece, restarting at 0
  loss_mask    float32 1.0 where the target is the next token of the same piece and that
                       token's weight is 1 (fine-tuning: an answer token); 0.0 on padding,
                       where the target would belong to the next document, and on prompts.
The last token of each row is only a target: the transition from it to the next row's
first token is not trained (one prediction per row, the usual price of packing).
"""
from __future__ import annotations

import logging
import threading

import numpy as np

from llama_jax.data.config import DataError
from llama_jax.data.sft import SftExample, encode_example

log = logging.getLogger(__name__)
BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


class PipelineStats:
    """Process-local counters of what the pipeline has read (prefetched included)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.documents = 0
        self.tokens = 0
        self.split_documents = 0  # documents longer than a row, spread over several rows
        self.empty_documents = 0  # documents with no tokens: they still add bos + eos
        self.truncated_documents = 0  # documents longer than a row where documents are packed whole
        self.truncated_examples: set = set()  # (path, byte offset) of the fine-tuning examples among them

    def add(self, n_tokens: int, row_len: int):
        with self._lock:
            self.documents += 1
            self.tokens += n_tokens
            self.split_documents += n_tokens > row_len
            self.empty_documents += n_tokens == 2

    def add_truncated(self, doc, n_tokens: int, row_len: int, kept: str):
        """Count a document cut to a row; `doc`: an SftExample, or a description of a text one.
        Its file:line is counted (a read of the file's start) only for the warning."""
        with self._lock:
            self.truncated_documents += 1
            first = self.truncated_documents == 1
            if isinstance(doc, SftExample):
                self.truncated_examples.add((doc.path, doc.offset))
        if first:
            log.warning("%s: %d tokens, longer than a row (%d): it keeps its %s %d tokens; further ones "
                        "are counted (a training run says how many at its end)",
                        doc.where if isinstance(doc, SftExample) else doc, n_tokens, row_len, kept, row_len)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("documents", "tokens", "split_documents", "empty_documents",
                                              "truncated_documents")}


class TokenizeDocument:
    """Map: text (or already tokenized ids) -> {"tokens": int32 [bos] + ids + [eos],
    "weights": int32 ones}; a fine-tuning example -> its chat/prompt-completion ids and weights."""

    def __init__(self, tokenizer, row_len: int, stats: PipelineStats, whole_documents: bool = False):
        self._tok, self._row_len, self._stats = tokenizer, row_len, stats
        self._bos, self._eos = tokenizer.bos_id, tokenizer.eos_id
        self._whole = whole_documents  # packed whole (fine-tuning): a longer document is cut here

    def __call__(self, doc) -> dict:
        if isinstance(doc, SftExample):
            return self._fine_tuning(doc, *encode_example(self._tok, doc))
        if isinstance(doc, str):
            ids = self._tok.encode(doc, bos=True, eos=True)
            tokens = np.asarray(ids, dtype=np.int32)
        else:  # pre-tokenized: an int array without bos/eos
            tokens = np.concatenate([[self._bos], np.asarray(doc, np.int32), [self._eos]]).astype(np.int32)
        if self._whole and len(tokens) > self._row_len:  # plain text mixed into fine-tuning: keep its start
            self._stats.add_truncated("a text document", len(tokens), self._row_len, "first")
            tokens = tokens[:self._row_len]
        self._stats.add(len(tokens), self._row_len)
        return {"tokens": tokens, "weights": np.ones_like(tokens)}

    def _fine_tuning(self, doc, ids: np.ndarray, weights: np.ndarray) -> dict:
        if len(ids) > self._row_len:
            self._stats.add_truncated(doc, len(ids), self._row_len, "last")
            ids, weights = ids[-self._row_len:], weights[-self._row_len:]
        if not weights[1:].any():  # the first token is never a target
            raise DataError(f"{doc.where}: no token to train on (the loss mask is all zero)")
        self._stats.add(len(ids), self._row_len)
        return {"tokens": ids, "weights": weights}


def pack(ds, seq_len: int, whole_documents: bool = False, bins: int = 1):
    """IterDataset of {"tokens", "weights"} -> IterDataset of packed rows of seq_len + 1:
    concatenated and split, or (`whole_documents`, fine-tuning) first-fit into `bins` open rows."""
    from grain.experimental import ConcatThenSplitIterDataset, FirstFitPackIterDataset
    lengths = {"tokens": seq_len + 1, "weights": seq_len + 1}
    if whole_documents:
        # Bins are not shuffled: documents are already shuffled, and the row order stays a
        # function of the document order alone (resume needs nothing more).
        return FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=bins, shuffle_bins=False)
    return ConcatThenSplitIterDataset(ds, length_struct=lengths)


def row_to_example(row: dict) -> dict:
    """A packed row of seq_len + 1 -> the batch contract's fields for one sequence."""
    r, seg, pos = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
    same_doc = (seg[:-1] != 0) & (seg[1:] == seg[:-1])
    if "weights" in row:  # the weight of the target token
        same_doc = same_doc & (row["weights"][1:] != 0)
    return {
        "tokens": r[:-1].astype(np.int32),
        "targets": r[1:].astype(np.int32),
        "segment_ids": seg[:-1].astype(np.int32),
        "positions": pos[:-1].astype(np.int32),
        "loss_mask": same_doc.astype(np.float32),
    }


def pad_batch(batch: dict, batch_size: int) -> dict:
    """Pads a short final batch with all-padding rows (segment 0, loss_mask 0) so every
    batch has the same shape; used only when a finite pipeline runs out."""
    n = batch["tokens"].shape[0]
    if n == batch_size:
        return batch
    return {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


def pack_documents(docs: list[list[int]], seq_len: int, bos: int, eos: int) -> list[dict]:
    """Reference packer in plain numpy (tests, small tools): the same greedy rule as `pack`."""
    stream, seg, pos = [], [], []
    rows, used, k = [], 0, 0
    for d in docs:
        toks = [bos] + list(d) + [eos]
        while toks:
            room = seq_len + 1 - used
            piece, toks = toks[:room], toks[room:]
            k += 1
            stream, seg, pos = stream + piece, seg + [k] * len(piece), pos + list(range(len(piece)))
            used += len(piece)
            if used == seq_len + 1:
                rows.append((stream, seg, pos))
                stream, seg, pos, used, k = [], [], [], 0, 0
    if used:
        pad = seq_len + 1 - used
        rows.append((stream + [0] * pad, seg + [0] * pad, pos + [0] * pad))
    return [row_to_example({"tokens": np.array(a, np.int32), "tokens_segment_ids": np.array(b, np.int32),
                            "tokens_positions": np.array(c, np.int32)}) for a, b, c in rows]
