"""Every ```python block of README.md runs as written, on a tiny random checkpoint.

The one substitution: a string literal starting with "ckpt/" or "tasks/" (README's example
paths: ckpt/llama-7b, ckpt/llama2-7b, tasks/) is made absolute under a temporary directory
that holds them (tiny random checkpoints with a tokenizer, and a few PIQA rows); the
blocks also run with that directory as the working directory. A block that cannot run on
a CPU is marked on the line before its fence with `<!-- readme-test: skip (why) -->`.
Each block runs alone, in a fresh namespace: it must import and define all it uses.
"""
import contextlib
import io
import json
import os
import re
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from llama_jax import Llama, ModelConfig
from llama_jax.checkpoint import save_params
from llama_jax.data import train_tokenizer

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
SKIP = "<!-- readme-test: skip"
TEXT = ["The capital of France is Paris and the capital of Italy is Rome",
        "the cat sat on the mat, eat an apple, some text, some more text"] * 20


def python_blocks(path: str = README) -> list[tuple[int, str, str | None]]:
    """(line number of the fence, code, skip reason or None) for each ```python block."""
    lines = open(path).read().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i + 1, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            prev = lines[start - 2].strip() if start >= 2 else ""
            blocks.append((start, "\n".join(body), prev if prev.startswith(SKIP) else None))
        i += 1
    return blocks


BLOCKS = python_blocks()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    train_tokenizer(TEXT, 300, str(root / "tok" / "tokenizer.model"))
    # The tokenizer's vocabulary (sampled ids must decode); 4 heads over 2 kv heads, float32.
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16, max_seq_len=128)
    params = nn.unbox(Llama(cfg).init(jax.random.PRNGKey(0), np.ones((1, 4), np.int32))["params"])
    save_params(root / "ckpt" / "llama-7b", params, cfg, tokenizer_dir=root / "tok")
    shutil.copytree(root / "ckpt" / "llama-7b", root / "ckpt" / "llama2-7b")
    (root / "tasks" / "piqa").mkdir(parents=True)
    rows = [{"goal": "eat", "sol1": "an apple", "sol2": "the mat", "label": 0}] * 3
    (root / "tasks" / "piqa" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def localise(code: str, root) -> str:
    """README's relative example paths ("ckpt/...", "tasks/...") made absolute under root."""
    return re.sub(r"""(["'])((?:ckpt|tasks)/)""", lambda m: f"{m.group(1)}{root}/{m.group(2)}", code)


def test_readme_has_its_python_blocks():
    assert len(BLOCKS) >= 4, BLOCKS  # the extractor itself works: model, generation, conversion, evaluation
    assert localise('load("ckpt/llama-7b"), x("tasks/")', "/r") == 'load("/r/ckpt/llama-7b"), x("/r/tasks/")'


@pytest.mark.parametrize("line, code, skip", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_python_block_runs(workspace, monkeypatch, line, code, skip):
    if skip:
        pytest.skip(skip)
    monkeypatch.chdir(workspace)
    namespace = {"__name__": f"readme_block_{line}"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(localise(code, workspace), f"README.md:{line}", "exec"), namespace)
