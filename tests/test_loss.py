"""The training loss: our one-hot cross-entropy against optax's gather-based one."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llama_jax.train.state import cross_entropy


def test_cross_entropy_and_its_gradient_equal_optax():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((2, 600, 300)) * 8).astype(np.float32)
    logits[0, :10] += 60.0  # large logits: the log-sum-exp must stay stable
    targets = rng.integers(0, 300, (2, 600)).astype(np.int32)
    targets[1, :3] = [0, 299, 299]  # both ends of the vocabulary
    weights = rng.standard_normal((2, 600)).astype(np.float32)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(cross_entropy(logits, targets), ref, rtol=1e-6, atol=1e-5)
    ours_g = jax.grad(lambda x: jnp.sum(cross_entropy(x, targets) * weights))(logits)
    ref_g = jax.grad(lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, targets) * weights))(logits)
    np.testing.assert_allclose(ours_g, ref_g, rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(ours_g)).all()
