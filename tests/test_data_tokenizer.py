"""Tokenizer: the CLI trains one with the LLaMA recipe; it round-trips, splits digits,
falls back to bytes; vocab checks and bad input give clear errors."""
import os
import subprocess
import sys
import time

import pytest

from llama_jax.data import DataError, SourceConfig, Tokenizer, check_vocab, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRICKY = [
    "def f(x):\n    return x + 12345\n",
    "  two leading spaces,\ttabs\t\tand\n\n\nblank lines   \n",
    "unicode: héllo wörld, 世界, emoji 🙂, math ∮ E·da = Q",
    "",
    " ",
    "trailing space ",
]


@pytest.fixture(scope="module")
def cli_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "stdlib512.model"
    start = time.time()
    subprocess.run([sys.executable, os.path.join(REPO, "train_tokenizer.py"), "--source", "stdlib",
                    "--vocab_size", "512", "--output", str(out), "--max_chars", "2000000"],
                   check=True, cwd=REPO, capture_output=True)
    assert time.time() - start < 30
    return Tokenizer(str(out))


def test_special_ids_match_llama(cli_tokenizer):
    tok = cli_tokenizer
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, -1, 512)
    ids = tok.encode("hello", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]
    assert tok.encode("hello", bos=False) == ids[1:-1]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trips_exactly(cli_tokenizer, text):
    assert cli_tokenizer.decode(cli_tokenizer.encode(text, bos=True, eos=True)) == text


def test_digits_are_split(cli_tokenizer):
    pieces = [cli_tokenizer.id_to_piece(i) for i in cli_tokenizer.encode("x = 1234567890 + 42", bos=False)]
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert "".join(digit_pieces).replace("\u2581", "") == "123456789042"
    assert all(len(p.replace("\u2581", "")) == 1 for p in digit_pieces), pieces


def test_unknown_characters_fall_back_to_bytes(cli_tokenizer):
    text = "\u16a0\u16c7\U0001F680"  # runes and a rocket: not in a stdlib-trained vocab
    ids = cli_tokenizer.encode(text, bos=False)
    pieces = [cli_tokenizer.id_to_piece(i) for i in ids]
    assert cli_tokenizer.unk_id not in ids
    assert sum(p.startswith("<0x") for p in pieces) == len(text.encode("utf-8"))  # 3 + 3 + 4 bytes
    assert cli_tokenizer.decode(ids) == text


def test_train_from_texts_in_memory(tmp_path):
    texts = [f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(2000)]
    tok = train_tokenizer(texts, 300, str(tmp_path / "t.model"))
    assert tok.vocab_size == 300 and os.path.isfile(tmp_path / "t.model")
    assert tok.decode(tok.encode(texts[5])) == texts[5]


def test_check_vocab(cli_tokenizer):
    check_vocab(cli_tokenizer, 512)
    check_vocab(cli_tokenizer, 32000)
    with pytest.raises(DataError, match=r"vocab_size 512 .* model's vocab_size is 256"):
        check_vocab(cli_tokenizer, 256)


def test_bad_input_errors(tmp_path):
    with pytest.raises(DataError, match="tokenizer model not found"):
        Tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        Tokenizer(str(tmp_path / "junk.model"))
    with pytest.raises(DataError, match="empty corpus"):
        train_tokenizer(["", "   ", "\n"], 300, str(tmp_path / "e.model"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty corpus"):
        train_tokenizer(SourceConfig(kind="text", path=str(tmp_path / "empty.txt"), text_unit="line"),
                        300, str(tmp_path / "e.model"))


def test_cli_reports_missing_file(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "train_tokenizer.py"), "--source", "text",
                        "--path", str(tmp_path / "nope.txt"), "--vocab_size", "512", "--output",
                        str(tmp_path / "t.model")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "no such file or directory" in r.stderr and "nope.txt" in r.stderr
