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


def _head_case(seed=5, b=2, t=96, d=24, v=301):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, t, d)).astype(np.float32)
    w = (rng.standard_normal((d, v)) * 0.6).astype(np.float32)
    w[:, 7] += 3.0  # one peaky column: large logits for the log-sum-exp
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = (rng.random((b, t)) < 0.6).astype(np.float32)
    return x, w, targets, mask


@pytest.mark.parametrize("chunk", [1, 32, 96])
def test_head_cross_entropy_equals_the_logits_path_in_value_and_gradients(chunk):
    """The chunked head + loss (grad computed in the forward pass) against the plain path:
    the float32 logits x @ w, then masked_cross_entropy, differentiated by jax."""
    from llama_jax.losses import head_cross_entropy
    from llama_jax.model import output_logits
    x, w, targets, mask = _head_case()

    def plain(x, w):
        return masked_cross_entropy(output_logits(x, w), targets, mask)[0]

    def fused(x, w):
        return head_cross_entropy(x, w, targets, mask, chunk)[0]

    np.testing.assert_allclose(float(fused(x, w)), float(plain(x, w)), rtol=1e-6)
    assert float(head_cross_entropy(x, w, targets, mask, chunk)[1]) == mask.sum()
    scale = lambda f: lambda x, w: 0.37 * f(x, w)  # noqa: E731 (a cotangent other than 1)
    ref = jax.grad(scale(plain), (0, 1))(x, w)
    got = jax.jit(jax.grad(scale(fused), (0, 1)))(x, w)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


def _dot_output_shapes(jaxpr) -> list:
    """Output shapes of every dot_general in a jaxpr, inside scans and custom rules too."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(eqn.outvars[0].aval.shape))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dot_output_shapes(inner)
    return found


def test_head_cross_entropy_skips_the_weight_gradient_of_a_frozen_matrix():
    """With w closed over (LoRA's frozen base), no [D, V] matmul is in the gradient's program."""
    from llama_jax.losses import head_cross_entropy
    x, w, targets, mask = _head_case(t=64)
    frozen = jax.make_jaxpr(jax.grad(lambda x: head_cross_entropy(x, w, targets, mask, 32)[0]))(x)
    both = jax.make_jaxpr(jax.grad(lambda x, w: head_cross_entropy(x, w, targets, mask, 32)[0], (0, 1)))(x, w)
    assert (24, 301) not in _dot_output_shapes(frozen.jaxpr)
    assert (24, 301) in _dot_output_shapes(both.jaxpr)  # the check can fail: with w differentiated it is there


def test_head_cross_entropy_rejects_a_chunk_that_does_not_divide_the_positions():
    from llama_jax.losses import default_chunk, head_cross_entropy
    x, w, targets, mask = _head_case(t=96)
    with pytest.raises(ValueError, match="chunk 40 does not divide the 96 positions"):
        head_cross_entropy(x, w, targets, mask, 40)
    assert default_chunk(4, 2048, 128256) == 512  # [4, 512, 128256] float32 = 1.05e9 bytes <= 1 GiB
    assert default_chunk(8, 2048, 32000) == 1024
    assert default_chunk(1, 7, 10**9) == 1
