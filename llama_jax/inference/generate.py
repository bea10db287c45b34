"""Generation: prefill, then one jitted `lax.while_loop` over an explicit KV cache.

Prompts of different lengths share a batch LEFT-padded: padding has segment id 0, real
tokens 1, positions count from 0 at each row's first real token, and all rows decode in
lockstep (the model masks keys by segment id). Shapes are bucketed (batch and prompt
length to powers of two, cache length to quarter-octave steps) and every sampling knob
that is not a shape is a traced argument, so new lengths, temperatures, top-p values,
seeds and stop ids reuse the compiled loop.

Sampling follows Meta's reference `sample_top_p`: softmax(logits / temperature), sort
descending, drop tokens whose cumulative probability *before* them exceeds top_p (the
top token always stays), renormalise, draw. `top_k` (not in Meta's code) keeps the k
most likely tokens first. temperature 0 is greedy.

The loop runs `decode.decode_forward` on the per-layer runtime form of the params
(`decode.split_layers`: q/k/v and w1/w3 projections fused) with per-layer KV caches in
the loop state. `generate` splits stacked params once per call, outside the loop (a copy
of the weights held for the call); pass `split_layers(params)` instead, and drop the
stacked tree, to hold one copy and skip it.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import generations
from llama_jax.config import ModelConfig
from llama_jax.inference.decode import decode_forward, decode_layer_shapes, init_decode_cache, is_split, split_layers
from llama_jax.model import param_shapes

_PAD = -1  # written into the output after a row has stopped
_KV_AXES = ("batch", "seq", "kv_heads", "head_dim")


class Sampling(NamedTuple):
    """The static part of a sampler (it changes the compiled program)."""
    greedy: bool
    top_p: bool                 # apply Meta's nucleus filter
    top_k: int | None


# ---------------------------------------------------------------- samplers (pure)

def _sorted_filtered(logits, temperature, top_p, top_k):
    """(probs sorted descending with Meta's top-p / top-k applied and renormalised, ids)."""
    k = logits.shape[-1] if top_k is None else top_k
    vals, ids = jax.lax.top_k(logits.astype(jnp.float32), k)  # k = V: a full descending sort
    probs = jax.nn.softmax(vals / temperature, axis=-1)
    if top_p is not None:
        cum = jnp.cumsum(probs, axis=-1)
        probs = jnp.where(cum - probs > top_p, 0.0, probs)  # Meta: mask = probs_sum - probs_sort > p
    return probs / jnp.sum(probs, axis=-1, keepdims=True), ids


def filtered_probs(logits, temperature: float, top_p: float = 1.0, top_k: int | None = None):
    """The distribution sampling draws from, in vocabulary order ([..., V] float32)."""
    probs, ids = _sorted_filtered(logits, temperature, None if top_p >= 1.0 else top_p, top_k)
    out = jnp.zeros(logits.shape, jnp.float32)
    return jnp.put_along_axis(out, ids, probs, axis=-1, inplace=False)


def sample(logits, key, temperature, top_p, mode: Sampling):
    """Next tokens [B] from float32 logits [B, V]."""
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not mode.top_p and mode.top_k is None:
        return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
    probs, ids = _sorted_filtered(logits, temperature, top_p if mode.top_p else None, mode.top_k)
    # Draw a rank in sorted space, as Meta does, then map it back to a token id.
    rank = jax.random.categorical(key, jnp.log(probs), axis=-1)
    return jnp.take_along_axis(ids, rank[:, None], axis=-1)[:, 0].astype(jnp.int32)


# ---------------------------------------------------------------- shapes and checks

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


@functools.lru_cache(maxsize=16)
def _expected_shapes(config: ModelConfig, split: bool):
    shapes = nn.unbox(param_shapes(config))
    if split:
        shapes = jax.eval_shape(split_layers, shapes)
    return jax.tree.map(lambda x: (tuple(x.shape)), shapes)


def check_params(config: ModelConfig, params) -> None:
    """Raise if `params` is not a parameter tree of this config (names and shapes), stacked or split."""
    params = nn.unbox(params)
    expected = _expected_shapes(config, is_split(params))
    try:
        got = jax.tree.map(lambda x: tuple(np.shape(x)), params)
        bad = [(jax.tree_util.keystr(k), g, e) for (k, g), e in
               zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(expected)) if g != e]
        same = jax.tree.structure(got) == jax.tree.structure(expected)
    except Exception:  # not a dict of arrays at all
        same, bad = False, []
    if not same or bad:
        raise ValueError(f"params do not match the config ({config.n_layers} layers, dim {config.dim}, "
                         f"vocab {config.vocab_size}): {bad[:4] if bad else 'different parameter names'}; "
                         "load params and config from the same checkpoint")


# ---------------------------------------------------------------- the compiled loop

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


def _decode_fn(config: ModelConfig, prompt_len: int, cache_len: int, mode: Sampling, streaming: bool):
    """The traced body of one generation call: prefill, then the decode while_loop."""
    n_out = cache_len - prompt_len

    def run(params, tokens, positions, segments, lengths, done, max_new, stop_ids, key, temperature, top_p):
        batch = tokens.shape[0]
        cache = init_decode_cache(config, batch, cache_len)
        cache = {"kv": jax.tree.map(lambda a: nn.with_logical_constraint(a, _KV_AXES), cache["kv"]),
                 "segment_ids": nn.with_logical_constraint(cache["segment_ids"], ("batch", "seq"))}
        logits, cache = decode_forward(config, params, tokens, cache, 0, positions=positions,
                                       segment_ids=segments, last_only=True)

        def pick(logits, i, done):
            tok = sample(logits[:, -1], jax.random.fold_in(key, i), temperature, top_p, mode)
            tok = jnp.where(done, _PAD, tok)
            if streaming:
                jax.debug.callback(_stream_sink, i, tok)
            return tok, done | jnp.isin(tok, stop_ids)

        first, done = pick(logits, 0, done)
        out = jnp.full((batch, n_out), _PAD, jnp.int32).at[:, 0].set(first)
        ones = jnp.ones((batch, 1), jnp.int32)

        def cond(state):
            i, _, _, _, done = state
            return (i < max_new) & ~jnp.all(done)

        def body(state):
            i, cache, out, tok, done = state
            pos = (lengths + i - 1)[:, None]
            feed = jnp.maximum(tok, 0)[:, None]  # stopped rows carry _PAD; feed any valid id
            logits, cache = decode_forward(config, params, feed, cache, prompt_len + i - 1, positions=pos,
                                           segment_ids=ones)
            tok, done = pick(logits, i, done)
            out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
            return i + 1, cache, out, tok, done

        state = (jnp.int32(1), cache, out, first, done)
        _, _, out, _, _ = jax.lax.while_loop(cond, body, state)
        return out

    return run


# Streaming: the compiled loop calls this host function; the current call's callback is
# looked up here, so one compiled program serves every callback.
_sink: list[Callable | None] = [None]


def _stream_sink(step, tokens):
    if _sink[0] is not None:
        _sink[0](int(step), np.asarray(tokens))


@functools.lru_cache(maxsize=32)
def _compiled(config: ModelConfig, prompt_len: int, cache_len: int, mode: Sampling, streaming: bool, mesh):
    fn = _decode_fn(config, prompt_len, cache_len, mode, streaming)
    if mesh is None:
        return jax.jit(fn)
    from llama_jax import sharding
    rep = sharding.replicated(mesh)
    return jax.jit(fn, in_shardings=(_param_shardings(config, mesh, True),) + (rep,) * 10, out_shardings=rep)


@functools.lru_cache(maxsize=16)
def _param_shardings(config: ModelConfig, mesh, split: bool):
    """The params' NamedShardings on `mesh`, stacked or in the split (per-layer, fused) form."""
    from llama_jax import sharding
    stacked = nn.unbox(sharding.logical_to_shardings(param_shapes(config), mesh))
    if not split:
        return stacked
    one = nn.unbox(sharding.logical_to_shardings(decode_layer_shapes(config), mesh))
    return {**stacked, "layers": (one,) * config.n_layers}


@functools.lru_cache(maxsize=16)
def _splitter(config: ModelConfig, mesh):
    if mesh is None:
        return jax.jit(split_layers)
    return jax.jit(split_layers, in_shardings=(_param_shardings(config, mesh, False),),
                   out_shardings=_param_shardings(config, mesh, True))


def _decode_params(config: ModelConfig, params, mesh):
    """The params in the split form the compiled loop takes, placed on the mesh if any."""
    params = nn.unbox(params)
    split = is_split(params)
    if mesh is not None:
        # A no-op for params already on these shardings (e.g. from load_checkpoint(mesh=...)).
        params = jax.device_put(params, _param_shardings(config, mesh, split))
    return params if split else _splitter(config, mesh)(params)  # one copy of the weights per call


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
             mesh=None) -> list[list[int]]:
    """Continue each prompt (a list of token ids); return per prompt the new ids only.

    A row stops after a stop id (default: the LLaMA eos, see `default_stop_ids`; pass () to
    never stop), which is included in its result. `stream(step, tokens)` is called on the
    host once per step with one id per prompt (-1 for rows that have stopped). With `mesh`,
    params are placed on the model's logical shardings (tensor-parallel over "tensor").
    `params` may be stacked (as stored) or `decode.split_layers(params)`, which saves a copy.
    """
    rows = _check_prompts(config, prompts, max_new_tokens)
    mode = _check_sampling(config, temperature, top_p, top_k)
    check_params(config, params)
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
    fn = _compiled(config, prompt_len, cache_len, mode, stream is not None, mesh)
    args = (tokens, positions, segments, lengths, done, np.int32(max_new_tokens), stop_arr,
            jax.random.PRNGKey(seed), np.float32(max(temperature, 1e-6)), np.float32(top_p))
    _sink[0] = None if stream is None else _Reorder(stream, len(rows))
    try:
        out = _run(fn, _decode_params(config, params, mesh), args, mesh)
    finally:
        _sink[0] = None
    return [[int(t) for t in row[:max_new_tokens] if t != _PAD] for row in out[:len(rows)]]


def _run(fn, params, args, mesh) -> np.ndarray:
    if mesh is None:
        return np.asarray(fn(params, *args))
    from llama_jax import sharding
    with sharding.activate(mesh):  # the model's logical constraints resolve against this mesh
        out = fn(params, *args)
    return np.asarray(jax.device_get(out))

