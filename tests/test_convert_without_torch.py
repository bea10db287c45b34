"""The converters on a machine without PyTorch (issue 17.3): `--help` and safetensors
HF -> Orbax -> HF work; a .pth/.bin says `pip install torch` in one line (exit 2).

torch is made unimportable in the child processes by a sitecustomize that sets
`sys.modules["torch"] = None` (then `import torch` raises ImportError).
"""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from llama_jax import ModelConfig

from llama_jax.interop import convert as conversion
from llama_jax.checkpoint import save_params
from llama_jax.model import param_shapes
from llama_jax.interop.safetensors_files import SafetensorsFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory):
    """(run, root): run(script, *args) runs convert/<script>.py in `root` with torch unimportable."""
    root = tmp_path_factory.mktemp("notorch")
    (root / "shim").mkdir()
    (root / "shim" / "sitecustomize.py").write_text('import sys\nsys.modules["torch"] = None\n')
    env = {**os.environ, "PYTHONPATH": f"{root / 'shim'}{os.pathsep}{ROOT}", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}

    def run(script, *args):
        return subprocess.run([sys.executable, os.path.join(ROOT, "convert", f"{script}.py"), *args], cwd=root,
                              env=env, capture_output=True, text=True, timeout=300)
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "import of torch halted" in probe.stderr  # the shim works
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), nn.unbox(param_shapes(cfg)))
    save_params(root / "ckpt", params, cfg)
    conversion.from_orbax("hf", root / "ckpt", root / "hf")  # the safetensors input (torch may be here)
    return run, root


@pytest.mark.parametrize("script", ["to_orbax", "from_orbax"])
def test_help(no_torch, script):
    run, _ = no_torch
    p = run(script, "--help")
    assert p.returncode == 0 and "--input" in p.stdout, p.stderr


def test_safetensors_round_trip(no_torch):
    run, root = no_torch
    p = run("to_orbax", "--source", "hf", "--input", "hf", "--output", "orbax")
    assert p.returncode == 0, p.stderr
    p = run("from_orbax", "--target", "hf", "--input", "orbax", "--output", "hf2")
    assert p.returncode == 0, p.stderr
    a, b = SafetensorsFile(root / "hf" / "model.safetensors"), SafetensorsFile(root / "hf2" / "model.safetensors")
    assert sorted(a.keys()) == sorted(b.keys()) and len(a.keys()) == 3 + 9 * 2  # embed, norm, head; 9 per layer
    for name in a.keys():
        np.testing.assert_array_equal(a.read(name), b.read(name))


def test_torch_files_say_pip_install_torch(no_torch):
    run, root = no_torch
    p = run("from_orbax", "--target", "meta", "--input", "ckpt", "--output", "meta")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "pip install torch" in p.stderr, p.stderr
    assert not (root / "meta").exists()
    torch = pytest.importorskip("torch")
    (root / "bin").mkdir()
    (root / "bin" / "config.json").write_text((root / "hf" / "config.json").read_text())
    f = SafetensorsFile(root / "hf" / "model.safetensors")
    torch.save({n: torch.from_numpy(np.array(f.read(n))) for n in f.keys()}, root / "bin" / "pytorch_model.bin")
    p = run("to_orbax", "--source", "hf", "--input", "bin", "--output", "out")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("error: ") and "pytorch_model.bin" in p.stderr and "pip install torch" in p.stderr
    assert not (root / "out").exists()
