"""Batched log-likelihood of (context, continuation) token pairs.

Requests are packed several to a row (segment ids keep them apart, positions restart per
request), rows come in a few fixed lengths (powers of two from `pack_length` up to the
model's context) and batches in a fixed number of rows per length, so a task of thousands
of requests compiles once per row length. A request longer than the context is cut from the
left as lm-evaluation-harness does: the model sees the last `max_length` tokens of
context + continuation (minus the final token) and scores the continuation's tokens.
"""
from __future__ import annotations

import dataclasses
import heapq
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.losses import token_log_probs
from llama_jax.model import Llama
from llama_jax.runtime import RunOptions

Pair = tuple[Sequence[int], Sequence[int]]


@dataclasses.dataclass(frozen=True)
class _Prepared:
    index: int          # position in the caller's request list
    inputs: np.ndarray  # model input tokens (context + continuation, truncated, minus the last)
    targets: np.ndarray  # next-token targets, same length
    n_cont: int         # the last n_cont targets are the continuation


def prepare(index: int, context: Sequence[int], continuation: Sequence[int], max_length: int) -> _Prepared:
    """Left-truncates a request to the model's context, as lm-evaluation-harness does."""
    if len(continuation) == 0:
        raise ValueError(f"request {index}: empty continuation (nothing to score)")
    if len(context) == 0:
        raise ValueError(f"request {index}: empty context; give at least one token (bos)")
    if len(continuation) > max_length:
        raise ValueError(f"request {index}: continuation of {len(continuation)} tokens exceeds the model's "
                         f"context of {max_length}; split it (perplexity.rolling_windows does)")
    full = np.asarray(list(context) + list(continuation), np.int32)[-(max_length + 1):]
    return _Prepared(index, full[:-1], full[1:], len(continuation))


def row_length(n: int, pack_length: int, max_length: int) -> int:
    """The smallest power-of-two multiple of `pack_length` holding n tokens, capped at max_length."""
    r = min(pack_length, max_length)
    while r < n:
        r *= 2
    return min(r, max_length)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Packs items (by length, longest first) into rows of `capacity`: lists of item indices.

    Each item goes to the row with the most room left (a heap: O(n log n) for thousands).
    """
    rows: list[list[int]] = []
    heap: list[tuple[int, int]] = []  # (-room, row)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if heap and -heap[0][0] >= lengths[i]:
            room, r = heapq.heappop(heap)
            rows[r].append(i)
            heapq.heappush(heap, (room + lengths[i], r))
        else:
            rows.append([i])
            heapq.heappush(heap, (-(capacity - lengths[i]), len(rows) - 1))
    return rows


def _fill_batch(items: list[list[_Prepared]], n_rows: int, length: int) -> dict[str, np.ndarray]:
    """Row arrays for a batch: rows past len(items) stay padding (segment 0)."""
    arrays = {k: np.zeros((n_rows, length), np.int32) for k in ("tokens", "positions", "segment_ids", "targets")}
    for r, row in enumerate(items):
        start = 0
        for seg, p in enumerate(row, 1):
            m = len(p.inputs)
            arrays["tokens"][r, start:start + m] = p.inputs
            arrays["targets"][r, start:start + m] = p.targets
            arrays["positions"][r, start:start + m] = np.arange(m)
            arrays["segment_ids"][r, start:start + m] = seg
            start += m
    return arrays


class Scorer:
    """Scores (context, continuation) token pairs: `loglikelihood(pairs) -> [(sum log p, is_greedy)]`.

    `max_length` defaults to the config's max_seq_len; `tokens_per_batch` sets rows per batch
    (tokens_per_batch // row length); `pack_length` is the shortest row.
    """

    def __init__(self, config: ModelConfig, params, *, max_length: int | None = None,
                 tokens_per_batch: int = 4096, pack_length: int = 256, mesh=None, run=None):
        self.config, self.params, self.mesh = config, params, mesh
        if max_length is not None and not 2 <= max_length <= config.max_seq_len:  # 0 is not "the default"
            raise ValueError(f"Scorer: max_length={max_length} must be in 2..{config.max_seq_len} (the model's context)")
        self.max_length = int(max_length or config.max_seq_len)
        self.tokens_per_batch, self.pack_length = tokens_per_batch, pack_length
        model = Llama(config, RunOptions.like(params) if run is None else run)  # default: the params' dtype

        def token_scores(params, tokens, positions, segment_ids, targets):
            logits = model.apply({"params": params}, tokens, positions=positions, segment_ids=segment_ids)
            return token_log_probs(logits, targets), jnp.argmax(logits, -1) == targets

        self._fn = jax.jit(token_scores)

    def _rows_per_batch(self, length: int) -> int:
        n = max(1, self.tokens_per_batch // length)
        if self.mesh is not None:  # the batch axis is split over data x fsdp
            k = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            n = -(-n // k) * k
        return n

    def _run(self, batch: dict[str, np.ndarray]):
        args = [batch[k] for k in ("tokens", "positions", "segment_ids", "targets")]
        if self.mesh is None:
            lp, greedy = self._fn(self.params, *args)
        else:
            from llama_jax import sharding
            spec = sharding.logical_sharding(self.mesh, ("batch", "seq"))
            with sharding.activate(self.mesh):
                lp, greedy = self._fn(self.params, *[jax.device_put(a, spec) for a in args])
        return np.asarray(lp, np.float64), np.asarray(greedy)

    def loglikelihood(self, requests: Sequence[Pair],
                      progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
        """Per request: (sum of the continuation's log-probs, whether greedy decoding gives it)."""
        prepared = [prepare(i, c, x, self.max_length) for i, (c, x) in enumerate(requests)]
        groups: dict[int, list[_Prepared]] = {}
        for p in prepared:
            groups.setdefault(row_length(len(p.inputs), self.pack_length, self.max_length), []).append(p)
        results: list[tuple[float, bool] | None] = [None] * len(prepared)
        for length in sorted(groups):
            group = groups[length]
            rows = [[group[i] for i in row] for row in pack_rows([len(p.inputs) for p in group], length)]
            n_rows = self._rows_per_batch(length)
            for b in range(0, len(rows), n_rows):
                chunk = rows[b:b + n_rows]
                lp, greedy = self._run(_fill_batch(chunk, n_rows, length))
                done = 0
                for r, row in enumerate(chunk):
                    start = 0
                    for p in row:
                        end = start + len(p.inputs)
                        sl = slice(end - p.n_cont, end)
                        results[p.index] = (float(lp[r, sl].sum()), bool(greedy[r, sl].all()))
                        start, done = end, done + 1
                if progress is not None:
                    progress(done)
        return results  # type: ignore[return-value]
