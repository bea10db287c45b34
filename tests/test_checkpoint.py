"""Params-only checkpoints: save_params / load_checkpoint, training-step layouts, meshes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from llama_jax import Llama, ModelConfig, load_checkpoint, sharding
from llama_jax import model as model_lib
from llama_jax import checkpoint
from llama_jax.checkpoint import check_params, save_params
from llama_jax.checkpoint.streaming import ParamsReader

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)


@pytest.fixture(scope="module")
def params():
    return nn.unbox(Llama(CFG).init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))["params"])


def _equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool((np.asarray(x) == np.asarray(y)).all()), a, b)))


def test_save_and_load_round_trip(tmp_path, params):
    save_params(tmp_path / "ckpt", params, CFG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    cfg, loaded = load_checkpoint(tmp_path / "ckpt")
    assert cfg == CFG and _equal(params, loaded)
    _, loaded16 = load_checkpoint(str(tmp_path / "ckpt"), dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(loaded16))
    assert _equal(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), loaded16)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_params(tmp_path / "ckpt", params, CFG)
    save_params(tmp_path / "ckpt", params, CFG, overwrite=True)


def test_load_onto_a_mesh_of_8_devices(tmp_path, params):
    assert len(jax.devices()) == 8
    save_params(tmp_path / "ckpt", params, CFG)
    mesh = sharding.make_mesh((1, 4, 2))
    _, loaded = load_checkpoint(tmp_path / "ckpt", mesh=mesh)
    want = sharding.logical_to_shardings(model_lib.param_shapes(CFG), mesh)
    for x, s in zip(jax.tree.leaves(loaded), jax.tree.leaves(want)):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
    wq = loaded["layers"]["attention"]["wq"]  # [L, D, N, H]: D over fsdp (4), N over tensor (2)
    assert wq.addressable_shards[0].data.shape == (2, 16, 2, 16)
    assert _equal(params, loaded)
    tokens = np.arange(32, dtype=np.int32).reshape(1, 32)
    with sharding.activate(mesh):
        sharded = jax.jit(Llama(CFG).apply)({"params": loaded}, tokens)
    np.testing.assert_allclose(sharded, Llama(CFG).apply({"params": params}, tokens), rtol=1e-5, atol=1e-5)


def test_training_step_layouts(tmp_path, params):
    """WORKDIR/checkpoints/<step>/{params/, model_config.json}: step, checkpoints dir, workdir."""
    ckpts = tmp_path / "work" / "checkpoints"
    for step in (100, 20):
        shifted = jax.tree.map(lambda x: x + step, params)
        save_params(ckpts / str(step), shifted, CFG)
        (ckpts / str(step) / "opt_state").mkdir()  # other items beside params/
    (ckpts / "300.orbax-checkpoint-tmp-1234").mkdir()  # an unfinished save: ignored
    for path in (tmp_path / "work", ckpts, ckpts / "100"):
        _, loaded = load_checkpoint(path)
        assert _equal(jax.tree.map(lambda x: x + 100, params), loaded), path
    _, loaded = load_checkpoint(ckpts / "20")
    assert _equal(jax.tree.map(lambda x: x + 20, params), loaded)


def test_clear_errors(tmp_path, params):
    with pytest.raises(FileNotFoundError, match="not a llama_jax checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"not a llama_jax checkpoint: no model_config.json .* in .*empty"):
        load_checkpoint(tmp_path / "empty")
    save_params(tmp_path / "w" / "checkpoints" / "5", params, CFG)
    (tmp_path / "w" / "checkpoints" / "5" / "model_config.json").unlink()
    with pytest.raises(ValueError, match=r"latest step .*5 has no model_config.json"):
        load_checkpoint(tmp_path / "w")
    save_params(tmp_path / "ok", params, CFG)
    CFG.replace(n_layers=3).save(tmp_path / "ok" / "model_config.json")
    with pytest.raises(ValueError, match=r"params do not match the model config"):
        load_checkpoint(tmp_path / "ok")
    with pytest.raises(ValueError, match=r"params do not match the model config"):
        save_params(tmp_path / "bad", params, CFG.replace(dim=128, n_heads=8))
    assert not (tmp_path / "bad").exists()


def test_check_params_names_and_shapes(params):
    """One validator for arrays, abstract leaves and stored (shape, dtype) metadata."""
    check_params(CFG, params)
    check_params(CFG, jax.eval_shape(lambda p: p, params))
    check_params(CFG, checkpoint.abstract_params(CFG))
    without = {k: v for k, v in params.items() if k != "output"}
    with pytest.raises(ValueError, match=r"^here: params do not match the model config .*missing \['output'\]"):
        check_params(CFG, without, "here")
    with pytest.raises(ValueError, match=r"unknown \['extra/weight'\]"):
        check_params(CFG, {**params, "extra": params["norm"]})
    with pytest.raises(ValueError, match=r"shape \(found, expected\) \{'output': \(\(64, 256\), \(64, 128\)\)"):
        check_params(CFG.replace(vocab_size=128), params)
    with pytest.raises(ValueError, match="params do not match"):
        check_params(CFG, "not a tree")
    check_params(CFG, {"w": np.zeros(3)}, expected={"w": ((3,), np.float32)})  # another tree (a runtime form)


def test_one_writer_lays_out_every_checkpoint(tmp_path, params):
    """save_params (from memory) and a streamed write (writing + ParamsWriter, as the
    converters do) lay out the same checkpoint: same model_config.json and checksums."""
    import json
    from llama_jax.checkpoint import integrity
    from llama_jax.checkpoint.streaming import ParamsWriter
    save_params(tmp_path / "a", params, CFG)
    flat = {tuple(k.key for k in path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(params)}
    stacked = {p for p in flat if p[0] == "layers"}
    with checkpoint.writing(tmp_path / "b") as draft:
        writer = ParamsWriter(draft.params_dir, {p: (x.shape, x.dtype) for p, x in flat.items()}, stacked)
        sums = integrity.HostSums()
        for path, x in flat.items():
            for layer in range(x.shape[0]) if path in stacked else [None]:
                piece = x if layer is None else x[layer]
                writer.write(path, piece, layer)
                sums.add(path, piece, layer)
        writer.close()
        draft.finish(CFG, sums.hexdigests())
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / checkpoint.CONFIG_FILE).read_bytes() == (b / checkpoint.CONFIG_FILE).read_bytes()
    assert json.loads((a / checkpoint.CHECKSUMS_FILE).read_text()) == json.loads((b / checkpoint.CHECKSUMS_FILE).read_text())
    assert _equal(load_checkpoint(b)[1], params)
    with pytest.raises(RuntimeError, match="finish"):  # params without the files beside them: no checkpoint
        with checkpoint.writing(tmp_path / "c"):
            pass
    assert not (tmp_path / "c").exists()


def test_params_reader_reads_layer_slices_of_an_ocdbt_checkpoint(tmp_path, params):
    save_params(tmp_path / "ckpt", params, CFG)  # Orbax's default format (OCDBT), as the trainer writes
    reader = ParamsReader(tmp_path / "ckpt" / "params")
    w1 = np.asarray(params["layers"]["feed_forward"]["w1"])
    np.testing.assert_array_equal(reader.read(("layers", "feed_forward", "w1"), 1), w1[1])
    np.testing.assert_array_equal(reader.read(("output",)), np.asarray(params["output"]))
