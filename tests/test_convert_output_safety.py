"""Converter outputs never destroy their input (issue 18.1), and an old output survives
until the new one is complete; a run's tokenizer is found where its params are (17.2).

Real folders throughout: a params-only checkpoint, a training-workdir layout around it,
and its Hugging Face export. Every refusal leaves every input file byte for byte as it was.
"""
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from llama_jax import ModelConfig, checkpoint

from llama_jax.interop import convert as conversion
from llama_jax.errors import InputError, run_cli
from llama_jax.model import param_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "convert", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _snapshot(d) -> dict:
    """relative path -> sha256 of every file under `d`."""
    out = {}
    for dirpath, _, files in os.walk(d):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """root/run/checkpoints/3/ (a step: model_config.json, params/, tokenizer.model) and root/hf/."""
    root = tmp_path_factory.mktemp("safety")
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), nn.unbox(param_shapes(cfg)))
    step = root / "run" / "checkpoints" / "3"
    checkpoint.save_params(step, params, cfg)
    (step / "tokenizer.model").write_bytes(b"not read by the converters")
    (root / "run" / "metrics.jsonl").write_text('{"step": 3}\n')
    conversion.from_orbax("hf", root / "run", root / "hf")
    return root


@pytest.fixture
def tree(folders, tmp_path):
    """A fresh copy of the folders for tests that may damage them."""
    shutil.copytree(folders, tmp_path / "t", symlinks=True)
    return tmp_path / "t"


def _refused(tree, capsys, monkeypatch, script, argv):
    """`script argv` run in `tree` is one line naming the output folder, and leaves `tree` as it was."""
    monkeypatch.chdir(tree)
    before = _snapshot(tree)
    rc = run_cli(_cli(script), argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "the output folder" in err, err
    assert _snapshot(tree) == before


@pytest.mark.parametrize("output", ["run", ".", "run/checkpoints", "run/checkpoints/3", "run/checkpoints/3/hf",
                                    "run/new"])
def test_from_orbax_refuses_output_overlapping_its_input(tree, output, capsys, monkeypatch):
    _refused(tree, capsys, monkeypatch, "from_orbax",
             ["--target", "hf", "--input", "run", "--output", output, "--overwrite"])


@pytest.mark.parametrize("output", ["hf", ".", "hf/orbax"])
def test_to_orbax_refuses_output_overlapping_its_input(tree, output, capsys, monkeypatch):
    _refused(tree, capsys, monkeypatch, "to_orbax", ["--source", "hf", "--input", "hf", "--output", output, "--overwrite"])


def test_symlinks_are_resolved(tree):
    (tree / "link").symlink_to(tree / "hf", target_is_directory=True)
    (tree / "up").symlink_to(tree, target_is_directory=True)
    before = _snapshot(tree / "hf")
    for out in (tree / "link", tree / "up"):
        with pytest.raises(InputError, match="the output folder (is|contains) the input"):
            conversion.to_orbax("hf", tree / "hf", out, overwrite=True)
    with pytest.raises(InputError, match="the output folder is the input"):
        conversion.from_orbax("hf", tree / "run", tree / "up" / "run", overwrite=True)
    assert _snapshot(tree / "hf") == before and (tree / "run" / "metrics.jsonl").is_file()


def test_as_a_script_exit_2_one_line(tree):
    before = _snapshot(tree)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "convert", "from_orbax.py"), "--target", "meta",
                        "--input", "run/checkpoints/3", "--output", "run", "--overwrite"], cwd=tree,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 2 and p.stderr.startswith("error: run: the output folder contains the input"), p.stderr
    assert p.stderr.count("\n") == 1 and _snapshot(tree) == before


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(tree):
    out = tree / "out"
    conversion.from_orbax("hf", tree / "run", out)
    old = _snapshot(out)
    with pytest.raises(RuntimeError, match="killed"):
        with checkpoint.output_dir(out, overwrite=True, inputs=[tree / "run"]) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            assert _snapshot(out) == old  # still whole while the new one is written
            raise RuntimeError("killed")
    assert _snapshot(out) == old
    assert sorted(os.listdir(tree)) == sorted(["hf", "run", "out"])  # no temporary folder left
    # The swap itself fails (e.g. a full disk or a kill): the old output is still there.
    rename = type(out).rename
    def failing_rename(self, target):
        if self.name.startswith(".out.tmp-"):
            raise OSError("rename failed")
        return rename(self, target)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(type(out), "rename", failing_rename)
        with pytest.raises(OSError, match="rename failed"):
            conversion.from_orbax("meta", tree / "run", out, overwrite=True)
    assert _snapshot(out) == old and sorted(os.listdir(tree)) == sorted(["hf", "run", "out"])
    conversion.from_orbax("meta", tree / "run", out, overwrite=True)
    assert "consolidated.00.pth" in os.listdir(out) and "config.json" not in os.listdir(out)
    assert sorted(os.listdir(tree)) == sorted(["hf", "run", "out"])


def test_overwriting_a_symlinked_output_leaves_its_target_alone(tree):
    (tree / "target").mkdir()
    (tree / "target" / "keep.txt").write_text("mine")
    (tree / "out").symlink_to(tree / "target", target_is_directory=True)
    conversion.from_orbax("hf", tree / "run", tree / "out", overwrite=True)
    assert (tree / "out").is_dir() and not (tree / "out").is_symlink() and (tree / "out" / "config.json").is_file()
    assert (tree / "target" / "keep.txt").read_text() == "mine"


def test_tokenizer_lookup_follows_the_checkpoint(tree, monkeypatch):
    """The step's tokenizer.model first, then the workdir's, then the folder's own."""
    find = checkpoint.find_tokenizer_file
    monkeypatch.chdir(tree)
    step = tree / "run" / "checkpoints" / "3"
    for where in ("run", "run/checkpoints", "run/checkpoints/3"):
        assert find(where) == step / "tokenizer.model"
    (step / "tokenizer.model").unlink()
    assert find("run") is None
    (tree / "run" / "tokenizer.model").write_bytes(b"workdir's")
    for where in ("run", "run/checkpoints", "run/checkpoints/3"):
        assert find(where) == tree / "run" / "tokenizer.model"
    (tree / "plain").mkdir()
    (tree / "plain" / "tokenizer.model").write_bytes(b"")
    assert find("plain") == tree / "plain" / "tokenizer.model" and find("run/checkpoints/3/params") is None
