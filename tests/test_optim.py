"""The paper's optimizer: LR schedule values, weight-decay mask, clipping, float32 state."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax import ModelConfig

from llama_jax.train import optim
from llama_jax.model import param_shapes


def test_schedule_values_at_start_end_of_warmup_midway_and_end():
    cfg = optim.OptimizerConfig(peak_lr=3e-4, warmup_steps=2000)
    lr = optim.lr_schedule(cfg, total_steps=10000)
    assert float(lr(0)) == 0.0
    assert float(lr(1000)) == pytest.approx(1.5e-4, rel=1e-6)       # linear warmup
    assert float(lr(2000)) == pytest.approx(3e-4, rel=1e-6)         # peak
    assert float(lr(6000)) == pytest.approx(3e-5 + 0.5 * 2.7e-4, rel=1e-5)  # cosine midway
    assert float(lr(10000)) == pytest.approx(3e-5, rel=1e-5)        # 10% of the peak
    assert float(lr(20000)) == pytest.approx(3e-5, rel=1e-5)        # and it stays there


def test_total_steps_overrides_run_length_and_bad_values_fail():
    cfg = optim.OptimizerConfig(peak_lr=1.0, warmup_steps=0, total_steps=100)
    assert float(optim.lr_schedule(cfg, total_steps=10)(100)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup"):
        optim.lr_schedule(optim.OptimizerConfig(warmup_steps=100), total_steps=50)
    with pytest.raises(ValueError, match="unknown keys"):
        optim.OptimizerConfig.from_dict({"peak_lr": 1.0, "lr": 2.0})


def test_decay_mask_takes_matrices_and_skips_norms_even_when_stacked():
    params = jax.tree.map(lambda x: x.value, param_shapes(ModelConfig.preset("tiny")),
                          is_leaf=lambda x: hasattr(x, "value"))
    mask = optim.decay_mask(params)
    assert mask["layers"]["attention"]["wq"] and mask["layers"]["feed_forward"]["w2"]
    assert mask["output"] and mask["tok_embeddings"]
    # [L, D] once stacked, yet vectors per layer: no decay.
    assert not mask["layers"]["attention_norm"]["weight"] and not mask["layers"]["ffn_norm"]["weight"]
    assert not mask["norm"]["weight"]


def test_weight_decay_moves_matrices_only_and_state_is_float32():
    cfg = optim.OptimizerConfig(peak_lr=0.5, warmup_steps=0, total_steps=10, weight_decay=0.1)
    tx = optim.make_optimizer(cfg, 10)
    params = {"w": jnp.ones((3, 4)), "norm": {"weight": jnp.ones((2, 4))}, "b": jnp.ones((4,))}
    state = tx.init(params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state) if x.ndim)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, state, params)
    # With zero gradients only decoupled decay moves weights: -lr * wd * w.
    np.testing.assert_allclose(updates["w"], -0.5 * 0.1 * np.ones((3, 4)), rtol=1e-6)
    np.testing.assert_array_equal(updates["norm"]["weight"], 0.0)
    np.testing.assert_array_equal(updates["b"], 0.0)


def test_gradients_are_clipped_to_global_norm_one_before_adam():
    cfg = optim.OptimizerConfig(peak_lr=1.0, warmup_steps=0, total_steps=10, b1=0.5)
    tx = optim.make_optimizer(cfg, 10)
    params = {"w": jnp.zeros((2,))}
    _, state = tx.update({"w": jnp.array([30.0, 40.0])}, tx.init(params), params)
    # Adam's first moment after one step is (1 - b1) * g, and g arrives clipped to norm 1.
    np.testing.assert_allclose(state[1][0].mu["w"], 0.5 * np.array([0.6, 0.8]), rtol=1e-6)
