"""Bad inputs fail with errors that name the file and the tensor; outputs appear only whole."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch

from test_convert_common import CASES, tiny_model, write_hf, write_meta
from llama_jax import load_checkpoint
from llama_jax.interop import convert as conversion

CFG = CASES["gqa"]


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("src") / "meta"
    write_meta(tiny_model("gqa"), CFG, str(d), shards=2, dtype=torch.float16)
    return d


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("src") / "hf"
    write_hf(tiny_model("gqa"), str(d), torch.bfloat16, kind="single")
    return d


def _copy(src, tmp_path):
    dst = tmp_path / "in"
    shutil.copytree(src, dst)
    return dst


def _edit_shard(path, fn):
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


def _to_orbax(fmt, src, tmp_path):
    conversion.to_orbax(fmt, src, tmp_path / "out")


def test_missing_config_files(meta_dir, hf_dir, tmp_path):
    src = _copy(meta_dir, tmp_path)
    os.remove(src / "params.json")
    with pytest.raises(FileNotFoundError, match=r"in: no params.json"):
        _to_orbax("meta", src, tmp_path)
    shutil.rmtree(src)
    src = _copy(hf_dir, tmp_path)
    os.remove(src / "config.json")
    with pytest.raises(FileNotFoundError, match=r"in: no config.json"):
        _to_orbax("hf", src, tmp_path)
    assert not (tmp_path / "out").exists()


def test_missing_shard(meta_dir, tmp_path):
    src = _copy(meta_dir, tmp_path)
    os.rename(src / "consolidated.01.pth", src / "consolidated.02.pth")
    with pytest.raises(ValueError, match=r"shard is missing"):
        _to_orbax("meta", src, tmp_path)


def test_shards_disagree_in_shape(meta_dir, tmp_path):
    src = _copy(meta_dir, tmp_path)
    _edit_shard(src / "consolidated.01.pth",
                lambda sd: sd.update({"layers.1.feed_forward.w2.weight": sd["layers.1.feed_forward.w2.weight"][:-1]}))
    with pytest.raises(ValueError, match=r"layers\.1\.feed_forward\.w2\.weight.*shards disagree"):
        _to_orbax("meta", src, tmp_path)


def test_shards_disagree_in_names(meta_dir, tmp_path):
    src = _copy(meta_dir, tmp_path)
    _edit_shard(src / "consolidated.01.pth", lambda sd: sd.pop("layers.0.ffn_norm.weight"))
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth: shards disagree .*layers\.0\.ffn_norm\.weight"):
        _to_orbax("meta", src, tmp_path)


@pytest.mark.parametrize("edit, pattern", [
    (lambda sd: sd.update({"layers.0.attention.extra.weight": torch.zeros(2)}), r"unknown \['layers\.0\.attention\.extra"),
    (lambda sd: sd.pop("output.weight"), r"missing \['output\.weight'\]"),
])
def test_unknown_or_missing_names(meta_dir, tmp_path, edit, pattern):
    src = _copy(meta_dir, tmp_path)
    for f in ("consolidated.00.pth", "consolidated.01.pth"):
        _edit_shard(src / f, edit)
    with pytest.raises(ValueError, match=pattern):
        _to_orbax("meta", src, tmp_path)


def test_shape_does_not_match_config(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] += 32
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.safetensors: model\.layers\.0\.mlp\.gate_proj\.weight: shape"):
        _to_orbax("hf", src, tmp_path)


@pytest.mark.parametrize("fmt, name", [("meta", "consolidated.01.pth"), ("hf", "model.safetensors")])
def test_truncated_file(meta_dir, hf_dir, tmp_path, fmt, name):
    src = _copy(meta_dir if fmt == "meta" else hf_dir, tmp_path)
    size = os.path.getsize(src / name)
    with open(src / name, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(ValueError, match=rf"{name}.*truncated"):
        _to_orbax(fmt, src, tmp_path)


def test_safetensors_tensor_cut_short(hf_dir, tmp_path):
    """A file cut inside the data (header intact) names the tensor that runs past the end."""
    src = _copy(hf_dir, tmp_path)
    with open(src / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(src / "model.safetensors") - 10)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor \S+ needs bytes .* \(truncated\?\)"):
        _to_orbax("hf", src, tmp_path)


def test_refuses_pickled_code(meta_dir, tmp_path):
    src = _copy(meta_dir, tmp_path)
    torch.save({"tok_embeddings.weight": torch.zeros(1), "evil": _Evil()}, src / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth: cannot read"):
        _to_orbax("meta", src, tmp_path)
    assert not (tmp_path / "pwned").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_refuses_to_overwrite_and_leaves_nothing_on_failure(hf_dir, meta_dir, tmp_path):
    out = tmp_path / "out"
    conversion.to_orbax("hf", hf_dir, out)
    with pytest.raises(FileExistsError, match="overwrite"):
        conversion.to_orbax("hf", hf_dir, out)
    with pytest.raises(FileExistsError, match="overwrite"):
        conversion.from_orbax("hf", out, hf_dir)
    conversion.to_orbax("meta", meta_dir, out, overwrite=True)
    assert "param_dtype" not in json.loads((out / "model_config.json").read_text())  # a run option, not stored
    assert {x.dtype for x in jax.tree.leaves(load_checkpoint(out)[1])} == {np.dtype("float16")}
    src = _copy(meta_dir, tmp_path)
    _edit_shard(src / "consolidated.00.pth", lambda sd: sd.update({"output.weight": sd["output.weight"][:, :-1]}))
    with pytest.raises(ValueError):
        conversion.to_orbax("meta", src, tmp_path / "failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no output, no temporary left


def test_unknown_format_string_is_refused_naming_the_allowed_ones(hf_dir, tmp_path):
    """A format string is parsed once at the API edge; anything but meta/hf is an error, never HF."""
    from llama_jax.errors import InputError
    for call, where in ((lambda: conversion.to_orbax("HF", hf_dir, tmp_path / "a"), "source"),
                        (lambda: conversion.from_orbax("safetensors", hf_dir, tmp_path / "b"), "target")):
        with pytest.raises(InputError) as e:
            call()
        assert str(e.value) == f"{where}: unknown checkpoint format (expected meta or hf, got " \
                               f"{'HF' if where == 'source' else 'safetensors'!r})"
    assert not list(tmp_path.iterdir())


def test_every_transform_and_split_has_a_table_entry():
    """The name map dispatches through tables: a new enum member without an entry fails here."""
    import numpy as np
    from llama_jax.interop import mapping
    from llama_jax.interop.formats import Format
    assert set(mapping._TO_OURS) == set(mapping._TO_TORCH) == set(mapping.Transform)
    assert set(mapping._SPLIT_AXIS) | {mapping.MetaSplit.EMBEDDING} == set(mapping.MetaSplit)
    assert {r.transform for r in mapping.RULES if r.rotary} <= set(mapping._ROTARY_HEADS)
    rng = np.random.default_rng(0)
    for rule in mapping.RULES:  # torch -> ours -> torch is the identity, in both formats
        w = rng.standard_normal(mapping.torch_shape(rule, CFG)).astype(np.float32)
        for fmt in Format:
            ours = mapping.tensor_to_ours(rule, w, CFG, fmt)
            np.testing.assert_array_equal(mapping.tensor_to_torch(rule, ours, CFG, fmt), w)
