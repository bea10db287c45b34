"""Every CLI and loader given relative paths from another working directory, on one tiny
trained run (issue 17.1), and the run's tokenizer found in its step directories (17.2).

The run is trained with `--config.data.tokenizer=tok/tokenizer.model`: its step
directories hold a copy of the tokenizer, its workdir none (a workdir-only lookup fails).
"""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from train_helpers import as_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ["def f(x):\n    return x + 1\n", "apple banana cherry grape lemon mango orange peach pear plum"] * 40
# Two steps, a checkpoint after each; one CPU device, no sample.
RUN = {"steps": 2, "checkpoint_every": 1, "optimizer.warmup_steps": 1, "data.tokenizer": "tok/tokenizer.model", "sample.max_new_tokens": 0}


def run(args: list[str], cwd, check: bool = True) -> subprocess.CompletedProcess:
    """`python ARGS` in `cwd`, importing this checkout's llama_jax, on one CPU device; the
    runs share a compilation cache (the three trainings compile the same train step)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "JAX_COMPILATION_CACHE_DIR": os.path.join(cwd, ".jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, f"{args} exited {p.returncode}:\n{p.stderr[-3000:]}"
    return p


def latest_step(root):
    """runs/demo's latest step directory (2, or 3 once the resume test has run)."""
    steps = root / "runs" / "demo" / "checkpoints"
    return steps / max(os.listdir(steps), key=int)


def train(cwd, workdir: str, **overrides) -> subprocess.CompletedProcess:
    return run([os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
                "--workdir", workdir, *as_flags({**RUN, **overrides})], cwd)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A directory holding tok/tokenizer.model, runs/demo (2 steps), data/; the tests run in it."""
    from llama_jax.data import train_tokenizer
    root = tmp_path_factory.mktemp("relative")
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:40]
    train_tokenizer([open(f, errors="ignore").read() for f in files], 512, str(root / "tok" / "tokenizer.model"))
    train(root, "runs/demo")
    (root / "data" / "piqa").mkdir(parents=True)
    rows = [{"goal": "eat", "sol1": "apple", "sol2": "the mat", "label": 0}] * 3
    (root / "data" / "piqa" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "data" / "doc.txt").write_text("\n".join(TEXT[:4]))
    (root / "notebooks").mkdir()
    return root


def test_the_run_keeps_its_tokenizer_in_its_steps_only(root):
    steps = root / "runs" / "demo" / "checkpoints"
    assert {"1", "2"} <= set(os.listdir(steps))
    assert (steps / "2" / "tokenizer.model").read_bytes() == (root / "tok" / "tokenizer.model").read_bytes()
    assert not (root / "runs" / "demo" / "tokenizer.model").exists()


def test_loaders_from_another_directory(root, monkeypatch):
    """load_checkpoint, the notebooks' loaders (LLAMA_CHECKPOINT=../runs/demo) and the
    harness adapter, with paths relative to the working directory."""
    from llama_jax import load_checkpoint
    from llama_jax.checkpoint import find_tokenizer_file, resolve_checkpoint, tokenizer_file
    from llama_jax.data import load_tokenizer
    step = latest_step(root)
    monkeypatch.chdir(root / "notebooks")
    assert resolve_checkpoint("../runs/demo") == step
    config, params = load_checkpoint("../runs/demo")
    for where in ("../runs/demo", "../runs/demo/checkpoints", "../runs/demo/checkpoints/1"):
        assert find_tokenizer_file(where).parent.parent == step.parent
        assert load_tokenizer(str(tokenizer_file(where))).vocab_size == 512
    if importlib.util.find_spec("lm_eval"):
        from llama_jax.evaluation.harness import LlamaJaxLM
        lm = LlamaJaxLM.from_checkpoint("../runs/demo")
        assert lm.tok.vocab_size == 512 and lm.config == config


def test_training_resumes_in_a_relative_workdir(root):
    p = train(root, "runs/demo", steps=3)
    assert "resuming from" in p.stdout + p.stderr
    rows = [json.loads(line) for line in (root / "runs" / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-1] == 3
    assert (root / "runs" / "demo" / "checkpoints" / "3" / "params").is_dir()


def test_fine_tune_with_init_from_a_relative_run(root):
    """`--config.init_from=runs/demo`, no data.tokenizer: the run's tokenizer is found in its step."""
    overrides = {k: v for k, v in RUN.items() if k != "data.tokenizer"}
    p = run([os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
             "--workdir", "runs/ft", "--config.init_from=runs/demo", *as_flags(overrides)], root)
    assert "fine-tuning from runs/demo" in p.stdout + p.stderr
    assert (root / "runs" / "ft" / "checkpoints" / "2" / "tokenizer.model").read_bytes() == \
        (root / "tok" / "tokenizer.model").read_bytes()


def test_generate_cli(root):
    p = run(["-m", "llama_jax", "generate", "--checkpoint", "runs/demo", "--prompt", "def f(x):",
             "--max-new-tokens", "4"], root)
    assert p.stdout.startswith("def f(x):")


def test_eval_cli_task_and_perplexity(root):
    run([os.path.join(ROOT, "eval.py"), "--checkpoint", "runs/demo", "--tasks", "piqa", "--data_dir", "data",
         "--perplexity", "text:data/doc.txt", "--output", "eval.json"], root)
    r = json.loads((root / "eval.json").read_text())
    assert r["results"]["piqa"]["n"] == 3 and r["perplexity"]["tokens"] > 0
    assert r["config"]["tokenizer"] == str(latest_step(root) / "tokenizer.model")


def test_export_to_hf_and_meta_and_back(root, monkeypatch):
    convert = os.path.join(ROOT, "convert")
    run([os.path.join(convert, "from_orbax.py"), "--target", "hf", "--input", "runs/demo", "--output", "export/hf"],
        root)
    run([os.path.join(convert, "from_orbax.py"), "--target", "meta", "--input", "runs/demo/checkpoints",
         "--output", "export/meta"], root)
    assert (root / "export" / "meta" / "consolidated.00.pth").is_file()
    run([os.path.join(convert, "to_orbax.py"), "--source", "hf", "--input", "export/hf", "--output", "rel/"], root)
    from llama_jax import load_checkpoint
    monkeypatch.chdir(root)
    _, ours = load_checkpoint("runs/demo")
    _, back = load_checkpoint("rel")
    assert jax.tree.all(jax.tree.map(np.array_equal, ours, back))
