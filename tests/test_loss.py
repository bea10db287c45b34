"""llama_jax.losses, the one log-probability used by training and evaluation: against optax's
gather-based cross-entropy, and against a direct float64 numpy computation through both of
its users (train/state.token_losses and evaluation/scoring.Scorer)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax import Llama, ModelConfig
from llama_jax.evaluation.scoring import Scorer
from llama_jax.losses import masked_cross_entropy, token_log_probs
from llama_jax.train.state import token_losses


def _log_softmax64(logits, targets):
    """log p(target) in float64 numpy: x - max - log(sum(exp(x - max)))."""
    x = np.asarray(logits, np.float64)
    m = x.max(-1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    return np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]


def test_cross_entropy_and_its_gradient_equal_optax():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((2, 600, 300)) * 8).astype(np.float32)
    logits[0, :10] += 60.0  # large logits: the log-sum-exp must stay stable
    targets = rng.integers(0, 300, (2, 600)).astype(np.int32)
    targets[1, :3] = [0, 299, 299]  # both ends of the vocabulary
    weights = rng.standard_normal((2, 600)).astype(np.float32)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(-token_log_probs(logits, targets), ref, rtol=1e-6, atol=1e-5)
    ours_g = jax.grad(lambda x: masked_cross_entropy(x, targets, weights)[0])(logits)
    ref_g = jax.grad(lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, targets) * weights))(logits)
    np.testing.assert_allclose(ours_g, ref_g, rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(ours_g)).all()


def test_log_probs_and_masked_sum_equal_float64():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((3, 50, 257)) * 6).astype(np.float32)
    logits[2, 5:9] += 80.0
    targets = rng.integers(0, 257, (3, 50)).astype(np.int32)
    mask = (rng.random((3, 50)) < 0.7).astype(np.float32)
    ref = _log_softmax64(logits, targets)
    np.testing.assert_allclose(token_log_probs(logits, targets), ref, rtol=1e-6, atol=2e-5)
    s, n = masked_cross_entropy(logits, targets, mask)
    assert float(n) == mask.sum()
    np.testing.assert_allclose(float(s), -(ref * mask).sum(), rtol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.preset("tiny")
    params = Llama(cfg).init(jax.random.PRNGKey(3), jnp.zeros((1, 1), jnp.int32))["params"]
    return cfg, jax.tree.map(lambda x: x * 4, nn.unbox(params))  # x4: peakier logits


def test_training_and_evaluation_both_give_the_float64_log_probs(tiny):
    """The same token log-probs, from the model's own logits, through both users."""
    cfg, params = tiny
    rng = np.random.default_rng(2)
    ids = rng.integers(1, cfg.vocab_size, (2, 33)).astype(np.int32)
    tokens, targets = ids[:, :-1], ids[:, 1:]
    logits = Llama(cfg).apply({"params": params}, tokens)
    ref = _log_softmax64(logits, targets)  # [2, 32] float64 from float32 logits
    mask = np.zeros((2, 32), np.float32)
    mask[0, 3:] = 1.0
    mask[1, :20] = 1.0
    batch = {"tokens": tokens, "targets": targets, "loss_mask": mask,
             "positions": np.tile(np.arange(32, dtype=np.int32), (2, 1)), "segment_ids": np.ones((2, 32), np.int32)}
    s, n = token_losses(Llama(cfg), params, batch)
    assert float(n) == mask.sum()
    np.testing.assert_allclose(float(s), -(ref * mask).sum(), rtol=1e-5)
    # Evaluation: row 0's continuation is its last 29 targets, row 1's its first 20 (context: 1 token).
    pairs = [(ids[0, :4].tolist(), ids[0, 4:].tolist()), (ids[1, :1].tolist(), ids[1, 1:21].tolist())]
    got = Scorer(cfg, params, pack_length=32).loglikelihood(pairs)
    np.testing.assert_allclose([g[0] for g in got], [ref[0, 3:].sum(), ref[1, :20].sum()], rtol=1e-5)
