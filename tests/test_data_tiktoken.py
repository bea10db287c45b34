"""LLaMA 3 tokenizer: a tiny tiktoken BPE file round-trips text, puts the 256 special
tokens after the ranks (bos n, eos n+1, eot n+9), and load_tokenizer tells it from a
SentencePiece model and from junk."""
import base64
import os
import pickle

import pytest

from llama_jax.data import DataError, Llama3Tokenizer, Tokenizer, load_tokenizer, train_tokenizer
from llama_jax.checkpoint import tokenizer_file

MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world"]
N_RANKS = 256 + len(MERGES)
TEXTS = ["hello world", "", " ", "def f(x):\n    return x + 12345\n\n\n",
         "unicode: héllo wörld, 世界, emoji 🙂, math ∮ E·da = Q", "trailing space ",
         "it's <|begin_of_text|> as plain text", "  tabs\t\tand   spaces   \n"]


def _write_ranks(path, tokens):
    with open(path, "w") as f:
        for rank, tok in enumerate(tokens):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")
    return str(path)


@pytest.fixture(scope="module")
def tik_path(tmp_path_factory):
    return _write_ranks(tmp_path_factory.mktemp("tik") / "tokenizer.model",
                        [bytes([b]) for b in range(256)] + MERGES)


def test_round_trip_and_merges(tik_path):
    tok = Llama3Tokenizer(tik_path)
    for text in TEXTS:
        ids = tok.encode(text, bos=False)
        assert all(0 <= i < N_RANKS for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    assert tok.encode("hello world", bos=False) == [256 + MERGES.index(b"hello"), 256 + MERGES.index(b" world")]
    assert tok.encode("é", bos=False) == list("é".encode())  # no merge: its UTF-8 bytes
    assert tok.id_to_piece(256 + MERGES.index(b"hello")) == "hello"


def test_special_ids(tik_path):
    tok = Llama3Tokenizer(tik_path)
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id) == (N_RANKS, N_RANKS + 1, N_RANKS + 9, -1)
    assert tok.vocab_size == N_RANKS + 256
    st = tok.special_tokens
    assert (st["<|begin_of_text|>"], st["<|end_of_text|>"], st["<|start_header_id|>"],
            st["<|end_header_id|>"], st["<|eot_id|>"]) == (N_RANKS, N_RANKS + 1, N_RANKS + 6, N_RANKS + 7, N_RANKS + 9)
    # Llama 3.1's names (meta-llama/llama-models): eom 8, python_tag 10, reserved 2..246 after
    assert (st["<|eom_id|>"], tok.eom_id, st["<|python_tag|>"]) == (N_RANKS + 8, N_RANKS + 8, N_RANKS + 10)
    assert (st["<|finetune_right_pad_id|>"], st["<|step_id|>"]) == (N_RANKS + 4, N_RANKS + 5)
    assert st["<|reserved_special_token_0|>"] == N_RANKS + 2 and st["<|reserved_special_token_2|>"] == N_RANKS + 11
    assert st["<|reserved_special_token_246|>"] == N_RANKS + 255 and len(st) == 256
    ids = tok.encode("hello", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.bos_id not in ids[1:-1]
    assert tok.encode("hello", bos=False) == ids[1:-1]
    # special-token text in the input is plain text, never a special id
    assert all(i < N_RANKS for i in tok.encode("<|begin_of_text|><|eot_id|>", bos=False))
    assert tok.decode([tok.eot_id]) == "<|eot_id|>"


def test_llama3_0_ids_and_used_names_unchanged(tik_path):
    """Llama 3.0's list (meta-llama/llama3) differs only in names of tokens 3.0 never uses."""
    from llama_jax.data.tiktoken_tokenizer import SPECIAL_TOKENS, SPECIAL_TOKENS_LLAMA3_0
    tok = Llama3Tokenizer(tik_path)
    renamed = {i for i, (new, old) in enumerate(zip(SPECIAL_TOKENS, SPECIAL_TOKENS_LLAMA3_0)) if new != old}
    assert renamed == {4, 5, 8, 10} | set(range(11, 256))
    assert all(SPECIAL_TOKENS_LLAMA3_0[i].startswith("<|reserved_special_token_") for i in renamed)
    for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert tok.special_tokens[name] == N_RANKS + SPECIAL_TOKENS_LLAMA3_0.index(name)
        assert tok.decode([tok.special_tokens[name]]) == ("" if name in ("<|begin_of_text|>", "<|end_of_text|>") else name)


def test_long_runs_and_pickle(tik_path):
    tok = Llama3Tokenizer(tik_path)
    text = "x" * 30_000 + " " * 30_000 + "hello"
    assert tok.decode(tok.encode(text, bos=False)) == text
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode(TEXTS[4]) == tok.encode(TEXTS[4]) and copy.path == tok.path


def test_edited_file_at_same_path_is_reread(tmp_path):
    path = _write_ranks(tmp_path / "t.model", [bytes([b]) for b in range(256)])
    assert Llama3Tokenizer(path).vocab_size == 256 + 256
    _write_ranks(path, [bytes([b]) for b in range(256)] + [b"ab"])
    assert Llama3Tokenizer(path).vocab_size == 257 + 256


def test_load_tokenizer_picks_the_class(tik_path, tmp_path):
    sp = train_tokenizer(["hello world, this is some text\n"] * 50 + [f"line {i}" for i in range(200)], 300,
                         str(tmp_path / "sp" / "tokenizer.model"))
    loaded = load_tokenizer(sp.path)
    assert type(loaded) is Tokenizer and loaded.vocab_size == 300 and loaded.bos_id == 1
    assert type(load_tokenizer(tik_path)) is Llama3Tokenizer
    # a checkpoint folder's tokenizer.model: tokenizer_file finds it, load_tokenizer picks the class
    assert type(load_tokenizer(str(tokenizer_file(os.path.dirname(tik_path))))) is Llama3Tokenizer
    assert type(load_tokenizer(str(tokenizer_file(tmp_path / "sp")))) is Tokenizer
    assert Tokenizer(sp.path).encode("hello") == loaded.encode("hello")  # Tokenizer(...) as before


@pytest.mark.parametrize("content", [b"", b"just some text\nmore\n", b"\x00\x01\x02garbage",
                                     b"aGVsbG8= 0\nnot base64 here\n", b"aGVsbG8= 3\n"])
def test_neither_is_a_clear_error(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(DataError, match="tokenizer.model"):
        load_tokenizer(str(path))
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.model"))
