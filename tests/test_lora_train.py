"""LoRA training with a frozen base (train/state.py): only adapters have optimizer state and
gradients; the base is a step input, bit-identical after steps; steps resume exactly; the
adapters shard by the params' logical rules; dropout draws from (seed, step)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax import Llama, ModelConfig, lora as L, sharding as S
from llama_jax.train import state as TS
from llama_jax.train.optim import OptimizerConfig, make_optimizer
from train_helpers import random_batch
from train_helpers import tokenizer_path  # noqa: F401  (fixture)

CFG = ModelConfig.preset("tiny")
LORA = L.LoraConfig(rank=4, alpha=8, dropout=0.1, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))


def _setup(mesh, base_dtype="float32", micro_batches=1):
    model = Llama(CFG, lora=LORA)
    tx = make_optimizer(OptimizerConfig(peak_lr=1e-2, warmup_steps=0), 10)
    shardings = TS.state_shardings(TS.abstract_state(model, tx), mesh)
    base = TS.init_base(model, mesh, jax.random.PRNGKey(0), base_dtype)
    state = TS.init_state(model, tx, mesh, jax.random.PRNGKey(1))
    step = TS.make_train_step(model, tx, optax.constant_schedule(1e-2), mesh, shardings, micro_batches, base=base)
    return model, base, state, step, shardings


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_only_adapters_train_and_the_base_stays_bit_identical(base_dtype):
    mesh = S.make_mesh((1, 4, 2))
    model, base, state, step, shardings = _setup(mesh, base_dtype)
    before = jax.tree.map(np.asarray, base)
    assert jax.tree.structure(state.params) == jax.tree.structure(L.init_adapters(CFG, LORA, jax.random.PRNGKey(0)))
    assert all(x.dtype == jnp.dtype(base_dtype) for x in jax.tree.leaves(base))
    # optimizer state mirrors the adapters only (no moments for the base)
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_adapter
    assert tuple(state.params["layers"]["attention"]["wq"]["a"].sharding.spec) == (None, "fsdp", None)
    batch = jax.device_put(random_batch(CFG.vocab_size), TS.batch_sharding(mesh))
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(base)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert np.any(np.asarray(state.params["layers"]["attention"]["wq"]["b"]))  # b left zero
    assert losses[-1] < losses[0]


def test_resume_is_exact():
    mesh = S.make_mesh((1, 4, 2))
    _, base, state, step, shardings = _setup(mesh, micro_batches=2)
    batch = jax.device_put(random_batch(CFG.vocab_size), TS.batch_sharding(mesh))
    for _ in range(2):
        state, _ = step(state, batch)
    saved = jax.tree.map(np.asarray, state)  # what a checkpoint holds: the adapters' state
    for _ in range(2):
        state, m1 = step(state, batch)
    resumed = jax.device_put(saved, shardings)
    for _ in range(2):
        resumed, m2 = step(resumed, batch)
    assert float(m1["loss"]) == float(m2["loss"])
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eval_step_reads_base_and_adapters():
    mesh = S.make_mesh((1, 4, 2))
    model, base, state, _, shardings = _setup(mesh)
    batch = jax.device_put(random_batch(CFG.vocab_size), TS.batch_sharding(mesh))
    got = TS.make_eval_step(model, mesh, shardings.params, base=base)(state.params, batch)
    want = TS.make_eval_step(Llama(CFG), mesh, jax.tree.map(lambda x: x.sharding, base))(base, batch)
    assert float(got["loss_sum"]) == pytest.approx(float(want["loss_sum"]), rel=1e-6)  # b = 0: the base


def test_step_refuses_a_missing_base():
    mesh = S.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model = Llama(CFG, lora=LORA)
    tx = optax.sgd(0.1)
    sh = TS.state_shardings(TS.abstract_state(model, tx), mesh)
    with pytest.raises(ValueError, match="needs `base`"):
        TS.make_train_step(model, tx, optax.constant_schedule(0.1), mesh, sh)


def test_train_loop_lora_from_init_from_resumes_exactly(tmp_path, tokenizer_path):
    """train(): adapters on the init_from base; a step holds the adapters + lora.json naming
    the base; stop after 3 steps and resume on another mesh: the same losses."""
    import json
    import os

    from llama_jax import checkpoint
    from llama_jax.interop import convert
    from llama_jax.train import checkpoint as train_checkpoint, config as train_config, loop as trainer
    from train_helpers import STEPS, assert_same_losses, losses, tiny_config

    lora = {"lora.rank": 4, "lora.alpha": 8.0, "lora.targets": "wq,wv,w2", "data.tokenizer": tokenizer_path,
            "init_from": str(tmp_path / "base"), "optimizer.peak_lr": 1e-2}
    cfg = tiny_config(**lora)
    params = TS.init_base(Llama(train_config.model_config(cfg)), S.make_mesh((1, 1, 1), devices=jax.devices()[:1]),
                          jax.random.PRNGKey(5))
    checkpoint.save_params(tmp_path / "base", jax.device_get(params), train_config.model_config(cfg))
    trainer.train(tiny_config(**lora, mesh=(1, 8, 1)), str(tmp_path / "full"))
    want = losses(str(tmp_path / "full"))
    step_dir = tmp_path / "full" / "checkpoints" / str(STEPS)
    record = json.loads((step_dir / train_checkpoint.LORA_FILE).read_text())
    assert record == {"lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["wq", "wv", "w2"]},
                      "base": str(tmp_path / "base")}
    assert want[STEPS] < want[1] - 0.05  # the adapters learn
    adapters, got_lora, base_path = train_checkpoint.load_lora_step(step_dir)  # -> save_peft / merge
    assert got_lora == L.LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w2"))
    assert base_path == str(tmp_path / "base") and np.any(adapters["layers"]["attention"]["wq"]["b"])
    assert jax.tree.structure(adapters) == jax.tree.structure(L.init_adapters(
        train_config.model_config(cfg), got_lora, jax.random.PRNGKey(0)))
    # A LoRA step is not a params-only checkpoint: loaders and exports say so and how to merge,
    # and merge_lora_step (given the workdir: its latest step) writes the one they read.
    for read in (checkpoint.load_checkpoint, lambda d: convert.from_orbax("hf", d, tmp_path / "hf")):
        with pytest.raises(ValueError, match=rf"^{step_dir}: a LoRA run's step \(lora.json\): params/ holds only "
                                             r"the adapters, .*merge_lora_step\('"):
            read(step_dir)
    train_checkpoint.merge_lora_step(tmp_path / "full", tmp_path / "merged")
    config, merged = checkpoint.load_checkpoint(tmp_path / "merged")
    assert config == train_config.model_config(cfg) and (tmp_path / "merged" / "tokenizer.model").is_file()
    want_merged = L.merge(checkpoint.load_checkpoint(tmp_path / "base")[1], adapters, got_lora)
    jax.tree.map(np.testing.assert_array_equal, merged, want_merged)
    part = str(tmp_path / "part")
    trainer.train(tiny_config(**lora, mesh=(2, 2, 2), steps=3, **{"optimizer.total_steps": STEPS}), part)
    assert sorted(os.listdir(os.path.join(part, "checkpoints"))) == ["3"]
    trainer.train(tiny_config(**{**lora, "init_from": ""}, mesh=(1, 2, 4)), part)  # the base from lora.json
    assert_same_losses(losses(part), want)


def test_run_summary_names_the_adapters_and_what_they_train():
    """The start-of-run summary's LoRA line: settings, adapter parameters counted by hand, base dtype."""
    from types import SimpleNamespace

    from llama_jax.train import report
    from train_helpers import tiny_config

    def lines(**overrides):
        run = SimpleNamespace(cfg=tiny_config(**overrides), model=CFG, start_step=0, workdir="w", tokenizer=None,
                              mesh=SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 1}))
        return report.summary_lines(run)
    # wq: a [2, 64, 4] + b [2, 4, 4, 16]; wv: a [2, 64, 4] + b [2, 4, 2, 16] (2 layers, dim 64, 4 heads, 2 kv)
    n = 2 * 64 * 4 + 2 * 4 * 4 * 16 + 2 * 64 * 4 + 2 * 4 * 2 * 16
    assert L.num_params(CFG, L.LoraConfig(rank=4, targets=("wq", "wv"))) == n == 1792
    got = lines(**{"lora.rank": 4, "lora.alpha": 8.0, "lora.targets": "wq,wv", "lora.base_dtype": "bfloat16"})
    assert got[2] == (f"LoRA: rank 4, alpha 8, dropout 0 on wq,wv: 1.79k adapter parameters trained "
                      f"({n / CFG.num_params():.2%}); the base frozen, held in bfloat16")
    assert not any(line.startswith("LoRA") for line in lines())  # full fine-tuning: no such line
