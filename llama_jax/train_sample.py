"""A text sample at the end of training: `llama_jax.generate` when present, else a small
jitted prefill + decode loop over the explicit KV cache."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.model import Llama, init_cache


def _decode_fns(config: ModelConfig):
    model = Llama(config)

    @jax.jit
    def prefill(params, tokens, cache):
        logits, cache = model.apply({"params": params}, tokens, cache=cache, cache_index=0)
        return logits[:, -1], cache

    @jax.jit
    def decode(params, token, cache, index):
        logits, cache = model.apply({"params": params}, token[:, None], cache=cache, cache_index=index)
        return logits[:, -1], cache

    return prefill, decode


def _pick(logits, temperature: float, key):
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(key, logits / temperature, axis=-1)


def simple_generate(config: ModelConfig, params, prompt: list[int], max_new_tokens: int,
                    temperature: float = 0.0, seed: int = 0, eos_id: int | None = None) -> list[int]:
    """Generated ids for one prompt (greedy at temperature 0), ending at eos if produced."""
    prefill, decode = _decode_fns(config)
    cache = init_cache(config, 1, len(prompt) + max_new_tokens)
    logits, cache = prefill(params, jnp.asarray([prompt], jnp.int32), cache)
    key, out = jax.random.PRNGKey(seed), []
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        tok = _pick(logits, temperature, sub)
        out.append(int(tok[0]))
        if out[-1] == eos_id:
            break
        logits, cache = decode(params, tok.astype(jnp.int32), cache, len(prompt) + i)
    return out


def sample_text(config: ModelConfig, params, tokenizer, prompt: str, max_new_tokens: int,
                temperature: float = 0.0, seed: int = 0) -> str:
    """The prompt and its continuation as text. `params` may be sharded: they are gathered to
    host first (meant for small models: the demo's end-of-run sample)."""
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
    ids = tokenizer.encode(prompt, bos=True)
    try:
        from llama_jax.generate import generate
    except ImportError:
        new = simple_generate(config, params, ids, max_new_tokens, temperature, seed, tokenizer.eos_id)
    else:
        new = generate(config, params, [ids], max_new_tokens, temperature=temperature, seed=seed)[0]
    return tokenizer.decode(ids + list(new))
