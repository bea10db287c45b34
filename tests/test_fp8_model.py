"""FP8 in the model and the trainer (`RunOptions.matmul_precision=fp8`) on the CPU.

Expected errors (tests/test_fp8.py derives the per-dot figures): one FP8 projection with two
e4m3 operands has relative RMS error E = 0.0376; a gradient dot (e5m2 x e4m3) Eg = 0.0594.
- Logits. The residual stream is the embedding (exact) plus 2 branches a layer, each two
  projections in series (wq/wk/wv then wo; w1/w3 then w2): a branch's relative error is at
  most sqrt(2) E = 0.053 (its own last dot plus the first dot's, carried through), and the
  final RMSNorm and the bf16/float32 output projection keep relative errors. So the logits'
  relative error lies in (E / 4, sqrt(2) E): at least a fraction of one dot's error (the
  exact embedding dilutes it), at most the worst branch's.
- Weight gradients. dW of a projection carries its own dot's Eg, the incoming gradient's
  error from up to two dX dots (2 Eg^2) and the forward error sqrt(2) E:
  sqrt(3 Eg^2 + 2 E^2) = 0.116 at most, and at least its own Eg.
A missing quantisation (error ~0) or a wrong scale (error ~1 or more) fails both.
Delayed scaling: tests/test_fp8_delayed.py.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import Llama, ModelConfig, RunOptions, fp8, generate
from llama_jax.runtime import MatmulPrecision
from llama_jax.train import loop as trainer
from llama_jax.train.config import run_options
from train_helpers import STEPS, assert_same_losses, losses, tiny_config
from train_helpers import reference, tokenizer_path  # noqa: F401  (fixtures)

E = math.hypot(2.0 ** -3 * 0.2125, 2.0 ** -3 * 0.2125)    # e4m3 x e4m3
EG = math.hypot(2.0 ** -2 * 0.2125, 2.0 ** -3 * 0.2125)   # e5m2 x e4m3
FP8 = RunOptions(matmul_precision="fp8")
PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def setup():
    config = ModelConfig.preset("tiny")
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 64), 0, config.vocab_size)
    params = Llama(config, RunOptions()).init(jax.random.PRNGKey(0), tokens)["params"]
    return config, params, tokens


def _fp8_dots(jaxpr) -> tuple[int, int]:
    """(dot_generals with FP8 operands, all dot_generals) in a jaxpr, sub-jaxprs included."""
    f8, total = 0, 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_generals" or eqn.primitive.name == "dot_general":
            total += 1
            f8 += all(jnp.dtype(v.aval.dtype).itemsize == 1 for v in eqn.invars)
        for sub in jax.core.jaxprs_in_params(eqn.params):
            a, b = _fp8_dots(sub)
            f8, total = f8 + a, total + b
    return f8, total


def test_option_parses_and_defaults_to_bf16():
    assert RunOptions().matmul_precision is MatmulPrecision.BF16
    assert FP8.matmul_precision is MatmulPrecision.FP8
    cfg = tiny_config(**{"run.matmul_precision": "fp8"})
    assert run_options(cfg).matmul_precision is MatmulPrecision.FP8
    with pytest.raises(ValueError, match="matmul_precision"):
        RunOptions(matmul_precision="fp4")


@pytest.mark.parametrize("fuse", [False, True])
def test_every_layer_projection_is_fp8_and_the_output_is_not(setup, fuse):
    config, params, tokens = setup
    run = FP8.replace(fuse_gate_up=fuse, layer_loop="unrolled", interpret_kernels=True)
    jaxpr = jax.make_jaxpr(lambda p: Llama(config, run).apply({"params": p}, tokens))(params).jaxpr
    f8, total = _fp8_dots(jaxpr)
    per_layer = 6 if fuse else 7  # wq wk wv wo w2 + (w1|w3 or w1, w3)
    assert f8 == per_layer * config.n_layers
    assert total - f8 == 2 * config.n_layers + 1  # attention's two batched dots a layer, the output head
    plain = jax.make_jaxpr(lambda p: Llama(config, run.replace(matmul_precision="bf16")).apply(
        {"params": p}, tokens))(params).jaxpr
    assert _fp8_dots(plain) == (0, total)


def test_logits_within_fp8_error(setup):
    config, params, tokens = setup
    want = Llama(config, RunOptions()).apply({"params": params}, tokens)
    got = Llama(config, FP8).apply({"params": params}, tokens)
    assert got.dtype == jnp.float32
    assert E / 4 < _rel(got, want) < math.sqrt(2) * E


def test_gradients_within_fp8_error(setup):
    config, params, tokens = setup

    def loss(p, run):
        logits = Llama(config, run).apply({"params": p}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    want, got = jax.grad(loss)(params, RunOptions()), jax.grad(loss)(params, FP8)
    for module in ("attention", "feed_forward"):
        for name, g in got["layers"][module].items():
            assert g.value.dtype == jnp.float32  # float32 master weights get float32 gradients
            err = _rel(g.value, want["layers"][module][name].value)
            assert EG < err < math.sqrt(3 * EG ** 2 + 2 * E ** 2), (name, err)


@pytest.mark.parametrize("remat", ["full", "minimal", "dots_flash"])
def test_remat_keeps_fp8_gradients(setup, remat):
    config, params, tokens = setup

    def grads(run):
        def loss(p):
            return jnp.mean(Llama(config, run).apply({"params": p}, tokens) ** 2)
        return jax.jit(jax.grad(loss))(params)["layers"]

    plain = grads(FP8.replace(layer_loop="unrolled"))
    f32 = grads(RunOptions(layer_loop="unrolled"))
    got = grads(FP8.replace(remat_policy=remat, layer_loop="unrolled"))
    for module in ("attention", "feed_forward"):
        for name in got[module]:
            g, p, r = (t[module][name].value for t in (got, plain, f32))
            if remat == "dots_flash":
                # Saving the FP8 dot's output materialises it in bf16 (preferred_element_type),
                # where the plain step's XLA:CPU fusion rescales it unrounded: every later
                # FP8 rounding may land elsewhere (measured 2-8% apart; identical with a
                # float32 dot output). An equally good FP8 gradient: the same bound to float32.
                assert EG < _rel(g, r) < math.sqrt(3 * EG ** 2 + 2 * E ** 2), (name, _rel(g, r))
            else:  # recomputed quantisations are the same values (tests/test_fp8.py::test_remat_policies)
                assert _rel(g, p) < 2.0 ** -6, (name, _rel(g, p))


def test_decode_stays_in_the_compute_dtype(setup):
    config, params, _ = setup
    prompts = [[1, 5, 9, 200], [7, 3]]
    want = generate(config, params, prompts, 8, run=RunOptions())
    assert generate(config, params, prompts, 8, run=FP8) == want


def test_train_loss_falls_near_float32_and_resume_is_exact(tmp_path, tokenizer_path, reference):
    over = {"data.tokenizer": tokenizer_path, "run.matmul_precision": "fp8"}
    full = str(tmp_path / "full")
    trainer.train(tiny_config(**over, mesh=(1, 8, 1)), full)
    got = losses(full)
    assert got[STEPS] < got[1] - 0.1, got
    for s in reference:  # within a few FP8 roundings of the float32 run's loss, not equal to it
        assert 0 < abs(got[s] - reference[s]) < 0.01 * reference[s], (s, got[s], reference[s])
    # 3 steps, stop, resume to 6 on the same mesh: bit for bit (current scaling keeps no state).
    resumed = str(tmp_path / "resumed")
    trainer.train(tiny_config(**over, mesh=(1, 8, 1), steps=3, **{"optimizer.total_steps": STEPS}), resumed)
    trainer.train(tiny_config(**over, mesh=(1, 8, 1)), resumed)
    assert_same_losses(losses(resumed), got)


def test_sharded_training_matches_unsharded(tmp_path, tokenizer_path):
    # Amaxes are global under any mesh (tests/test_fp8.py checks one dot bit for bit); here
    # the float32 sums feeding each quantisation are ordered differently per mesh, so a value
    # on a rounding boundary may flip to its FP8 neighbour: equal to ~1e-5, not to 2e-6.
    over = {"data.tokenizer": tokenizer_path, "run.matmul_precision": "fp8", "steps": 3,
            "optimizer.total_steps": STEPS}
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    trainer.train(tiny_config(**over, mesh=(8, 1, 1)), one)
    trainer.train(tiny_config(**over, mesh=(2, 2, 2)), two)
    assert_same_losses(losses(two), losses(one), rtol=1e-4)


def test_gradient_format_option(setup):
    """RunOptions.fp8_grad_format: e5m2 (default) or e4m3 gradients; the gradient dots take that format."""
    config, params, tokens = setup
    assert fp8.recipe_of(RunOptions()) is None and fp8.recipe_of(FP8).grad_dtype == jnp.float8_e5m2
    e4m3 = FP8.replace(fp8_grad_format="e4m3")
    assert fp8.recipe_of(e4m3).grad_dtype == jnp.float8_e4m3fn and RunOptions.from_dict(e4m3.to_dict()) == e4m3
    with pytest.raises(ValueError, match="fp8_grad_format"):
        RunOptions(fp8_grad_format="e3m4")

    def grads(run):
        loss = lambda p: jnp.sum(Llama(config, run).apply({"params": p}, tokens).astype(jnp.float32) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss)), loss
    g5, loss = grads(FP8)
    g4, _ = grads(e4m3)
    ref = jax.grad(lambda p: jnp.sum(Llama(config, RunOptions()).apply({"params": p}, tokens) ** 2))(params)
    assert "f8_e5m2" in str(jax.make_jaxpr(jax.grad(loss))(params))
    assert "f8_e5m2" not in str(jax.make_jaxpr(jax.grad(grads(e4m3)[1]))(params))
    a, b = g5(params)["layers"]["feed_forward"]["w2"].value, g4(params)["layers"]["feed_forward"]["w2"].value
    r = ref["layers"]["feed_forward"]["w2"].value
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert _rel(b, r) < _rel(a, r) < 2 * EG  # e4m3's extra mantissa bit: closer to float32


def test_run_summary_says_how_the_matmuls_run():
    """The start-of-run summary names FP8 and its settings, and notes FP8 keys set without FP8."""
    from types import SimpleNamespace

    from llama_jax.train import report

    def lines(**overrides):
        run = SimpleNamespace(cfg=tiny_config(**overrides), model=ModelConfig.preset("tiny"), start_step=0,
                              workdir="w", tokenizer=None, mesh=SimpleNamespace(shape={"data": 1}))
        return report.summary_lines(run)
    assert lines()[1].endswith("compute float32, params float32") and not any("note" in x for x in lines())
    assert lines(**{"run.matmul_precision": "fp8"})[1].endswith(
        "compute float32, params float32; weight matmuls in FP8 (current scaling, e5m2 gradients)")
    got = lines(**{"run.matmul_precision": "fp8", "run.fp8_scaling": "delayed", "run.fp8_history": 8,
                   "run.fp8_grad_format": "e4m3"})
    assert got[1].endswith("; weight matmuls in FP8 (delayed scaling over 8 steps, e4m3 gradients)")
    got = lines(**{"run.fp8_scaling": "delayed", "run.fp8_history": 8, "run.fp8_cast_kernel": False})
    assert got[2] == ("note: run.fp8_scaling=delayed, run.fp8_history=8, run.fp8_cast_kernel=False set, but the weight matmuls run in the "
                      "compute dtype (FP8 needs --config.run.matmul_precision=fp8): no effect")


def test_help_names_the_fp8_choices():
    from llama_jax.train.config_file import key_help
    h = key_help()
    assert "bf16" in h["run.matmul_precision"] and "fp8" in h["run.matmul_precision"]
    assert "current" in h["run.fp8_scaling"] and "delayed" in h["run.fp8_scaling"]
    assert "e5m2" in h["run.fp8_grad_format"] and "e4m3" in h["run.fp8_grad_format"]
    assert "delayed" in h["run.fp8_history"]
    assert "Pallas" in h["run.fp8_cast_kernel"] and "XLA" in h["run.fp8_cast_kernel"]


@pytest.mark.parametrize("key, value, expected", [
    ("fp8_grad_format", "e3m4", "one of ['e5m2', 'e4m3']"),
    ("fp8_history", 0, "a positive integer"),
    ("fp8_scaling", "lazy", "one of ['current', 'delayed']"),
    ("matmul_precision", "fp16", "one of ['bf16', 'fp8']"),
])
def test_bad_fp8_option_names_the_config_key(key, value, expected):
    from llama_jax.errors import InputError
    with pytest.raises(InputError) as e:
        run_options(tiny_config(**{f"run.{key}": value}))
    got = f"'{value}'" if isinstance(value, str) else value
    assert str(e.value) == f"config.run.{key}: invalid value (expected {expected}, got {got})"
