"""A Hugging Face export is read right by transformers' Auto classes: AutoTokenizer gives our
tokenizer's ids (SentencePiece and LLaMA 3 tiktoken files), generation_config.json has our
bos/eos, and AutoModelForCausalLM gives our logits and our greedy tokens."""
import base64
import glob
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from hf_utils import hf_model, params_from_hf, rel_err
from llama_jax import Llama, ModelConfig, generate
from llama_jax.interop import convert as conversion
from llama_jax.interop import hf_tokenizer
from llama_jax.checkpoint import save_params
from llama_jax.data import Llama3Tokenizer, train_tokenizer
from llama_jax.generations import Generation
from llama_jax.inference.chat import encode_dialog, hf_chat_template

pytest.importorskip("tokenizers")

TEXTS = ["hello world", " one leading space", "   three leading spaces", "trailing space ", "", " ", "\n",
         "digits 0 7 42 12345 3.14159 and 1,000,000", "unicode: héllo wörld, 世界, ∮ E·da = Q, emoji 🙂🦙",
         "lines\nand\n\n  indented\n\tand tabs\r\n", "<s> </s> <unk> <|begin_of_text|><|eot_id|> as text",
         "it's   don't\u00a0nbsp  \u3000ideographic space", "def f(x):\n    return x ** 2  # square\n"]
SPECIAL_TEXT = ["<s>", "</s>", "<unk>", "<|begin_of_text|>", "<|eot_id|>"]
MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"  ", b"   ", b"    ",
          b"12", b"123", b"\n\n", b"in", b" in", b"th", b"the", b" the", b"re", b"ret", b"return", b" (", b"):"]


def _corpus():
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "json", "*.py")))
    return [open(f).read() for f in files] + [t * 3 for t in TEXTS]


@pytest.fixture(scope="module", params=["sentencepiece", "tiktoken"])
def export(request, tmp_path_factory):
    """(our tokenizer, config, params, HF export dir) of a tiny random model with that tokenizer."""
    src = tmp_path_factory.mktemp(request.param)
    path = str(src / "tokenizer.model")
    if request.param == "sentencepiece":
        tok = train_tokenizer(_corpus(), 700, path)
    else:
        with open(path, "w") as f:
            for rank, t in enumerate([bytes([b]) for b in range(256)] + MERGES):
                f.write(f"{base64.b64encode(t).decode()} {rank}\n")
        tok = Llama3Tokenizer(path)
    llama3 = {"rope_theta": 500000.0, "generation": "3"} if request.param == "tiktoken" else {"generation": "2"}
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, multiple_of=32,
                      max_seq_len=1024, **llama3)
    params = params_from_hf(hf_model(cfg, seed=3), cfg)
    save_params(src / "ckpt", params, cfg, tokenizer_dir=src)
    conversion.from_orbax("hf", src / "ckpt", src / "hf")
    return tok, cfg, params, str(src / "hf")


def test_auto_tokenizer_gives_our_ids(export):
    tok, _, _, path = export
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)
    for text in TEXTS + ["".join(_corpus()[:2])]:
        ids = tok.encode(text, bos=True)
        # text that spells a special token is plain text to our (Meta's) encode; transformers
        # reads it so only when asked (the export keeps its default, for chat templates)
        assert hf(text, split_special_tokens=True)["input_ids"] == ids, text
        if not any(name in text for name in SPECIAL_TEXT):
            assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids), text
    assert hf("hello", add_special_tokens=False)["input_ids"] == tok.encode("hello", bos=False)
    assert hf("a <|eot_id|> </s>")["input_ids"].count(tok.eot_id if isinstance(tok, Llama3Tokenizer) else tok.eos_id) == 1


def test_auto_tokenizer_chat_template_gives_encode_dialog(export):
    """The export's chat_template: apply_chat_template gives encode_dialog's ids."""
    tok, _, _, path = export
    hf = transformers.AutoTokenizer.from_pretrained(path)
    dialogs = [[{"role": "user", "content": "hello world"}],
               [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "héllo 世界 🦙"},
                {"role": "assistant", "content": "def f(x):\n    return x"}, {"role": "user", "content": ""}]]
    for dialog in dialogs:
        out = hf.apply_chat_template(dialog, tokenize=True, add_generation_prompt=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        assert list(ids) == encode_dialog(tok, dialog)
    config = json.loads(open(os.path.join(path, "tokenizer_config.json")).read())
    assert config["chat_template"] == hf_chat_template(tok) and config["split_special_tokens"] is False


def test_generation_config_has_our_stop_ids(export):
    tok, _, _, path = export
    got = json.loads(open(os.path.join(path, "generation_config.json")).read())
    stops = [tok.eos_id, tok.eot_id] if isinstance(tok, Llama3Tokenizer) else tok.eos_id
    assert (got["bos_token_id"], got["eos_token_id"], got["pad_token_id"]) == (tok.bos_id, stops, tok.eos_id)
    assert transformers.GenerationConfig.from_pretrained(path).eos_token_id == stops
    config = transformers.AutoConfig.from_pretrained(path)
    assert (config.bos_token_id, config.eos_token_id) == (tok.bos_id, tok.eos_id)


def test_generation_ids_by_generation(export):
    """Llama 3.1 on also stops at <|eom_id|> (bos + 8); without a tokenizer, the released ids."""
    tok = export[0]
    if isinstance(tok, Llama3Tokenizer):
        got = hf_tokenizer.generation_ids(tok, Generation.LLAMA3_1)
        assert got["eos_token_id"] == [tok.eos_id, tok.bos_id + 8, tok.eot_id]
        assert hf_tokenizer.generation_ids(tok, Generation.LLAMA2)["eos_token_id"] == [tok.eos_id, tok.eot_id]
    else:
        assert hf_tokenizer.generation_ids(tok, Generation.LLAMA3_1)["eos_token_id"] == tok.eos_id
    released = {g: hf_tokenizer.generation_ids(None, g) for g in Generation}
    assert released[Generation.LLAMA2] == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert released[Generation.LLAMA3]["eos_token_id"] == [128001, 128009]
    for g in (Generation.LLAMA3_1, Generation.LLAMA3_2, Generation.LLAMA3_3):
        assert released[g] == {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "pad_token_id": 128001}


def test_auto_model_gives_our_logits_and_greedy_tokens(export):
    tok, cfg, params, path = export
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = hf_tok("".join(_corpus()))["input_ids"][:600]
    assert len(ids) == 600 and ids == tok.encode("".join(_corpus()))[:600]
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(jax.jit(Llama(cfg).apply)({"params": params}, np.array([ids], np.int32)))
    assert rel_err(ours, theirs) < 1e-5
    stops = model.generation_config.eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    prompt = ids[:40]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
    ours_greedy = generate(cfg, params, [prompt], 24, stop_ids=stops)[0]
    assert ours_greedy == out[0, len(prompt):].tolist()


def test_hf_tokenizer_files_are_kept_and_bad_tokenizers_skipped(export, tmp_path):
    tok = export[0]
    kept, bad = tmp_path / "kept", tmp_path / "bad"
    for d in (kept, bad):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"bos_token_id": -5, "eos_token_id": -6}))
    (kept / "tokenizer.model").write_bytes(open(tok.path, "rb").read())
    (kept / "tokenizer_config.json").write_text('{"from": "hub"}')
    (bad / "tokenizer.model").write_bytes(b"not a tokenizer")
    cfg = ModelConfig.preset("tiny")
    assert hf_tokenizer.write_export_files(kept, cfg) == ["generation_config.json"]
    assert (kept / "tokenizer_config.json").read_text() == '{"from": "hub"}' and not (kept / "tokenizer.json").exists()
    assert hf_tokenizer.write_export_files(bad, cfg) == ["generation_config.json"]
    assert json.loads((bad / "generation_config.json").read_text())["eos_token_id"] == 2  # generation 2's
    assert json.loads((bad / "config.json").read_text())["eos_token_id"] == -6  # untouched
