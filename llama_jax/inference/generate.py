"""Generation: prefill, then one jitted `lax.while_loop` over an explicit KV cache.

Prompts of different lengths share a batch LEFT-padded: padding has segment id 0, real
tokens 1, positions count from 0 at each row's first real token, and all rows decode in
lockstep (the model masks keys by segment id). Shapes are bucketed (batch and prompt
length to powers of two, cache length to quarter-octave steps) and every sampling knob
that is not a shape is a traced argument, so new lengths, temperatures, top-p values,
seeds, stop ids and stream callbacks reuse the compiled loop (`Programs` holds them).

The loop runs `decode.forward` on the decode runtime form of the params
(`decode.prepare`: q/k/v and w1/w3 projections fused, one tree per layer) with per-layer
KV caches in the loop state. `generate` prepares stored params once per call, outside the
loop (a copy of the weights held for the call); pass `prepare(params)` instead, and drop
the stored tree, to hold one copy and skip it.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import generations
from llama_jax.checkpoint import check_params
from llama_jax.config import ModelConfig
from llama_jax.inference.decode import DecodeWeights, KVCache, forward, init_cache, prepare, weight_axes, weight_shapes
from llama_jax.inference.sampling import Sampling, filtered_probs, sample  # noqa: F401 (re-exported)
from llama_jax.model import param_shapes
from llama_jax.runtime import RunOptions

_PAD = -1  # written into the output after a row has stopped
_KV_AXES = ("batch", "seq", "kv_heads", "head_dim")


def bucket_pow2(n: int, minimum: int = 8) -> int:
    """The next power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


def bucket_cache(n: int, minimum: int = 64) -> int:
    """Round up to a quarter-octave step (64, 80, 96, 112, 128, 160, ...): bounded padding, few shapes."""
    n = max(n, minimum)
    step = max(bucket_pow2(n) // 8, 1)
    return -(-n // step) * step


def default_stop_ids(config: ModelConfig) -> tuple[int, ...]:
    """What Meta's code stops on, by `config.generation`: eos 2 (LLaMA 1/2), 128001 and eot
    128009 (Llama 3), plus eom 128008 (3.1 on). Ids past a small test vocabulary are dropped
    (they cannot be sampled)."""
    return tuple(i for i in generations.special_ids(config.generation).stop if i < config.vocab_size)


def _check_prompts(config: ModelConfig, prompts, max_new_tokens: int) -> list[np.ndarray]:
    if isinstance(prompts, np.ndarray) and prompts.ndim == 1 or (
            len(prompts) and np.isscalar(prompts[0])):
        raise ValueError("prompts must be a list of token-id lists (one per prompt), not one flat list")
    if not len(prompts):
        raise ValueError("no prompts given")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    rows = []
    for i, p in enumerate(prompts):
        p = np.asarray(p)
        if p.size == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. bos)")
        if p.ndim != 1 or not np.issubdtype(p.dtype, np.integer):
            raise ValueError(f"prompt {i} must be a 1-D list of integer token ids, got dtype {p.dtype} shape {p.shape}")
        bad = p[(p < 0) | (p >= config.vocab_size)]
        if bad.size:
            raise ValueError(f"prompt {i}: token ids {bad[:5].tolist()} are outside the vocabulary "
                             f"[0, {config.vocab_size})")
        if p.size + max_new_tokens > config.max_seq_len:
            raise ValueError(f"prompt {i}: {p.size} tokens + max_new_tokens {max_new_tokens} exceed the "
                             f"context max_seq_len={config.max_seq_len}")
        rows.append(p.astype(np.int32))
    return rows


def _check_sampling(config, temperature, top_p, top_k) -> Sampling:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and not (isinstance(top_k, (int, np.integer)) and 1 <= top_k <= config.vocab_size):
        raise ValueError(f"top_k must be None or an integer in [1, {config.vocab_size}], got {top_k!r}")
    if temperature == 0:
        return Sampling(greedy=True, top_p=False, top_k=None)
    return Sampling(greedy=False, top_p=top_p < 1.0, top_k=None if top_k is None else int(top_k))


# ---------------------------------------------------------------- the compiled loop

class Inputs(NamedTuple):
    """What one generation call feeds the compiled program besides the weights (all traced)."""
    tokens: Any       # [B,P] int32, left-padded prompts
    positions: Any    # [B,P] int32
    segments: Any     # [B,P] int32, 0 on padding
    lengths: Any      # [B] int32 prompt lengths
    done: Any         # [B] bool, spare rows start done
    max_new: Any      # int32
    stop_ids: Any     # [bucket] int32, padded with _PAD
    key: Any          # PRNG key
    temperature: Any  # float32
    top_p: Any        # float32
    call: Any         # int32: which call's stream callback the loop reports to


class LoopState(NamedTuple):
    step: Any         # int32: the next output slot
    cache: KVCache
    out: Any          # [B, n_out] int32
    token: Any        # [B] the last sampled ids
    done: Any         # [B] bool


class Key(NamedTuple):
    """What changes a compiled generation program."""
    config: ModelConfig
    run: RunOptions
    prompt_len: int
    cache_len: int
    mode: Sampling
    streaming: bool
    mesh: Any


def _layout(rows: list[np.ndarray], batch: int, prompt_len: int):
    """Left-padded tokens, positions, segment ids [batch, prompt_len]; spare rows start done."""
    tokens = np.zeros((batch, prompt_len), np.int32)
    positions = np.zeros((batch, prompt_len), np.int32)
    segments = np.zeros((batch, prompt_len), np.int32)
    for r, p in enumerate(rows):
        tokens[r, prompt_len - p.size:] = p
        positions[r, prompt_len - p.size:] = np.arange(p.size)
        segments[r, prompt_len - p.size:] = 1
    segments[len(rows):, -1] = 1  # spare rows: one dummy token so attention is never empty
    lengths = np.array([p.size for p in rows] + [1] * (batch - len(rows)), np.int32)
    done = np.arange(batch) >= len(rows)
    return tokens, positions, segments, lengths, done


def _loop_fn(key: Key, report: Callable) -> Callable:
    """The traced body of one generation call: prefill, then the decode while_loop."""
    config, run, prompt_len, mode = key.config, key.run, key.prompt_len, key.mode
    n_out = key.cache_len - prompt_len

    def loop(weights: DecodeWeights, a: Inputs):
        batch = a.tokens.shape[0]
        cache = init_cache(config, batch, key.cache_len, run.dtype)
        cache = KVCache(jax.tree.map(lambda x: nn.with_logical_constraint(x, _KV_AXES), cache.kv),
                        nn.with_logical_constraint(cache.segment_ids, ("batch", "seq")))
        logits, cache = forward(config, run, weights, a.tokens, cache, 0, positions=a.positions,
                                segment_ids=a.segments, last_only=True)

        def pick(logits, i, done):
            tok = sample(logits[:, -1], jax.random.fold_in(a.key, i), a.temperature, a.top_p, mode)
            tok = jnp.where(done, _PAD, tok)
            if key.streaming:
                jax.debug.callback(report, a.call, i, tok)
            return tok, done | jnp.isin(tok, a.stop_ids)

        first, done = pick(logits, 0, a.done)
        out = jnp.full((batch, n_out), _PAD, jnp.int32).at[:, 0].set(first)
        ones = jnp.ones((batch, 1), jnp.int32)

        def cond(s: LoopState):
            return (s.step < a.max_new) & ~jnp.all(s.done)

        def body(s: LoopState):
            pos = (a.lengths + s.step - 1)[:, None]
            feed = jnp.maximum(s.token, 0)[:, None]  # stopped rows carry _PAD; feed any valid id
            logits, cache = forward(config, run, weights, feed, s.cache, prompt_len + s.step - 1, positions=pos,
                                    segment_ids=ones)
            tok, done = pick(logits, s.step, s.done)
            out = jax.lax.dynamic_update_slice(s.out, tok[:, None], (0, s.step))
            return LoopState(s.step + 1, cache, out, tok, done)

        return jax.lax.while_loop(cond, body, LoopState(jnp.int32(1), cache, out, first, done)).out

    return loop


class Programs:
    """Compiled generation programs, one per `Key`, and the stream callbacks of calls in flight.

    A compiled loop reports each step to `_report` with its call's id (a traced argument),
    so one program serves every callback. `generate` uses one shared instance by default.
    """

    def __init__(self):
        self._loops: dict[Key, Callable] = {}
        self._preparers: dict[tuple, Callable] = {}
        self._shapes: dict[tuple, Any] = {}
        self._streams: dict[int, Callable] = {}
        self._ids = itertools.count()

    def loop(self, key: Key) -> Callable:
        if key not in self._loops:
            fn = _loop_fn(key, self._report)
            if key.mesh is None:
                self._loops[key] = jax.jit(fn)
            else:
                from llama_jax import sharding
                rep = sharding.replicated(key.mesh)
                args = Inputs(*(rep,) * len(Inputs._fields))
                self._loops[key] = jax.jit(fn, in_shardings=(self.weight_shardings(key.config, key.mesh), args),
                                           out_shardings=rep)
        return self._loops[key]

    def weight_shardings(self, config: ModelConfig, mesh, prepared: bool = True):
        """NamedShardings of the stored (prepared=False) or prepared params on `mesh`."""
        from llama_jax import sharding
        if not prepared:
            return nn.unbox(sharding.logical_to_shardings(param_shapes(config), mesh))
        boxed = jax.tree.map(lambda s, names: nn.LogicallyPartitioned(s, names), self.expected(config, True),
                             weight_axes(config))
        return nn.unbox(sharding.logical_to_shardings(boxed, mesh))

    def expected(self, config: ModelConfig, prepared: bool):
        """The abstract params (stored or prepared) of `config`, for validation and shardings."""
        k = (config, prepared)
        if k not in self._shapes:
            self._shapes[k] = weight_shapes(config) if prepared else nn.unbox(param_shapes(config))
        return self._shapes[k]

    def prepare(self, config: ModelConfig, params, mesh) -> DecodeWeights:
        """The params in the prepared form the compiled loop takes, placed on the mesh if any."""
        prepared = isinstance(params, DecodeWeights)
        if mesh is not None:
            # A no-op for params already on these shardings (e.g. from load_checkpoint(mesh=...)).
            params = jax.device_put(params, self.weight_shardings(config, mesh, prepared))
        if prepared:
            return params
        k = (config, mesh)
        if k not in self._preparers:
            self._preparers[k] = jax.jit(prepare) if mesh is None else jax.jit(
                prepare, in_shardings=(self.weight_shardings(config, mesh, False),),
                out_shardings=self.weight_shardings(config, mesh, True))
        return self._preparers[k](params)  # one copy of the weights per call

    def open_stream(self, stream: Callable | None) -> int:
        call = next(self._ids) % (1 << 31)
        if stream is not None:
            self._streams[call] = stream
        return call

    def close_stream(self, call: int) -> None:
        self._streams.pop(call, None)

    def _report(self, call, step, tokens):
        stream = self._streams.get(int(call))
        if stream is not None:
            stream(int(step), np.asarray(tokens))


PROGRAMS = Programs()


class _Reorder:
    """Hands steps to the user's callback in order (debug callbacks may arrive out of order)."""

    def __init__(self, stream: Callable, n_rows: int):
        self.stream, self.n_rows, self.next, self.held = stream, n_rows, 0, {}

    def __call__(self, step: int, tokens: np.ndarray):
        self.held[step] = tokens[:self.n_rows]
        while self.next in self.held:
            self.stream(self.next, self.held.pop(self.next))
            self.next += 1


def generate(config: ModelConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, top_k: int | None = None,
             stop_ids: Sequence[int] | None = None, stream: Callable[[int, np.ndarray], None] | None = None,
             mesh=None, run: RunOptions | None = None, programs: Programs | None = None) -> list[list[int]]:
    """Continue each prompt (a list of token ids); return per prompt the new ids only.

    A row stops after a stop id (default: the LLaMA eos, see `default_stop_ids`; pass () to
    never stop), which is included in its result. `stream(step, tokens)` is called on the
    host once per step with one id per prompt (-1 for rows that have stopped). With `mesh`,
    params are placed on the model's logical shardings (tensor-parallel over "tensor").
    `params` may be stored (stacked) or `decode.prepare(params)`, which saves a copy.
    `run`: the compute dtype (default: the params' dtype); `programs`: where compiled loops are kept.
    """
    run = RunOptions.like(params) if run is None else run
    programs = PROGRAMS if programs is None else programs
    rows = _check_prompts(config, prompts, max_new_tokens)
    mode = _check_sampling(config, temperature, top_p, top_k)
    params = params if isinstance(params, DecodeWeights) else nn.unbox(params)
    check_params(config, params, expected=programs.expected(config, isinstance(params, DecodeWeights)))
    stops = list(default_stop_ids(config) if stop_ids is None else stop_ids)
    if any(not 0 <= s < config.vocab_size for s in stops):
        raise ValueError(f"stop_ids {stops} must lie in the vocabulary [0, {config.vocab_size})")
    longest = max(p.size for p in rows)
    # Prompt bucket: a power of two, but never so long that the context cannot hold it plus max_new_tokens.
    prompt_len = min(bucket_pow2(longest), config.max_seq_len - max_new_tokens)
    cache_len = min(bucket_cache(prompt_len + max_new_tokens), config.max_seq_len)
    cache_len = max(cache_len, prompt_len + max_new_tokens)
    batch = bucket_pow2(len(rows), minimum=1)
    tokens, positions, segments, lengths, done = _layout(rows, batch, prompt_len)
    stop_arr = np.full(bucket_pow2(len(stops), minimum=4), _PAD, np.int32)  # bucketed: no recompile
    stop_arr[:len(stops)] = stops
    loop = programs.loop(Key(config, run, prompt_len, cache_len, mode, stream is not None, mesh))
    call = programs.open_stream(None if stream is None else _Reorder(stream, len(rows)))
    inputs = Inputs(tokens, positions, segments, lengths, done, np.int32(max_new_tokens), stop_arr,
                    jax.random.PRNGKey(seed), np.float32(max(temperature, 1e-6)), np.float32(top_p), np.int32(call))
    try:
        out = _run(loop, programs.prepare(config, params, mesh), inputs, mesh)
    finally:
        programs.close_stream(call)
    return [[int(t) for t in row[:max_new_tokens] if t != _PAD] for row in out[:len(rows)]]


def _run(fn, weights, inputs, mesh) -> np.ndarray:
    if mesh is None:
        return np.asarray(fn(weights, inputs))
    from llama_jax import sharding
    with sharding.activate(mesh):  # the model's logical constraints resolve against this mesh
        out = fn(weights, inputs)
    return np.asarray(jax.device_get(out))
