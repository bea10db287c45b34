"""LoRA in the model's forward (Llama(config, run, lora=...)): adapters as the "lora" collection.

float32, random "tiny" model: zero b gives the base logits exactly; the unmerged forward
equals the merged params' forward on every layer loop and fusion; dropout only with an rng.
Parity with peft on the unmerged forward: tests/test_lora_peft.py.
"""
import flax.linen as nn
import jax
import numpy as np
import pytest

from llama_jax import Llama, ModelConfig, lora as L
from llama_jax.runtime import LayerLoop, RematPolicy, RunOptions

CFG = ModelConfig.preset("tiny")
ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
RUNS = {
    "scan": RunOptions(),
    "unrolled": RunOptions(layer_loop=LayerLoop.UNROLLED),
    "fused_gate_up": RunOptions(fuse_gate_up=True),
    "remat_scan": RunOptions(remat_policy=RematPolicy.FULL),
    "remat_unrolled": RunOptions(layer_loop=LayerLoop.UNROLLED, remat_policy=RematPolicy.DOTS),
}


@pytest.fixture(scope="module")
def params():
    return nn.unbox(jax.jit(Llama(CFG).init)(jax.random.PRNGKey(0), _tokens()[:, :8])["params"])


def _tokens(seed=1, t=96):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (2, t)).astype(np.int32)


def _random_adapters(lora, seed=0):
    adapters = L.init_adapters(CFG, lora, jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 16))
    return jax.tree.map(lambda x: x if np.any(np.asarray(x)) else 0.05 * jax.random.normal(next(keys), x.shape),
                        adapters)


def _logits(run, lora, variables, tokens, **kw):
    return np.asarray(jax.jit(lambda v, t: Llama(CFG, run, lora=lora).apply(v, t, **kw))(variables, tokens))


@pytest.mark.parametrize("run", list(RUNS), ids=list(RUNS))
def test_zero_b_gives_the_base_logits_exactly(params, run):
    lora = L.LoraConfig(rank=4, alpha=8, targets=ALL)
    adapters = L.init_adapters(CFG, lora, jax.random.PRNGKey(0))
    tokens = _tokens()
    base = _logits(RUNS[run], None, {"params": params}, tokens)
    np.testing.assert_array_equal(_logits(RUNS[run], lora, {"params": params, "lora": adapters}, tokens), base)


@pytest.mark.parametrize("run, targets", [(r, ALL) for r in RUNS] + [("fused_gate_up", ("wo", "w1")),
                                                                     ("scan", ("wv", "w3"))])
def test_unmerged_forward_equals_the_merged_params(params, run, targets):
    lora = L.LoraConfig(rank=4, alpha=8, targets=targets)
    adapters = _random_adapters(lora)
    tokens = _tokens()
    ours = _logits(RUNS[run], lora, {"params": params, "lora": adapters}, tokens)
    merged = _logits(RUNS[run], None, {"params": L.merge(params, adapters, lora)}, tokens)
    base = _logits(RUNS[run], None, {"params": params}, tokens)
    assert np.max(np.abs(ours - base)) > 1e-2  # the adapters matter
    np.testing.assert_allclose(ours, merged, rtol=1e-5, atol=1e-5)


def test_init_makes_the_base_schema_only():
    lora = L.LoraConfig(rank=2, targets=ALL)
    with_lora = jax.eval_shape(Llama(CFG, lora=lora).init, jax.random.PRNGKey(0), _tokens()[:, :8])
    base = jax.eval_shape(Llama(CFG).init, jax.random.PRNGKey(0), _tokens()[:, :8])
    assert set(with_lora) == {"params"}
    assert jax.tree.structure(with_lora) == jax.tree.structure(base)


@pytest.mark.parametrize("run", ["scan", "unrolled"])
def test_dropout_only_with_an_rng(params, run):
    lora = L.LoraConfig(rank=4, alpha=8, dropout=0.5, targets=ALL)
    variables = {"params": params, "lora": _random_adapters(lora)}
    tokens = _tokens()
    plain = _logits(RUNS[run], lora, variables, tokens)
    merged = _logits(RUNS[run], None, {"params": L.merge(params, variables["lora"], lora)}, tokens)
    np.testing.assert_allclose(plain, merged, rtol=1e-5, atol=1e-5)  # no rng: no dropout
    d1 = _logits(RUNS[run], lora, variables, tokens, rngs={"dropout": jax.random.PRNGKey(1)})
    d2 = _logits(RUNS[run], lora, variables, tokens, rngs={"dropout": jax.random.PRNGKey(2)})
    assert np.max(np.abs(d1 - plain)) > 1e-3 and np.max(np.abs(d1 - d2)) > 1e-3


@pytest.mark.parametrize("run", ["scan", "unrolled"])
def test_missing_adapters_is_an_error(params, run):
    lora = L.LoraConfig(rank=2, targets=("wq",))
    with pytest.raises(ValueError, match=r"needs the adapters.*missing .*wq"):
        Llama(CFG, RUNS[run], lora=lora).apply({"params": params}, _tokens())
