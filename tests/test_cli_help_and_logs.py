"""CLI consistency and quiet logs (issue 17.6, 17.7, 18.11): fast, useful --help without heavy
imports; one flag style with the other accepted; no WARNING lines from a conversion or from
`python -m llama_jax generate`; a config file runs once; a full disk gives one line."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from test_cli_bad_inputs import ROOT, SCRIPTS

HEAVY = ("jax", "flax", "orbax", "torch", "optax", "transformers", "tensorflow", "tensorflow_datasets")
_PROBE = """
import json, runpy, sys, time
t0 = time.process_time()  # CPU time, not wall: other tests (pytest -n 2) share the cores
sys.argv = [sys.argv[1], *json.loads(sys.argv[2])]
try:
    if sys.argv[0] == "generate":
        sys.argv = ["llama_jax", "generate", *sys.argv[1:]]
        runpy.run_module("llama_jax", run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(sys.argv[0], run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({"rc": code, "s": time.process_time() - t0, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def _help(cli, *args):
    target = "generate" if cli == "generate" else SCRIPTS[cli]
    p = subprocess.run([sys.executable, "-c", _PROBE, target, json.dumps([*args, "--help"])], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stdout


@pytest.mark.parametrize("cli", sorted(SCRIPTS))
def test_help_is_fast_and_imports_nothing_heavy(cli):
    extra = ("--config", "configs/tiny.py") if cli == "train" else ()
    info, text = _help(cli, *extra)
    assert info["rc"] == 0 and info["heavy"] == [], info
    assert info["s"] < 2.0, f"--help took {info['s']:.2f} s of CPU time"
    assert "_" not in "".join(w for w in text.split() if w.startswith("--") and not w.startswith("--config."))


def test_train_help_lists_keys_and_says_configs_are_code():
    _, text = _help("train", "--config", "configs/tiny.py")
    assert "Config files are Python" in text and "trust" in text
    assert "steps = 40" in text and "checkpoint_every = 20" in text and "model.n_layers = 2" in text
    assert "optimizer.peak_lr = 0.003" in text
    _, bare = _help("train")
    assert "--workdir" in bare and "--config FILE" in bare


def test_generate_help_documents_sampling():
    _, text = _help("generate")
    for flag, words in (("--temperature", "greedy"), ("--top-p", "nucleus"), ("--top-k", "most likely")):
        assert flag in text and words in text
    assert "DESIGN" not in text and "thin CLI" not in text


def test_underscore_spelling_is_an_alias():
    from llama_jax.cli.args import ArgumentParser
    p = ArgumentParser()
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--top-p", type=float)
    a = p.parse_args(["--max_new_tokens", "3", "--top_p=0.5"])
    assert (a.max_new_tokens, a.top_p) == (3, 0.5)
    assert p.parse_args(["--max-new-tokens=4"]).max_new_tokens == 4


def test_config_runs_once(tmp_path):
    """Listing keys for --help or for an unknown key's message does not run the file again."""
    counter = tmp_path / "runs"
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"from llama_jax.train.config import base_config\n"
                   f"open({str(counter)!r}, 'a').write('x')\n"
                   f"def get_config():\n    return base_config()\n")
    for extra in (["--help"], ["--config.stpes=3"]):
        counter.write_text("")
        p = subprocess.run([sys.executable, "train.py", "--config", str(cfg), "--workdir", str(tmp_path / "w"),
                            *extra], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        assert counter.read_text() == "x", (extra, p.stderr)
    assert p.returncode == 2 and p.stderr.strip() == (
        f"error: --config.stpes: unknown key of {cfg} (did you mean --config.steps?)")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    import flax.linen as nn
    import jax
    import numpy as np
    from llama_jax import Llama, ModelConfig
    from llama_jax.checkpoint import save_params
    from llama_jax.data import train_tokenizer
    root = tmp_path_factory.mktemp("logs")
    cfg = ModelConfig.preset("tiny")
    params = nn.unbox(Llama(cfg).init(jax.random.PRNGKey(0), np.ones((1, 8), np.int32))["params"])
    save_params(root / "ckpt", params, cfg)
    import glob
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:40]
    train_tokenizer([open(f, errors="ignore").read() for f in files], cfg.vocab_size,
                    str(root / "ckpt" / "tokenizer.model"))
    return root


def _run(*cmd, **kw):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user has (conftest sets 8 for sharding tests)
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT, env=env, **kw)


def test_conversion_and_generate_print_no_warnings(tiny_ckpt):
    r = tiny_ckpt
    # A training step's layout: Orbax's step metadata sits beside params/, not inside it.
    step = r / "workdir" / "checkpoints" / "7"
    shutil.copytree(r / "ckpt", step)
    (step / "params" / "_CHECKPOINT_METADATA").unlink()
    runs = [_run("convert/from_orbax.py", "--target", "hf", "--input", str(r / "ckpt"), "--output", str(r / "hf")),
            _run("convert/to_orbax.py", "--source", "hf", "--input", str(r / "hf"), "--output", str(r / "back")),
            _run("convert/from_orbax.py", "--target", "meta", "--input", str(r / "back"), "--output", str(r / "meta")),
            _run("-m", "llama_jax", "generate", "--checkpoint", str(r / "workdir"), "--prompt", "def", "--max-new-tokens", "4",
                 "--tokenizer", str(step / "tokenizer.model")),
            _run("convert/from_orbax.py", "--target", "hf", "--input", str(r / "workdir"), "--output", str(r / "hf2"))]
    for p in runs:
        assert p.returncode == 0, p.stderr
        assert "WARNING" not in p.stderr and "Warning" not in p.stderr, p.stderr


def test_full_disk_is_one_line(tiny_ckpt, tmp_path):
    """A 300 KB tmpfs fills during conversion: one `error:` line naming the disk, no traceback."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        r = tiny_ckpt
        if not (r / "hf").exists():
            _run("convert/from_orbax.py", "--target", "hf", "--input", str(r / "ckpt"), "--output", str(r / "hf"))
        for p in (_run("convert/from_orbax.py", "--target", "hf", "--input", str(r / "ckpt"), "--output", str(disk / "a")),
                  _run("convert/to_orbax.py", "--source", "hf", "--input", str(r / "hf"), "--output", str(disk / "b"))):
            lines = [ln for ln in p.stderr.splitlines() if ln.strip()]  # progress bar lines, then the error
            errors = [ln for ln in lines if ln.startswith("error: ")]
            assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
            assert len(errors) == 1 and lines[-1] == errors[0] and "o space left on device" in errors[0], p.stderr
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
