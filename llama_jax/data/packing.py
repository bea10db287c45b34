"""Packing tokenized documents into fixed rows, and the batch contract.

Each document becomes `[bos] + ids + [eos]`. Documents are concatenated greedily and cut
into rows of `seq_len + 1` tokens (grain's ConcatThenSplitIterDataset). A document longer
than the room left in a row is split: its first part ends the row, the rest starts the
next row(s). Nothing is dropped; each piece is its own segment with positions restarting
at 0 (attention cannot see the earlier piece anyway, so the piece is a document of its own
to the model). Split documents are counted in `PipelineStats.split_documents`.

Batch contract (numpy, shape [batch, seq_len] each):
  tokens       int32   row[:-1]; padding is 0
  targets      int32   row[1:]
  segment_ids  int32   1..k per document piece within the row, 0 for padding
  positions    int32   position within its document piece, restarting at 0
  loss_mask    float32 1.0 where the target is the next token of the same piece; 0.0 on
                       padding and where the target would belong to the next document.
The last token of each row is only a target: the transition from it to the next row's
first token is not trained (one prediction per row, the usual price of packing).
"""
from __future__ import annotations

import threading

import numpy as np

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


class PipelineStats:
    """Process-local counters of what the pipeline has read (prefetched included)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.documents = 0
        self.tokens = 0
        self.split_documents = 0  # documents longer than a row, spread over several rows
        self.empty_documents = 0  # documents with no tokens: they still add bos + eos

    def add(self, n_tokens: int, row_len: int):
        with self._lock:
            self.documents += 1
            self.tokens += n_tokens
            self.split_documents += n_tokens > row_len
            self.empty_documents += n_tokens == 2

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("documents", "tokens", "split_documents", "empty_documents")}


class TokenizeDocument:
    """Map: text (or already tokenized ids) -> {"tokens": int32 [bos] + ids + [eos]}."""

    def __init__(self, tokenizer, row_len: int, stats: PipelineStats):
        self._tok, self._row_len, self._stats = tokenizer, row_len, stats
        self._bos, self._eos = tokenizer.bos_id, tokenizer.eos_id

    def __call__(self, doc) -> dict:
        if isinstance(doc, str):
            ids = self._tok.encode(doc, bos=True, eos=True)
            tokens = np.asarray(ids, dtype=np.int32)
        else:  # pre-tokenized: an int array without bos/eos
            tokens = np.concatenate([[self._bos], np.asarray(doc, np.int32), [self._eos]]).astype(np.int32)
        self._stats.add(len(tokens), self._row_len)
        return {"tokens": tokens}


def pack(ds, seq_len: int):
    """IterDataset of {"tokens": ids} -> IterDataset of packed rows of seq_len + 1."""
    from grain.experimental import ConcatThenSplitIterDataset
    return ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})


def row_to_example(row: dict) -> dict:
    """A packed row of seq_len + 1 -> the batch contract's fields for one sequence."""
    r, seg, pos = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
    same_doc = (seg[:-1] != 0) & (seg[1:] == seg[:-1])
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
