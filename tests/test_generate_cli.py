"""The text front end and `python -m llama_jax generate` on a tiny saved checkpoint; foreign folders."""
import glob
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from llama_jax import Llama, ModelConfig
from llama_jax.checkpoint import load_checkpoint, save_params
from llama_jax.__main__ import main as llama_main


def main(argv):
    """`python -m llama_jax generate ARGV` in this process; exits with its code when it fails."""
    rc = llama_main(["generate", *argv])
    if rc:
        raise SystemExit(rc)
from llama_jax.inference.text import generate_text

pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from llama_jax.data import train_tokenizer
    cfg = ModelConfig.preset("tiny")
    params = nn.unbox(Llama(cfg).init(jax.random.PRNGKey(0), np.ones((1, 8), np.int32))["params"])
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_params(path, params, cfg)
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:40]
    tok = train_tokenizer([open(f, errors="ignore").read() for f in files], 512, str(path / "tokenizer.model"))
    return str(path), cfg, params, tok


def test_generate_text_streams_what_it_returns(checkpoint):
    _, cfg, params, tok = checkpoint
    pieces = []
    out = generate_text(cfg, params, tok, ["Hello world", "import os"], 20, temperature=0.7, seed=2,
                        stream=lambda r, s: pieces.append((r, s)))
    for r, text in enumerate(out):
        assert "".join(s for row, s in pieces if row == r) == text


def test_cli(checkpoint, capsys):
    path, cfg, params, tok = checkpoint
    main(["--checkpoint", path, "--prompt", "def f(x):", "--max-new-tokens", "12", "--tensor-parallel", "1"])
    printed = capsys.readouterr().out
    expected = generate_text(cfg, params, tok, "def f(x):", 12)[0]
    assert printed == "def f(x):" + expected + "\n"


def test_foreign_or_missing_checkpoints_are_named(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="Hugging Face PyTorch checkpoint.*to_orbax.py --source hf"):
        load_checkpoint(str(tmp_path / "hf"))
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "consolidated.00.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="Meta PyTorch checkpoint.*--source meta"):
        load_checkpoint(str(tmp_path / "meta"))
    with pytest.raises(FileNotFoundError, match="not a llama_jax checkpoint: .*nothing does not exist"):
        load_checkpoint(str(tmp_path / "nothing"))
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="not a llama_jax checkpoint"):
        load_checkpoint(str(tmp_path / "other"))
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tmp_path / "meta"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "Meta" in err and len(err.splitlines()) == 1


def test_too_long_fails_before_printing_or_loading(checkpoint, capsys, monkeypatch):
    """--max-new-tokens beyond the context: one error line, nothing printed, params never loaded."""
    path, cfg, _, _ = checkpoint
    import llama_jax.checkpoint
    monkeypatch.setattr(llama_jax.checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("params loaded"))
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", path, "--prompt", "hi", "--max-new-tokens", "100000"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("error: --prompt: ") and f"max_seq_len {cfg.max_seq_len}" in err
