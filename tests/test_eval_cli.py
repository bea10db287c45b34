"""eval.py end to end on a tiny checkpoint: tasks from local JSONL, perplexity, JSON, errors."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import flax.linen as nn

from llama_jax import Llama, ModelConfig
from llama_jax.checkpoint import save_params
from llama_jax.data import DataError, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ["apple banana cherry grape lemon mango orange peach pear plum", "the cat sat on the mat yes no"] * 20


def _eval_module():
    spec = importlib.util.spec_from_file_location("eval_cli", os.path.join(ROOT, "eval.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _checkpoint(path, vocab_size, tok_dir):
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=vocab_size, multiple_of=16, max_seq_len=64)
    params = nn.unbox(Llama(cfg).init(jax.random.PRNGKey(0), np.ones((1, 4), np.int32))["params"])
    return save_params(path, params, cfg, tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    train_tokenizer(TEXT, 300, str(root / "tok" / "tokenizer.model"))
    _checkpoint(root / "ckpt", 300, root / "tok")
    data = root / "data"
    (data / "boolq").mkdir(parents=True)
    rows = [{"passage": "the cat sat", "question": "is it a cat", "label": i % 2} for i in range(5)]
    (data / "boolq" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [{"goal": "eat", "sol1": "apple", "sol2": "the mat", "label": 0}] * 3
    (data / "piqa_validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "doc.txt").write_text("\n".join(TEXT[:6]))
    return root


def test_cli_writes_results_and_table(setup, capsys):
    out = setup / "r.json"
    assert _eval_module().main(["--checkpoint", str(setup / "ckpt"), "--tasks", "boolq,piqa", "--data_dir",
                                str(setup / "data"), "--perplexity", f"lines:{setup / 'doc.txt'}",
                                "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["results"]) == {"boolq", "piqa"} and r["results"]["boolq"]["n"] == 5
    assert "acc_paper" in r["results"]["boolq"] and "acc_paper" not in r["results"]["piqa"]
    assert r["perplexity"]["documents"] == 6 and r["perplexity"]["token_perplexity"] > 1
    assert r["config"]["model"]["dim"] == 32 and r["config"]["tasks"] == ["boolq", "piqa"]
    table = capsys.readouterr().out
    assert "boolq" in table and "bits/byte" in table


def test_cli_bad_input(setup, tmp_path):
    ev = _eval_module()
    ckpt = str(setup / "ckpt")
    with pytest.raises(ValueError, match="unknown task 'piqq'; known: boolq"):
        ev.main(["--checkpoint", ckpt, "--tasks", "piqq", "--output", str(tmp_path / "x.json")])
    with pytest.raises(DataError, match=r"hellaswag.*looked for.*hellaswag/validation.jsonl"):
        ev.main(["--checkpoint", ckpt, "--tasks", "hellaswag", "--data_dir", str(tmp_path),
                 "--tfds_data_dir", str(tmp_path), "--output", str(tmp_path / "x.json")])
    _checkpoint(tmp_path / "small", 280, setup / "tok")  # embedding smaller than the tokenizer
    with pytest.raises(DataError, match="vocab_size 300 but the model's vocab_size is 280"):
        ev.main(["--checkpoint", str(tmp_path / "small"), "--tasks", "piqa", "--output", str(tmp_path / "x.json")])
    # As a script: a one-line error and exit status 2, no traceback.
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--checkpoint", ckpt, "--tasks", "nope",
                        "--output", str(tmp_path / "x.json")], capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 2 and p.stderr.startswith("error: unknown task 'nope'") and "Traceback" not in p.stderr


def test_cli_perplexity_of_fine_tuning_answers(setup, capsys):
    """chat_jsonl: the answers' tokens are what is counted (the loss mask, as training has it)."""
    from llama_jax.data import load_tokenizer
    from llama_jax.data.spec import parse_source
    from llama_jax.data.source_kinds import open_source
    from llama_jax.data.sft import encode_example
    rows = [[{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on the mat"}],
            [{"role": "user", "content": "apple"}, {"role": "assistant", "content": "banana cherry"},
             {"role": "user", "content": "grape"}, {"role": "assistant", "content": "lemon"}]]
    (setup / "chat.jsonl").write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    out = setup / "sft.json"
    spec = f"chat_jsonl:{setup / 'chat.jsonl'}"
    assert _eval_module().main(["--checkpoint", str(setup / "ckpt"), "--perplexity", spec, "--output", str(out)]) == 0
    ppl = json.loads(out.read_text())["perplexity"]
    tok = load_tokenizer(str(setup / "tok" / "tokenizer.model"))
    src = open_source(parse_source(spec))
    answers = sum(int(encode_example(tok, src[i])[1].sum()) for i in range(len(src)))
    assert ppl["scored"] == "answers" and ppl["documents"] == 2 and ppl["tokens"] == answers
    assert ppl["token_perplexity"] > 1 and ppl["bits_per_byte"] is None
    assert f"{answers} answer tokens" in capsys.readouterr().out
