"""FP8 delayed scaling in the model and the trainer (`RunOptions.fp8_scaling=delayed`) on the CPU:
the amax histories of the "fp8" collection, the calibration of a fresh run, checkpoints and
resume. The expected FP8 errors (E, EG) are derived in tests/test_fp8_model.py's docstring.
"""
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import Llama, ModelConfig, RunOptions, fp8, model as model_lib
from llama_jax.runtime import Fp8Scaling
from llama_jax.train import loop as trainer
from llama_jax.train import state as TS
from llama_jax.train.config import run_options
from test_fp8_model import E, FP8, _fp8_dots, _rel, setup  # noqa: F401  (setup: a fixture)
from train_helpers import STEPS, assert_same_losses, losses, random_batch, tiny_config
from train_helpers import reference, tokenizer_path  # noqa: F401  (fixtures)

DELAYED = FP8.replace(fp8_scaling="delayed", fp8_history=4)
SITES = {"attention": ("wq", "wk", "wv", "wo"), "feed_forward": ("w1", "w2", "w3")}


def _fresh(config, run):
    return TS.fresh_fp8(Llama(config, run))


def _delayed_grads(config, run, params, fp8_state, tokens):
    """(loss, param gradients, new fp8 state) of a next-token loss: one delayed-scaling step."""
    def loss(p, f):
        logits = Llama(config, run).apply({"params": p, "fp8": f}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, fp8_state)


def test_delayed_option_parses_and_validates():
    assert RunOptions().fp8_scaling is Fp8Scaling.CURRENT and RunOptions().fp8_history == 16
    assert DELAYED.fp8_delayed and not FP8.fp8_delayed
    assert not RunOptions(fp8_scaling="delayed").fp8_delayed  # bf16 matmuls: no FP8 state
    assert RunOptions.from_dict(DELAYED.to_dict()) == DELAYED
    assert DELAYED.to_dict()["fp8_scaling"] == "delayed"
    cfg = tiny_config(**{"run.matmul_precision": "fp8", "run.fp8_scaling": "delayed", "run.fp8_history": 8})
    assert run_options(cfg).fp8_scaling is Fp8Scaling.DELAYED and run_options(cfg).fp8_history == 8
    with pytest.raises(ValueError, match="fp8_scaling"):
        RunOptions(fp8_scaling="lazy")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="fp8_history"):
            RunOptions(fp8_history=bad)


@pytest.mark.parametrize("fuse", [False, True])
def test_delayed_state_layout(setup, fuse):
    config, _, tokens = setup
    run = DELAYED.replace(fuse_gate_up=fuse)
    boxed = Llama(config, run).init(jax.random.PRNGKey(0), tokens)["fp8"]["layers"]
    mlp = ("w1_w3", "w2") if fuse else ("w1", "w2", "w3")
    assert sorted(boxed["attention"]) == sorted(SITES["attention"]) and sorted(boxed["feed_forward"]) == sorted(mlp)
    for box in jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names")):
        assert box.names == ("layers", None, None)  # stacked over layers like the params
        assert box.value.shape == (config.n_layers, 3, 4) and box.value.dtype == jnp.float32
        assert not np.any(np.asarray(box.value))
    for run in (RunOptions(), FP8, RunOptions(fp8_scaling="delayed")):  # nothing for bf16 / current runs
        assert "fp8" not in Llama(config, run).init(jax.random.PRNGKey(0), tokens)
        assert _fresh(config, run) == {}


def test_delayed_calibration_is_current_and_later_steps_within_fp8_error(setup):
    config, params, tokens = setup
    want = Llama(config, RunOptions()).apply({"params": params}, tokens)
    current = Llama(config, FP8).apply({"params": params}, tokens)
    model = Llama(config, DELAYED)
    fresh = nn.unbox(_fresh(config, DELAYED))
    # Calibrating (a fresh run's first pass): every tensor scaled by its own amax, as current
    # scaling does; outside, an all-zero history scales by 1 (not the calibrating trace reused).
    with fp8.calibrating():
        calibrated = jax.jit(lambda p, f: model.apply({"params": p, "fp8": f}, tokens))(params, fresh)
    np.testing.assert_array_equal(np.asarray(calibrated), np.asarray(current))
    unscaled = jax.jit(lambda p, f: model.apply({"params": p, "fp8": f}, tokens))(params, fresh)
    assert not np.array_equal(np.asarray(unscaled), np.asarray(current))
    # Applied without a state: current scaling too (e.g. evaluation of a params-only checkpoint).
    np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, tokens)), np.asarray(current))
    # With the histories of a step on other tokens: other scales, the same FP8 error bound.
    other = jax.random.randint(jax.random.PRNGKey(2), tokens.shape, 0, config.vocab_size)
    _, (_, state) = _delayed_grads(config, DELAYED, params, fresh, other)
    got = model.apply({"params": params, "fp8": state}, tokens)
    assert not np.array_equal(np.asarray(got), np.asarray(current))
    assert E / 4 < _rel(got, want) < math.sqrt(2) * E


@pytest.mark.parametrize("fuse", [False, True])
def test_delayed_histories_roll_and_record_the_amaxes(setup, fuse):
    config, params, tokens = setup
    run = DELAYED.replace(fuse_gate_up=fuse, interpret_kernels=True)
    _, (grads, s1) = _delayed_grads(config, run, params, nn.unbox(_fresh(config, run)), tokens)
    _, (_, s2) = _delayed_grads(config, run, params, s1, tokens)
    layers, p = s1["layers"], params["layers"]
    for module, sites in layers.items():
        for name, h in sites.items():
            h, h2 = np.asarray(h), np.asarray(s2["layers"][module][name])
            assert np.all(h[:, :, 1:] == 0) and np.all(h[:, :, 0] > 0), (name, h)  # pushed once, newest first
            np.testing.assert_array_equal(h2[:, :, 1], h[:, :, 0])  # rolled on the second step
            assert np.all(h2[:, :, 2:] == 0)
            # The weight row: max |W| of each layer's weight (w1 and w3 together when fused).
            ws = [p[module][n].value for n in name.split("_")]
            want = np.max([np.max(np.abs(np.asarray(w)), axis=tuple(range(1, w.ndim))) for w in ws], axis=0)
            np.testing.assert_array_equal(h[:, 1, 0], want)
    # Projections of one input record one input amax; the dX path feeds the gradient row.
    att = layers["attention"]
    np.testing.assert_array_equal(np.asarray(att["wq"])[:, 0], np.asarray(att["wk"])[:, 0])
    np.testing.assert_array_equal(np.asarray(att["wq"])[:, 0], np.asarray(att["wv"])[:, 0])
    x0 = model_lib.rms_norm(model_lib.embed(params["tok_embeddings"].value, tokens[:, :-1], jnp.float32),
                            p["attention_norm"]["weight"].value[0], config.norm_eps)
    np.testing.assert_allclose(np.asarray(att["wq"])[0, 0, 0], np.max(np.abs(np.asarray(x0))), rtol=1e-6)
    # The state's "gradient" is no gradient of the loss: the optimizer never sees it.
    assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_delayed_scan_and_unrolled_agree(setup):
    config, params, tokens = setup
    fresh = nn.unbox(_fresh(config, DELAYED))
    out = {}
    for loop in ("scan", "unrolled"):
        run = DELAYED.replace(layer_loop=loop)
        _, (_, s1) = _delayed_grads(config, run, params, fresh, tokens)
        out[loop] = _delayed_grads(config, run, params, s1, tokens[::-1])
    (la, (ga, sa)), (lb, (gb, sb)) = out["scan"], out["unrolled"]
    assert abs(float(la) - float(lb)) < 1e-5 * abs(float(la))
    for a, b in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):  # the same amaxes (up to the float32 sums' order)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert _rel(a, b) < 2.0 ** -6


@pytest.mark.parametrize("layer_loop", ["scan", "unrolled"])
def test_lora_with_delayed_scaling_trains_adapters_and_updates_the_state(layer_loop):
    import optax
    from llama_jax import lora as L, sharding as S
    from llama_jax.train.optim import OptimizerConfig, make_optimizer
    config = ModelConfig.preset("tiny")
    lora = L.LoraConfig(rank=4, alpha=8, targets=("wq", "wo", "w2"))
    model = Llama(config, DELAYED.replace(layer_loop=layer_loop), lora=lora)
    mesh = S.make_mesh((1, 4, 2))
    tx = make_optimizer(OptimizerConfig(peak_lr=1e-2, warmup_steps=0), 10)
    shardings = TS.state_shardings(TS.abstract_state(model, tx), mesh)
    base = TS.init_base(model, mesh, jax.random.PRNGKey(0))
    state = TS.init_state(model, tx, mesh, jax.random.PRNGKey(1))
    assert jax.tree.structure(state.params) == jax.tree.structure(L.init_adapters(config, lora, jax.random.PRNGKey(0)))
    assert set(state.fp8["layers"]["attention"]) == {"wq", "wk", "wv", "wo"}  # every base matmul, adapted or not
    step = TS.make_train_step(model, tx, optax.constant_schedule(1e-2), mesh, shardings, 2, base=base)
    batch = jax.device_put(random_batch(config.vocab_size), TS.batch_sharding(mesh))
    # The base's projections are FP8 dots (with delayed scales), the adapters' are not.
    jaxpr = jax.make_jaxpr(lambda a, f: model.apply({"params": base, "lora": a, "fp8": f}, batch["tokens"]))(
        state.params, state.fp8).jaxpr
    assert _fp8_dots(jaxpr)[0] == 7 * (1 if layer_loop == "scan" else config.n_layers)  # (scan: one body)
    losses_ = []
    for _ in range(3):
        state, m = step(state, batch)
        losses_.append(float(m["loss"]))
    assert losses_[-1] < losses_[0]
    for h in jax.tree.leaves(state.fp8):  # two micro-batches a step: 6 amaxes pushed of 4 kept
        h = np.asarray(h)
        assert np.all(np.isfinite(h)) and np.all(h[:, :2] > 0), h
    # The eval step scales with the state when given one, currently without.
    ev = TS.make_eval_step(model, mesh, shardings.params, base=base)
    with_state, without = ev(state.params, batch, state.fp8), ev(state.params, batch)
    assert float(with_state["tokens"]) == float(without["tokens"]) == 256
    assert float(with_state["loss_sum"]) != float(without["loss_sum"])
    assert abs(float(with_state["loss_sum"]) - float(without["loss_sum"])) < 0.01 * float(without["loss_sum"])


@pytest.mark.parametrize("remat", ["none", "full"])
def test_train_step_calibrates_a_fresh_state_so_step_0_is_current_scaling(remat):
    """make_train_step on all-zero histories: one calibrating pass first, so the first step
    equals a current-scaling step bit for bit (loss, grad norm, params); then delayed scales.
    Traced after the calibration (remat: jax.checkpoint's trace caches), the step does not
    reuse its calibrating traces: the second step differs from current scaling's."""
    import optax
    from llama_jax import sharding as S
    config = ModelConfig.preset("tiny")
    mesh = S.make_mesh((1, 4, 2))
    tx = optax.adam(1e-2)
    batch = jax.device_put(random_batch(config.vocab_size), TS.batch_sharding(mesh))
    out = {}
    for name, run in (("current", FP8), ("delayed", DELAYED)):
        model = Llama(config, run.replace(remat_policy=remat))
        shardings = TS.state_shardings(TS.abstract_state(model, tx), mesh)
        state = TS.init_state(model, tx, mesh, jax.random.PRNGKey(1))
        step = TS.make_train_step(model, tx, optax.constant_schedule(1e-2), mesh, shardings)
        state, m0 = step(state, batch)
        p0 = jax.tree.map(np.asarray, state.params)
        state, m1 = step(state, batch)
        out[name] = (m0, p0, m1, state.fp8)
    (c0, cp, c1, _), (d0, dp, d1, f) = out["current"], out["delayed"]
    for k in ("loss", "grad_norm"):
        assert float(c0[k]) == float(d0[k]), k
    for a, b in zip(jax.tree.leaves(cp), jax.tree.leaves(dp)):
        np.testing.assert_array_equal(a, b)
    assert float(c1["loss"]) != float(d1["loss"])  # step 1: scales from the history's max
    assert abs(float(c1["loss"]) - float(d1["loss"])) < 0.01 * float(c1["loss"])
    for h in jax.tree.leaves(f):  # calibration, step 0, step 1: three amaxes pushed
        h = np.asarray(h)
        assert np.all(h[:, :, :3] > 0) and np.all(h[:, :, 3:] == 0), h
        np.testing.assert_array_equal(h[:, :2, 1], h[:, :2, 2])  # step 0's x and w amaxes: the calibration's


def _step_dir(workdir, step=STEPS):
    return os.path.join(workdir, "checkpoints", str(step))


def _restore_item(workdir, item, step=STEPS):
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(_step_dir(workdir, step), item)))


def test_delayed_training_resumes_exactly(tmp_path, tokenizer_path, reference):
    over = {"data.tokenizer": tokenizer_path, "run.matmul_precision": "fp8", "run.fp8_scaling": "delayed",
            "run.fp8_history": 4, "mesh": (1, 8, 1), "micro_batches": 2}
    full = str(tmp_path / "full")
    trainer.train(tiny_config(**over), full)
    got = losses(full)
    assert got[STEPS] < got[1] - 0.1, got
    for s in reference:  # within a few FP8 roundings of the float32 run's loss
        assert 0 < abs(got[s] - reference[s]) < 0.01 * reference[s], (s, got[s], reference[s])
    sums = json.loads(open(os.path.join(_step_dir(full), "checksums.json")).read())["arrays"]
    assert any(k.startswith("fp8/") for k in sums)
    # 3 steps, stop, resume to 6: bit for bit, amax histories included (restored from fp8/).
    resumed = str(tmp_path / "resumed")
    trainer.train(tiny_config(**over, steps=3, **{"optimizer.total_steps": STEPS}), resumed)
    assert os.path.isdir(os.path.join(_step_dir(resumed, 3), "fp8"))
    trainer.train(tiny_config(**over), resumed)
    assert_same_losses(losses(resumed), got, rtol=0)
    for item in ("params", "fp8"):
        a, b = _restore_item(full, item), _restore_item(resumed, item)
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    h = _restore_item(full, "fp8")["layers"]["attention"]["wq"]
    assert h.shape == (2, 3, 4) and np.all(h > 0)  # 12 micro-batch steps: every slot written


def test_current_run_checkpoints_stay_without_fp8_and_resume_as_delayed(tmp_path, tokenizer_path):
    # A current-scaling run: an empty fp8 state, no fp8/ item, no fp8 checksums (as before).
    over = {"data.tokenizer": tokenizer_path, "run.matmul_precision": "fp8", "mesh": (1, 8, 1), "steps": 3,
            "optimizer.total_steps": STEPS}
    workdir = str(tmp_path / "run")
    trainer.train(tiny_config(**over), workdir)
    step = _step_dir(workdir, 3)
    assert not os.path.exists(os.path.join(step, "fp8"))
    sums = json.loads(open(os.path.join(step, "checksums.json")).read())["arrays"]
    assert sums and not any(k.startswith("fp8") for k in sums)
    # Such a step (or one from before fp8 states existed) resumed with delayed scaling: fresh histories.
    trainer.train(tiny_config(**{**over, "steps": STEPS, "run.fp8_scaling": "delayed"}), workdir)
    got = losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in got.values())
    assert os.path.isdir(os.path.join(_step_dir(workdir), "fp8"))


def test_delayed_resume_with_other_call_sites_starts_the_histories_afresh(tmp_path, tokenizer_path, caplog):
    """fuse_gate_up toggled between runs: the step's fp8/ holds w1 and w3 histories, the run
    has one w1_w3 site. The params resume, the histories start afresh (calibrated), with a warning."""
    over = {"data.tokenizer": tokenizer_path, "run.matmul_precision": "fp8", "run.fp8_scaling": "delayed",
            "run.fp8_history": 4, "mesh": (1, 8, 1), "optimizer.total_steps": STEPS}
    workdir = str(tmp_path / "run")
    trainer.train(tiny_config(**over, steps=3), workdir)
    assert set(_restore_item(workdir, "fp8", 3)["layers"]["feed_forward"]) == {"w1", "w2", "w3"}
    with caplog.at_level("WARNING"):
        trainer.train(tiny_config(**over, steps=STEPS, **{"run.fuse_gate_up": True, "run.interpret_kernels": True}),
                      workdir)
    assert any("all histories start afresh" in r.getMessage() and "w1_w3" in r.getMessage() for r in caplog.records)
    got = losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in got.values())
    h = _restore_item(workdir, "fp8")["layers"]["feed_forward"]
    assert set(h) == {"w1_w3", "w2"} and np.all(np.asarray(h["w1_w3"])[:, :, :3] > 0)


def test_bf16_and_current_states_carry_no_fp8():
    import optax
    config = ModelConfig.preset("tiny")
    tx = optax.adam(1e-3)
    for run in (RunOptions(), FP8):
        abstract = TS.abstract_state(Llama(config, run), tx)
        assert abstract.fp8 == {}
    assert TS.abstract_state(Llama(config, DELAYED), tx).fp8 != {}


def test_fit_histories_keeps_the_newest_amaxes():
    from llama_jax.train.checkpoint import fit_histories
    h = jnp.asarray(np.arange(1, 2 * 3 * 4 + 1, dtype=np.float32).reshape(2, 3, 4))  # [..., 0] newest
    tree = {"wq": h}
    sh = {"wq": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    short = fit_histories(tree, {"wq": jax.ShapeDtypeStruct((2, 3, 2), jnp.float32)}, sh)["wq"]
    np.testing.assert_array_equal(np.asarray(short), np.asarray(h)[..., :2])
    long = np.asarray(fit_histories(tree, {"wq": jax.ShapeDtypeStruct((2, 3, 6), jnp.float32)}, sh)["wq"])
    np.testing.assert_array_equal(long[..., :4], np.asarray(h))
    assert long.shape == (2, 3, 6) and np.all(long[..., 4:] == 0)


def test_delayed_resume_with_another_history_length_carries_the_newest(tmp_path, tokenizer_path, caplog):
    """run.fp8_history 4 -> 8 between runs: the saved histories are padded (not a failed restore)."""
    over = {"data.tokenizer": tokenizer_path, "run.matmul_precision": "fp8", "run.fp8_scaling": "delayed",
            "run.fp8_history": 4, "mesh": (1, 8, 1), "optimizer.total_steps": STEPS}
    workdir = str(tmp_path / "run")
    trainer.train(tiny_config(**over, steps=3), workdir)
    saved = np.asarray(_restore_item(workdir, "fp8", 3)["layers"]["attention"]["wq"])
    assert saved.shape[-1] == 4 and np.all(saved > 0)
    with caplog.at_level("WARNING"):
        trainer.train(tiny_config(**{**over, "run.fp8_history": 8}), workdir)
    assert any("histories of 4 steps, this run keeps 8" in r.getMessage() for r in caplog.records)
    got = losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in got.values())
    h = np.asarray(_restore_item(workdir, "fp8")["layers"]["attention"]["wq"])
    # 3 more steps pushed in front of the 4 carried over (fresh histories would hold 3 or 4).
    assert h.shape[-1] == 8 and np.all(h[..., :7] > 0) and np.all(h[..., 7] == 0), h[0]


