"""Checkpoint integrity: checksums agree between sharded device arrays and host slices;
damaged files (a deleted chunk, flipped bytes) are refused by load_checkpoint and from_orbax,
naming the array, and leave no output; checkpoints without checksums still load."""
import glob
import logging
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax import Llama, ModelConfig, load_checkpoint

from llama_jax.interop import convert as conversion

from llama_jax.checkpoint import integrity
from llama_jax.checkpoint import save_params

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)


@pytest.fixture(scope="module")
def params():
    return nn.unbox(Llama(CFG).init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))["params"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, params):
    """An OCDBT checkpoint (save_params) and a zarr one of one file per layer chunk (to_orbax)."""
    root = tmp_path_factory.mktemp("ckpts")
    save_params(root / "ocdbt", params, CFG)
    conversion.from_orbax("hf", root / "ocdbt", root / "hf")
    conversion.to_orbax("hf", root / "hf", root / "zarr")
    return root


@pytest.mark.parametrize("shape, dtype", [((4, 8, 12), np.float32), ((6,), jnp.bfloat16), ((), np.int32),
                                          ((4, 16), np.float16), ((2, 3), np.bool_)])
def test_device_and_host_checksums_agree_and_see_one_changed_element(shape, dtype):
    rng = np.random.default_rng(0)
    x = np.asarray(rng.standard_normal(shape) > 0 if dtype == np.bool_ else rng.standard_normal(shape) * 9,
                   dtype=dtype)
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    spec = P("a", "b") if len(shape) >= 2 and shape[0] % 2 == 0 and shape[1] % 4 == 0 else P()
    device, _ = integrity.summarize({"p": {"w": jax.device_put(x, NamedSharding(mesh, spec))}})
    host = integrity.HostSums("p")
    if len(shape) == 3:  # layer slices, as converters stream them
        for layer in range(shape[0]):
            host.add(("w",), x[layer], layer)
    else:
        host.add(("w",), x)
    assert device == host.hexdigests()
    if x.ndim:
        y = x.copy()
        y.reshape(-1)[-1] = (not y.reshape(-1)[-1]) if dtype == np.bool_ else 0
        assert integrity.summarize({"p": {"w": jnp.asarray(y)}})[0] != device
        z = x.copy().reshape(-1)  # the same values in another order
        z[[0, -1]] = z[[-1, 0]]
        if z[0] != z[-1]:
            assert integrity.summarize({"p": {"w": jnp.asarray(z.reshape(x.shape))}})[0] != device


def test_non_finite_arrays_are_named():
    _, bad = integrity.summarize({"params": {"a": jnp.ones(3), "b": jnp.array([1.0, jnp.inf]),
                                             "c": jnp.array([jnp.nan], jnp.bfloat16), "n": jnp.int32(3)}})
    assert bad == ["params/b", "params/c"]


def _flip(path):
    b = bytearray(open(path, "rb").read())
    b[len(b) // 2] ^= 0xFF
    b[len(b) // 2 + 1] ^= 0x55
    open(path, "wb").write(bytes(b))


def _largest(pattern):
    return max(glob.glob(pattern, recursive=True), key=os.path.getsize)


@pytest.mark.parametrize("kind, damage", [
    ("zarr", lambda d: os.remove(d / "params" / "layers.attention.wq" / "1.0.0.0")),  # a deleted chunk
    ("zarr", lambda d: _flip(d / "params" / "layers.feed_forward.w1" / "0.0.0")),     # flipped bytes
    ("ocdbt", lambda d: _flip(_largest(f"{d}/params/**/d/*"))),                        # flipped bytes
])
def test_damaged_checkpoint_is_refused_and_exports_nothing(tmp_path, checkpoints, kind, damage):
    ckpt = tmp_path / kind
    shutil.copytree(checkpoints / kind, ckpt)
    load_checkpoint(ckpt)  # intact: loads
    damage(ckpt)
    with pytest.raises(integrity.CheckpointDamaged, match=r"array params/\S+ is damaged"):
        conversion.from_orbax("hf", ckpt, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == [kind]  # no output, no temporary directory
    with pytest.raises(Exception) as e:  # Orbax may refuse a missing chunk itself
        load_checkpoint(ckpt)
    assert isinstance(e.value, integrity.CheckpointDamaged) or "reading array" in str(e.value)


def test_checksums_survive_a_dtype_cast_and_old_checkpoints_load_with_one_warning(tmp_path, checkpoints, params,
                                                                                  caplog):
    _, p16 = load_checkpoint(checkpoints / "ocdbt", dtype=jnp.bfloat16)  # verified, then cast
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    old = tmp_path / "old"
    shutil.copytree(checkpoints / "ocdbt", old)
    os.remove(old / integrity.FILE)
    with caplog.at_level(logging.WARNING, logger="llama_jax.checkpoint.integrity"):
        _, loaded = load_checkpoint(old)
        load_checkpoint(old)
        conversion.from_orbax("meta", old, tmp_path / "meta")
    assert [r.message for r in caplog.records].count(
        f"{old}: no {integrity.FILE} (written by an older llama_jax): its arrays are not verified") == 1
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
