"""One conversation with its KV cache kept across turns: a new turn prefills only its own ids.

`ChatSession` holds the decode runtime weights (`decode.prepare`, made once), a batch-1
`decode.KVCache` and the number of filled key slots. A turn appends `encode_dialog` ids (the
first) or `encode_next_turn` ids (the next ones) at slot `filled` (`extend`), then samples
until an end-of-turn id or max tokens. Every sampled id, the end-of-turn id included, is fed
through the model as it is drawn, so its keys and values are in the cache when the turn ends
and the next turn starts right after it; an answer cut short (max tokens, Ctrl-C, a `stop`
callable) is closed with the family's first end-of-turn id (LLaMA 2 eos, LLaMA 3
<|eot_id|>), as `encode_answer` closes one. Positions are the slots (0 .. filled-1).

Compiled shapes are few and reused across turns and sessions: the cache grows in powers of
two (at least `min_cache` slots, at most the context); prefill runs the new ids as pieces
of power-of-two lengths (37 ids: 32 + 4 + 1; no padding, so the last piece's last logits are
the next token's); decoding runs in chunks of `chunk` steps (one jitted `lax.while_loop`
each, the step count a traced argument), so Ctrl-C lands between chunks and the session
stays consistent. Tokens stream from inside the loop through a host callback.
"""
from __future__ import annotations

import functools
import itertools
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.checkpoint import check_params
from llama_jax.errors import input_error
from llama_jax.inference.chat import (CHAT_TEMPERATURE, CHAT_TOP_P, _AnswerStream, chat_stop_ids, encode_dialog,
                                      encode_next_turn, end_of_turn_ids)
from llama_jax.inference.decode import DecodeWeights, KVCache, forward, init_cache, prepare, weight_shapes
from llama_jax.inference.generate import bucket_pow2
from llama_jax.inference.sampling import Sampling, sample
from llama_jax.runtime import RunOptions

_NO_ID = -1


class Reply(NamedTuple):
    """One assistant turn: its text (no end-of-turn id, leading whitespace dropped), the ids
    it put in the cache (the generated ones, then the closing id when it was cut short), why
    it ended ("end_of_turn", "max_tokens", "context", "interrupted"), the ids prefilled for
    the turn (only the new ones) and the seconds spent prefilling and decoding."""
    content: str
    ids: list
    stopped: str
    prefilled: int
    prefill_s: float
    decode_s: float

    @property
    def generated(self) -> int:
        """Ids the model sampled (the closing id of a cut answer not counted)."""
        return len(self.ids) - (self.stopped != "end_of_turn")

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.decode_s if self.decode_s > 0 else 0.0


class _Steps(NamedTuple):
    """The traced inputs of one decode chunk."""
    key: Any
    temperature: Any
    top_p: Any
    stop_ids: Any     # [4] int32, padded with -1
    n_steps: Any      # int32 <= chunk
    step0: Any        # int32: the turn's step count so far (the sampling key folds it in)
    call: Any         # int32: whose stream callback


class _Loop(NamedTuple):
    i: Any
    cache: KVCache
    logits: Any       # [1, V] float32: the next token's
    out: Any          # [chunk] int32
    done: Any


_STREAMS: dict[int, Callable] = {}
_CALLS = itertools.count()


def _report(call, step, token):
    stream = _STREAMS.get(int(call))
    if stream is not None:
        stream(int(step), int(token))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _extend(config, run, weights, cache, tokens, filled):
    logits, cache = forward(config, run, weights, tokens, cache, filled, last_only=True)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(6,))
def _decode(config, run, mode: Sampling, chunk: int, streaming: bool, weights, cache, logits, filled, a: _Steps):
    def cond(s: _Loop):
        return (s.i < a.n_steps) & ~s.done

    def body(s: _Loop):
        tok = sample(s.logits, jax.random.fold_in(a.key, a.step0 + s.i), a.temperature, a.top_p, mode)  # [1]
        if streaming:
            jax.debug.callback(_report, a.call, a.step0 + s.i, tok[0])
        logits, cache = forward(config, run, weights, tok[:, None], s.cache, filled + s.i)
        return _Loop(s.i + 1, cache, logits[:, -1], s.out.at[s.i].set(tok[0]), jnp.isin(tok[0], a.stop_ids))

    s = jax.lax.while_loop(cond, body, _Loop(jnp.int32(0), cache, logits, jnp.full((chunk,), _NO_ID, jnp.int32),
                                             jnp.bool_(False)))
    return s.cache, s.logits, s.out, s.i, s.done


@contextmanager
def _sigint_sets(flag: threading.Event, enabled: bool):
    """While inside: Ctrl-C (SIGINT) sets `flag` instead of raising (main thread only)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, lambda *_: flag.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


class _Delivery:
    """Hands each step's token to the text stream once, in order, whether it comes from the
    loop's callback (as it is drawn) or from the chunk's result (callbacks may lag or reorder)."""

    def __init__(self, on_token: Callable[[int, int], None], first: int):
        self.on_token, self.next, self.held, self.lock = on_token, first, {}, threading.Lock()

    def __call__(self, step: int, token: int):
        with self.lock:
            if step >= self.next:
                self.held[step] = token
            while self.next in self.held:
                self.on_token(self.next, self.held.pop(self.next))
                self.next += 1


class ChatSession:
    """One conversation with `tokenizer`'s chat format, its KV cache reused across turns.

        s = ChatSession(config, params, tokenizer, system="Be brief.")
        reply = s.send("Hi!", stream=lambda piece: print(piece, end=""))
        s.send("And then?"); s.reset(system=None)

    Sampling defaults are Meta's for chat (temperature 0.6, top-p 0.9; 0: greedy). `run`: the
    compute dtype (default: the params'). Ctrl-C during `send` (main thread) ends the answer
    between chunks, keeping the session; `stop()` returning True does the same.
    """

    def __init__(self, config, params, tokenizer, *, system: str | None = None, max_new_tokens: int = 512,
                 temperature: float = CHAT_TEMPERATURE, top_p: float = CHAT_TOP_P, top_k: int | None = None,
                 seed: int = 0, run: RunOptions | None = None, chunk: int = 32, min_cache: int = 256):
        if tokenizer.vocab_size > config.vocab_size:
            raise input_error("tokenizer", "more tokens than the model's vocabulary: wrong tokenizer?",
                              f"<= {config.vocab_size}", tokenizer.vocab_size)
        self.config, self.tokenizer, self.run = config, tokenizer, RunOptions.like(params) if run is None else run
        if isinstance(params, DecodeWeights):
            check_params(config, params, expected=weight_shapes(config))
            self.weights = params
        else:
            check_params(config, nn.unbox(params))
            self.weights = jax.jit(prepare)(nn.unbox(params))  # one copy, in the runtime form, for the session
        self.stops = chat_stop_ids(config, tokenizer)
        self.close_id = end_of_turn_ids(tokenizer)[0]
        if not 0 <= self.close_id < config.vocab_size:
            raise input_error("tokenizer", "its end-of-turn id is outside the model's vocabulary",
                              f"< {config.vocab_size}", self.close_id)
        self.max_new_tokens, self.chunk, self.min_cache = max_new_tokens, chunk, min_cache
        self.set_sampling(temperature, top_p, top_k, seed)
        self.cache = init_cache(config, 1, min(bucket_pow2(1, min_cache), config.max_seq_len), self.run.dtype)
        self.reset(system)

    def set_sampling(self, temperature: float, top_p: float, top_k: int | None = None, seed: int = 0) -> None:
        if not temperature >= 0:
            raise input_error("temperature", "out of range (0: greedy)", ">= 0", temperature)
        if not 0 < top_p <= 1:
            raise input_error("top_p", "out of range", "0 < top_p <= 1", top_p)
        if top_k is not None and not 1 <= top_k <= self.config.vocab_size:
            raise input_error("top_k", "out of range", f"None or 1 <= top_k <= {self.config.vocab_size}", top_k)
        self.temperature, self.top_p, self.key = temperature, top_p, jax.random.PRNGKey(seed)
        self.mode = (Sampling(True, False, None) if temperature == 0 else
                     Sampling(False, top_p < 1.0, None if top_k is None else int(top_k)))

    def reset(self, system: str | None = None) -> None:
        """Start over (optionally with a system message); the cache's memory and programs are kept.
        Slots past `filled` need no clearing: a query at slot p never sees slots after p."""
        self.messages = [] if system is None else [{"role": "system", "content": system}]
        self.ids: list[int] = []  # what the cache holds, slot by slot
        self.turns = 0

    @property
    def filled(self) -> int:
        return len(self.ids)

    @property
    def cache_len(self) -> int:
        return self.cache.segment_ids.shape[1]

    def send(self, content: str, stream: Callable[[str], None] | None = None, *, max_new_tokens: int | None = None,
             stop: Callable[[], bool] | None = None, handle_sigint: bool = True) -> Reply:
        """Append a user message, answer it (streaming text pieces to `stream`), return the `Reply`."""
        msg = {"role": "user", "content": content}
        ids = encode_dialog(self.tokenizer, self.messages + [msg]) if not self.ids else \
            encode_next_turn(self.tokenizer, [msg])
        room = self.config.max_seq_len - self.filled - len(ids) - 1  # one slot kept to close the answer
        if room < 0:
            raise input_error("message", "the conversation no longer fits the model's context: reset it",
                              f"<= max_seq_len {self.config.max_seq_len} tokens", f"{self.filled + len(ids) + 1}")
        budget = min(self.max_new_tokens if max_new_tokens is None else max_new_tokens, room)
        flag = threading.Event()
        with _sigint_sets(flag, handle_sigint):  # from here on, Ctrl-C ends the answer (maybe before it starts)
            t0 = time.perf_counter()
            logits = jax.block_until_ready(self.extend(ids))
            t1 = time.perf_counter()
            new, stopped = self._answer(logits, budget, stream, lambda: flag.is_set() or bool(stop and stop()))
            t2 = time.perf_counter()
        text_ids = new[:-1] if stopped == "end_of_turn" else new
        if stopped != "end_of_turn":
            self.extend([self.close_id])
            new = new + [self.close_id]
        text = self._text(ids, text_ids)
        self.messages += [msg, {"role": "assistant", "content": text}]
        self.turns += 1
        return Reply(text, new, stopped, len(ids), t1 - t0, t2 - t1)

    def _text(self, context, ids) -> str:
        from llama_jax.inference.detokenize import decode_continuation
        return decode_continuation(self.tokenizer, context, ids).lstrip()

    def extend(self, ids) -> jax.Array:
        """Prefill `ids` at the next free slots; returns the logits [1, V] of the token after them."""
        ids = [int(i) for i in ids]
        self._ensure(self.filled + len(ids))
        logits, start = None, 0
        for size in (1 << b for b in reversed(range(len(ids).bit_length())) if len(ids) >> b & 1):
            piece = np.asarray(ids[start:start + size], np.int32)[None]
            logits, self.cache = _extend(self.config, self.run, self.weights, self.cache, piece,
                                         np.int32(self.filled + start))
            start += size
        self.ids += ids
        return logits

    def _ensure(self, slots: int) -> None:
        """Grow the cache (powers of two, up to the context) to hold `slots` key slots."""
        if slots <= self.cache_len:
            return
        new = min(bucket_pow2(slots, self.min_cache), self.config.max_seq_len)
        grow = new - self.cache_len
        kv = jax.tree.map(lambda x: jnp.pad(x, ((0, 0), (0, grow), (0, 0), (0, 0))), self.cache.kv)
        self.cache = KVCache(kv, jnp.pad(self.cache.segment_ids, ((0, 0), (0, grow))))

    def _answer(self, logits, budget: int, stream, should_stop) -> tuple[list[int], str]:
        """Sample up to `budget` ids in chunks, each fed into the cache; (ids, why it stopped)."""
        stop_arr = np.full(4, _NO_ID, np.int32)
        stop_arr[:len(self.stops)] = self.stops
        key = jax.random.fold_in(self.key, self.turns)
        context = self.ids[-8:]
        delivery = None
        if stream is not None:
            text = _AnswerStream(self.tokenizer, [context], self.stops, lambda r, piece: stream(piece))
            delivery = _Delivery(lambda step, tok: text(step, np.array([tok])), 0)
        call = next(_CALLS) % (1 << 31)
        if delivery is not None:
            _STREAMS[call] = delivery
        new, stopped = [], "max_tokens" if budget < self.config.max_seq_len - self.filled - 1 else "context"
        try:
            while len(new) < budget:
                if should_stop():
                    stopped = "interrupted"
                    break
                n = min(self.chunk, budget - len(new))
                self._ensure(self.filled + n)
                a = _Steps(key, np.float32(max(self.temperature, 1e-6)), np.float32(self.top_p), stop_arr,
                           np.int32(n), np.int32(len(new)), np.int32(call))
                self.cache, logits, out, i, done = _decode(self.config, self.run, self.mode, self.chunk,
                                                           delivery is not None, self.weights, self.cache, logits,
                                                           np.int32(self.filled), a)
                got = [int(t) for t in np.asarray(out)[:int(i)]]
                if delivery is not None:
                    for j, t in enumerate(got):
                        delivery(len(new) + j, t)
                self.ids += got
                new += got
                if bool(done):
                    stopped = "end_of_turn"
                    break
        finally:
            _STREAMS.pop(call, None)
        if delivery is not None:
            text.finish()
        return new, stopped
