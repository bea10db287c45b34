"""Samplers: Meta's top-p rule against numpy, top-k, the frequencies `sample` draws, reproducibility,
streaming."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from llama_jax import Llama, ModelConfig, generate
from llama_jax.inference.generate import Sampling, filtered_probs, sample

CFG = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=128, multiple_of=16, max_seq_len=128)


def meta_top_p(logits, temperature, p):
    """Meta's sample_top_p distribution, written directly in numpy (float64), in vocab order."""
    z = logits / temperature
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")
    probs_sort = np.take_along_axis(probs, order, -1)
    probs_sum = np.cumsum(probs_sort, -1)
    probs_sort[probs_sum - probs_sort > p] = 0.0
    probs_sort /= probs_sort.sum(-1, keepdims=True)
    out = np.zeros_like(probs)
    np.put_along_axis(out, order, probs_sort, -1)
    return out


@pytest.mark.parametrize("temperature, p", [(1.0, 0.9), (0.7, 0.5), (1.3, 0.95), (0.6, 1e-4), (1.0, 1.0)])
def test_top_p_matches_meta_rule(temperature, p):
    logits = np.random.default_rng(0).standard_normal((4, 64)) * 3
    ours = np.asarray(filtered_probs(logits.astype(np.float32), temperature, p))
    np.testing.assert_allclose(ours, meta_top_p(logits, temperature, p), atol=1e-6)
    # The most likely token is always kept; with a tiny p it is the only one.
    assert np.all(ours[np.arange(4), logits.argmax(-1)] > 0)
    if p < 1e-3:
        np.testing.assert_array_equal(ours, np.eye(64)[logits.argmax(-1)])


def test_top_k_keeps_the_k_most_likely():
    logits = np.random.default_rng(1).standard_normal((3, 50)).astype(np.float32)
    ours = np.asarray(filtered_probs(logits, 0.8, 1.0, top_k=5))
    top5 = np.argsort(-logits, -1)[:, :5]
    expected = np.zeros_like(ours)
    z = np.take_along_axis(logits, top5, -1) / 0.8
    np.put_along_axis(expected, top5, np.exp(z) / np.exp(z).sum(-1, keepdims=True), -1)
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def expected_probs(logits, temperature, p, k):
    """float64 numpy: keep the k largest logits, softmax at `temperature`, then Meta's top-p."""
    z = np.full_like(logits, -np.inf)
    keep = np.argsort(-logits, kind="stable")[:k or len(logits)]
    z[keep] = logits[keep]
    return meta_top_p(z[None], temperature, p)[0] if p < 1.0 else np.exp(z / temperature - np.logaddexp.reduce(z / temperature))


N_DRAWS = 40_000


@pytest.mark.parametrize("temperature, p, k", [(1.0, 1.0, None), (0.7, 0.8, None), (1.6, 0.95, None),
                                               (1.3, 1.0, 5), (0.9, 0.8, 7)])
def test_sample_draws_the_filtered_distribution(temperature, p, k):
    """`sample`, as generation calls it (one row a step), over 40k keys in one jitted call:
    every token's frequency within 5 standard errors of the exact filtered probability,
    and filtered-out tokens never drawn."""
    logits = np.random.default_rng(7).standard_normal(12) * 1.5
    mode = Sampling(greedy=False, top_p=p < 1.0, top_k=k)
    draw = jax.jit(jax.vmap(lambda key: sample(logits[None].astype(np.float32), key, temperature, p, mode)[0]))
    tokens = np.asarray(draw(jax.random.split(jax.random.PRNGKey(11), N_DRAWS)))
    freq = np.bincount(tokens, minlength=12) / N_DRAWS
    want = expected_probs(logits, temperature, p, k)
    assert 3 <= np.count_nonzero(want) <= (k or 12)  # the filter keeps several tokens, and cuts some
    np.testing.assert_array_equal(freq[want == 0], 0.0)
    bound = 5 * np.sqrt(want * (1 - want) / N_DRAWS)
    assert np.all(np.abs(freq - want) <= bound), np.stack([freq, want, bound])


@pytest.fixture(scope="module")
def params():
    p = Llama(CFG).init(jax.random.PRNGKey(0), np.ones((1, 8), np.int32))["params"]
    return jax.tree.map(lambda x: x * 20 if x.ndim > 1 else x, nn.unbox(p))  # sharper logits


PROMPTS = [[1, 7, 9], [1, 20, 30, 40, 50, 60]]


def test_sampling_is_reproducible(params):
    kw = dict(temperature=1.0, top_p=0.9, stop_ids=())
    a = generate(CFG, params, PROMPTS, 20, seed=3, **kw)
    assert a == generate(CFG, params, PROMPTS, 20, seed=3, **kw)
    assert a != generate(CFG, params, PROMPTS, 20, seed=4, **kw)
    b = generate(CFG, params, PROMPTS, 20, temperature=0.9, seed=3, stop_ids=(), top_k=10)
    assert b == generate(CFG, params, PROMPTS, 20, temperature=0.9, seed=3, stop_ids=(), top_k=10)


def test_degenerate_samplers_are_greedy(params):
    greedy = generate(CFG, params, PROMPTS, 16, stop_ids=())
    assert generate(CFG, params, PROMPTS, 16, temperature=1.0, top_p=1e-6, seed=5, stop_ids=()) == greedy
    assert generate(CFG, params, PROMPTS, 16, temperature=1.0, top_k=1, seed=5, stop_ids=()) == greedy


def test_stream_reports_every_step_in_order(params):
    seen = []
    out = generate(CFG, params, PROMPTS, 12, temperature=0.8, seed=1, stream=lambda i, t: seen.append((i, t)))
    assert [i for i, _ in seen] == list(range(len(seen)))
    streamed = np.array([t for _, t in seen])  # [steps, rows]
    for r, row in enumerate(out):
        assert streamed[:len(row), r].tolist() == row
        assert np.all(streamed[len(row):, r] == -1)
