"""Tied input/output embeddings (Llama 3.2) in training, evaluation and generation, sharded.

The tied model is the untied one with `output = tok_embeddings.T`: same logits, and the
embedding's gradient is the sum of the gradients of its two uses.
"""
import jax
import numpy as np
import optax

from llama_jax import Llama, ModelConfig, generate, sharding as S
from llama_jax.train import state as TS
from llama_jax.checkpoint import abstract_params
from train_helpers import random_batch

TIED = ModelConfig.preset("tiny").replace(tie_word_embeddings=True)
UNTIED = TIED.replace(tie_word_embeddings=False)


def _params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s[0])).astype(np.float32), abstract_params(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))


def test_tied_has_no_output_and_counts_one_matrix():
    assert "output" not in abstract_params(TIED)
    assert UNTIED.num_params() - TIED.num_params() == TIED.vocab_size * TIED.dim


def test_tied_gradient_is_the_sum_of_both_uses():
    tied = _params(TIED)
    untied = {**tied, "output": tied["tok_embeddings"].T.copy()}
    batch = random_batch(TIED.vocab_size)

    def loss(cfg, p):
        s, n = TS.token_losses(Llama(cfg), p, batch)
        return s / n
    lt, gt = jax.jit(jax.value_and_grad(lambda p: loss(TIED, p)))(tied)
    lu, gu = jax.jit(jax.value_and_grad(lambda p: loss(UNTIED, p)))(untied)
    np.testing.assert_allclose(lt, lu, rtol=1e-6)
    both = np.asarray(gu["tok_embeddings"]) + np.asarray(gu["output"]).T
    np.testing.assert_allclose(gt["tok_embeddings"], both, rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(gu["output"])).max() > 1e-3  # the output use does contribute


def _train_and_eval(mesh):
    tx = optax.sgd(0.5)
    shardings = TS.state_shardings(TS.abstract_state(Llama(TIED), tx), mesh)
    params = jax.device_put(_params(TIED), shardings.params)
    state = TS.state_from_params(params, tx, shardings)
    step = TS.make_train_step(Llama(TIED), tx, optax.constant_schedule(0.5), mesh, shardings)
    batch = jax.device_put(random_batch(TIED.vocab_size), TS.batch_sharding(mesh))
    state, metrics = step(state, batch)
    evaluated = TS.make_eval_step(Llama(TIED), mesh, shardings.params)(state.params, batch)
    return state, metrics, evaluated


def test_train_eval_and_generate_sharded_equal_one_device():
    mesh = S.make_mesh((1, 2, 4))  # the tied matrix: vocab over "tensor", embed over "fsdp"
    one = S.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    s8, m8, e8 = _train_and_eval(mesh)
    s1, m1, e1 = _train_and_eval(one)
    assert tuple(s8.params["tok_embeddings"].sharding.spec) == ("tensor", "fsdp")
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(e8["loss_sum"], e1["loss_sum"], rtol=1e-5)
    np.testing.assert_allclose(jax.device_get(s8.params["tok_embeddings"]),
                               jax.device_get(s1.params["tok_embeddings"]), rtol=1e-5, atol=1e-6)
    assert float(e1["loss_sum"] / e1["tokens"]) < float(m1["loss"])  # the step learned something
    prompts = [[1, 5, 9, 33], [1, 7]]
    params = jax.device_get(s1.params)
    assert generate(TIED, params, prompts, 8, mesh=mesh) == generate(TIED, params, prompts, 8)
