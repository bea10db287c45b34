"""Mesh construction and logical-to-mesh shardings."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import Llama, ModelConfig
from llama_jax import model as M
from llama_jax import sharding as S


def test_mesh_shape_fills_one_axis():
    assert S.mesh_shape((1, -1, 2), 8) == (1, 4, 2)
    assert S.mesh_shape((2, 2, 2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one -1"):
        S.mesh_shape((-1, -1, 1), 8)
    with pytest.raises(ValueError, match="needs 4 devices, have 8"):
        S.mesh_shape((1, 2, 2), 8)
    with pytest.raises(ValueError, match="does not divide 8"):
        S.mesh_shape((3, -1, 1), 8)


def test_indivisible_axes_stay_unsplit_and_results_match():
    cfg = ModelConfig.preset("tiny")  # 2 kv heads: they cannot split over tensor=4
    mesh = S.make_mesh((1, 2, 4))
    with pytest.warns(S.ShardingWarning, match=r"layers/attention/wk \(2, 64, 2, 16\): dim 2 \(2\) over "
                      r"mesh axis tensor of size 4 -> replicated") as record:
        shardings = S.logical_to_shardings(M.param_shapes(cfg), mesh)
    assert len(record) == 1 and "wq" not in str(record[0].message)
    assert tuple(shardings["layers"]["attention"]["wk"].spec) == (None, "fsdp", None, None)
    assert tuple(shardings["layers"]["attention"]["wq"].spec) == (None, "fsdp", "tensor", None)
    init = jax.jit(lambda r: nn.unbox(Llama(cfg).init(r, jnp.zeros((1, 8), jnp.int32))["params"]),
                   out_shardings=shardings)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 64)).astype(np.int32)
    with S.activate(mesh):
        params = init(jax.random.PRNGKey(0))
        sharded = jax.jit(Llama(cfg).apply)({"params": params}, tokens)
    alone = Llama(cfg).apply({"params": jax.device_get(params)}, tokens)
    np.testing.assert_allclose(sharded, alone, rtol=1e-5, atol=1e-5)
