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


@pytest.mark.parametrize("loop", ["scan", "unrolled"])
def test_remat_attention_keeps_no_mlp_activation_and_changes_no_gradient(params, loop):
    """Remat "attention" (the LoRA memory policy): the adapters' gradients equal those of
    no remat, and what the backward pass keeps holds nothing [B, T, F] (the MLP is
    recomputed) and each projection once (not a base and a LoRA term apart, as "dots" does)."""
    from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints
    lora = L.LoraConfig(rank=4, alpha=8, targets=ALL)
    adapters, tokens = _random_adapters(lora), _tokens()

    def loss(run):
        return lambda a: jax.numpy.sum(Llama(CFG, run, lora=lora).apply({"params": params, "lora": a}, tokens) ** 2)

    runs = {p: RunOptions(layer_loop=loop, remat_policy=p) for p in ("none", "attention", "dots_flash")}
    ref = jax.jit(jax.grad(loss(runs["none"])))(adapters)
    got = jax.jit(jax.grad(loss(runs["attention"])))(adapters)
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):  # float32; recomputation reorders sums:
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6 * np.abs(r).max())

    def kept(policy):  # the saved activations: arrays with the [B, T] token axes
        shapes = [tuple(a.shape) for a, _ in saved_residuals(loss(runs[policy]), adapters)]
        return [s for s in shapes if tokens.shape in (s[:2], s[1:3])]  # ([L, B, T, ...] under scan)
    attention, dots = kept("attention"), kept("dots_flash")
    assert not [s for s in attention if CFG.ffn_hidden_dim in s]
    assert [s for s in dots if CFG.ffn_hidden_dim in s]  # (the check above can fail)
    size = lambda shapes: sum(int(np.prod(s)) for s in shapes)  # noqa: E731
    assert size(attention) < 0.5 * size(dots)
