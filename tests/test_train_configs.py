"""configs/*.py: every file builds; the paper's sizes shard as the rules say (eval_shape, no memory);
the FLOP formula."""
import importlib
import sys
import warnings

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

from llama_jax import Llama, ModelConfig, sharding

from llama_jax.train import metrics

from llama_jax.train import optim

from llama_jax.train import config as train_config

from llama_jax.train import state as train_state
from llama_jax.data import DataConfig
from train_helpers import REPO

sys.path.insert(0, REPO)
CONFIGS = ["tiny", "demo", "llama_7b", "llama_13b", "llama_33b", "llama_65b", "mixture"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_every_part(name):
    c = importlib.import_module(f"configs.{name}").get_config()
    model = train_config.model_config(c)
    assert train_config.run_options(c).param_dtype == np.float32  # float32 master weights everywhere
    opt = train_config.optimizer_config(c)
    data = c.data.to_dict()
    data.pop("tokenizer"), data.pop("shards")
    assert DataConfig.from_dict(data).sources
    assert c.batch_size % c.micro_batches == 0 and c.seq_len <= model.max_seq_len
    assert float(optim.lr_schedule(opt, c.steps)(opt.warmup_steps)) == pytest.approx(opt.peak_lr)


def _rule_and_fitted_specs(boxed, mesh):
    """Per leaf: (the rules' spec, the spec logical_to_shardings gives), with no ShardingWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", sharding.ShardingWarning)  # an unsplit axis fails here, loudly
        fitted = sharding.logical_to_shardings(boxed, mesh)
    rule = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, sharding.RULES)
    return [(r.spec, f.spec) for r, f in zip(jax.tree.leaves(rule), jax.tree.leaves(fitted), strict=True)]


@pytest.mark.parametrize("name, lr, steps, gpus", [("llama_7b", 3e-4, 238418, 256), ("llama_65b", 1.5e-4, 333786, 2048)])
def test_paper_configs_follow_table_2_and_shard_evenly_at_full_size(name, lr, steps, gpus):
    c = importlib.import_module(f"configs.{name}").get_config()
    assert (c.batch_size * c.seq_len, c.optimizer.peak_lr, c.steps) == (4 * 2**20, lr, steps)
    model = train_config.model_config(c)
    tx = optim.make_optimizer(train_config.optimizer_config(c), c.steps)
    net = Llama(model, train_config.run_options(c))
    boxed = train_state.abstract_state(net, tx)                # shapes only: 65B costs nothing
    abstract = nn.unbox(boxed)
    n_params = sum(np.prod(a.shape) for a in jax.tree.leaves(abstract.params))
    assert n_params == model.num_params()
    # The config's own mesh on the 8 test devices, and on the paper's GPU count (an abstract
    # mesh: shardings without devices). Every parameter and optimizer moment gets exactly
    # the spec the rules ask for: no axis is quietly left unsplit.
    for mesh in (sharding.make_mesh(c.mesh),
                 AbstractMesh(sharding.mesh_shape(c.mesh, gpus), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)):
        specs = _rule_and_fitted_specs(boxed, mesh)
        assert len(specs) > 20 and all(r == f for r, f in specs), [(r, f) for r, f in specs if r != f]
        split = {a for r, _ in specs for a in jax.tree.leaves(tuple(r)) if a is not None}
        assert split == {"fsdp", "tensor"}  # the rules do split (size-1 axes are named too)
    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(train_state.state_shardings(boxed, sharding.make_mesh(c.mesh))),
                    strict=True):
        s.shard_shape(a.shape)  # raises when a dimension does not divide its mesh axes


def test_an_axis_that_does_not_divide_is_reported():
    """65 heads over tensor=8: the head axis cannot split, and the warning says so."""
    model = ModelConfig.preset("llama-65b", dim=65 * 128, n_heads=65, n_kv_heads=65)
    tx = optim.make_optimizer(train_config.optimizer_config(importlib.import_module("configs.llama_65b").get_config()), 10**5)
    boxed = train_state.abstract_state(Llama(model), tx)
    with pytest.warns(sharding.ShardingWarning) as record:
        shardings = train_state.state_shardings(boxed, sharding.make_mesh((1, 1, 8)))
    assert len(record) == 1  # one warning, every array listed in it
    msg = str(record[0].message)
    assert "params/layers/attention/wq (80, 8320, 65, 128): dim 2 (65) over mesh axis tensor of size 8 -> replicated" in msg
    assert "params/layers/attention/wo (80, 65, 128, 8320): dim 1 (65)" in msg
    assert "mu/layers/attention/wq" in msg and "feed_forward" not in msg  # moments too; nothing else
    assert tuple(shardings.params["layers"]["attention"]["wq"].spec) == (None, "fsdp", None, None)  # heads unsplit


def test_flops_per_token_formula():
    cfg = ModelConfig.preset("llama-7b")
    non_embedding = cfg.num_params() - cfg.vocab_size * cfg.dim
    assert metrics.flops_per_token(cfg, 2048) == 6 * non_embedding + 6 * 32 * 4096 * 2048
    # The paper's 65B: ~380 tokens/s/GPU on A100s (312 TFLOP/s) is about 50% MFU.
    c65 = ModelConfig.preset("llama-65b")
    assert 0.45 < metrics.mfu(380, metrics.flops_per_token(c65, 2048), 1, 312.0) < 0.5
    assert metrics.peak_tflops("NVIDIA H200") == 989.0 and metrics.peak_tflops("cpu") == 0.0
