"""The notebooks run headless on the CPU, each making its own tiny random model."""
import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernel spec for this very interpreter, so the notebooks see this environment."""
    home = tmp_path_factory.mktemp("jupyter")
    spec = home / "kernels" / "llama_jax_test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "llama_jax tests", "language": "python"}))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(home)
    # The kernel inherits the environment: one CPU device is enough and starts faster.
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "LLAMA_CHECKPOINT": "", "LLAMA_TORCH_DIR": ""}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield "llama_jax_test"
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    os.environ.pop("JUPYTER_PATH") if old is None else os.environ.__setitem__("JUPYTER_PATH", old)


@pytest.mark.parametrize("name", ["inference.ipynb", "from_pytorch.ipynb", "chat.ipynb"])
def test_notebook_runs(kernel, name):
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=300,
                                     resources={"metadata": {"path": ROOT}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "tokens/s" in outputs or "identical: True" in outputs
