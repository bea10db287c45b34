"""chat() and ChatSession on tiny random models, with tiny SentencePiece (LLaMA 2) and tiktoken
(LLaMA 3) tokenizers: the session's cached turns equal `generate` on the whole conversation's
ids, answers stop on every end-of-turn id, Ctrl-C keeps the session, bad input is one error."""
import dataclasses
import inspect
import os
import signal

import flax.linen as nn
import jax
import numpy as np
import pytest

from llama_jax import Llama, ModelConfig, generate
from llama_jax.errors import InputError
from llama_jax.inference.chat import chat, chat_stop_ids, encode_dialog, encode_next_turn, end_of_turn_ids
from llama_jax.inference.detokenize import decode_continuation
from llama_jax.inference.session import ChatSession
import tiny_tokenizers

U, S = "user", "system"


def m(role, content):
    return {"role": role, "content": content}


def _params(cfg, seed=0):
    return nn.unbox(Llama(cfg).init(jax.random.PRNGKey(seed), np.ones((1, 8), np.int32))["params"])


sp, tik = tiny_tokenizers.fixtures(500)


@pytest.fixture(scope="module")
def models(sp, tik):
    """family -> (config, params, tokenizer); LLaMA 3's vocabulary holds the special tokens."""
    tiny = ModelConfig.preset("tiny")
    c3 = dataclasses.replace(tiny, vocab_size=640)
    return {"2": (tiny, _params(tiny), sp), "3": (c3, _params(c3, 1), tik)}


def _always(cfg, params, token):
    """params whose every next token is `token`: a large constant in embedding dim 0 keeps
    the final normed activation's dim 0 positive, and only `token` reads it strongly."""
    p = jax.tree.map(np.array, params)
    p["tok_embeddings"][:, 0] = 100.0
    p["output"][0, :] = 0.0
    p["output"][0, token] = 1e3
    return p


TURNS = ["hello there", "and what about this?", "third turn, the last"]


@pytest.mark.parametrize("family", ["2", "3"])
def test_session_turns_equal_generate_on_the_whole_dialog(models, family):
    """Greedy, float32: each cached turn answers as `generate` does on every id so far (the
    earlier answers kept as generated, cut ones closed with the end-of-turn id), and each
    turn prefills only its new ids."""
    cfg, params, tok = models[family]
    session = ChatSession(cfg, params, tok, system="Be brief.", temperature=0, max_new_tokens=24, chunk=8)
    ids = []
    for i, text in enumerate(TURNS):
        new = (encode_dialog(tok, [m(S, "Be brief."), m(U, text)]) if i == 0 else encode_next_turn(tok, [m(U, text)]))
        ids += new
        reply = session.send(text)
        expected = generate(cfg, params, [ids], 24, stop_ids=chat_stop_ids(cfg, tok))[0]
        assert reply.prefilled == len(new)
        assert reply.ids[:len(expected)] == expected
        assert reply.stopped in ("end_of_turn", "max_tokens")
        if reply.stopped == "max_tokens":
            assert reply.ids == expected + [end_of_turn_ids(tok)[0]] and reply.generated == 24
        assert reply.content == decode_continuation(tok, ids, expected[:reply.generated]).lstrip()
        ids += reply.ids
        assert session.ids == ids
    assert [msg["role"] for msg in session.messages] == [S, U, "assistant"] * 1 + [U, "assistant"] * 2
    session.reset()
    assert session.send(TURNS[0]).prefilled == len(encode_dialog(tok, [m(U, TURNS[0])]))


@pytest.mark.parametrize("family", ["2", "3"])
def test_answers_end_at_each_end_of_turn_id(models, family):
    cfg, params, tok = models[family]
    for stop in end_of_turn_ids(tok):
        p = _always(cfg, params, stop)
        out = chat(cfg, p, tok, [[m(U, "hi")], [m(U, "a longer question")]], 16)
        assert out == [{"role": "assistant", "content": ""}] * 2
        session = ChatSession(cfg, p, tok)
        reply = session.send("hi")
        assert (reply.ids, reply.stopped, reply.generated) == ([stop], "end_of_turn", 1)
        assert session.send("again").prefilled == len(encode_next_turn(tok, [m(U, "again")]))


def test_chat_streams_and_answers_like_generate(models):
    cfg, params, tok = models["2"]
    dialogs = [[m(U, "hello")], [m(S, "be kind"), m(U, "what is up"), m("assistant", "all"), m(U, "ok")]]
    pieces = []
    out = chat(cfg, params, tok, dialogs, 20, seed=3, stream=lambda r, s: pieces.append((r, s)))
    for r, answer in enumerate(out):
        assert answer["role"] == "assistant" and "".join(s for row, s in pieces if row == r) == answer["content"]
    prompts = [encode_dialog(tok, d) for d in dialogs]
    ids = generate(cfg, params, prompts, 20, temperature=0.6, top_p=0.9, seed=3, stop_ids=chat_stop_ids(cfg, tok))
    assert [a["content"] for a in out] == [
        decode_continuation(tok, p, [t for t in row if t not in chat_stop_ids(cfg, tok)]).lstrip()
        for p, row in zip(prompts, ids)]
    defaults = inspect.signature(chat).parameters
    assert (defaults["temperature"].default, defaults["top_p"].default) == (0.6, 0.9)


def test_dialog_longer_than_the_context_is_one_error_before_compute(models, monkeypatch):
    cfg, params, tok = models["2"]
    monkeypatch.setattr("llama_jax.inference.generate.generate", lambda *a, **k: pytest.fail("computed"))
    long = [m(U, "hello world " * 600)]
    n = len(encode_dialog(tok, long))
    with pytest.raises(InputError) as e:
        chat(cfg, params, tok, [[m(U, "hi")], long], 8)
    msg = str(e.value)
    assert msg.startswith("dialogs[1]: ") and f"{n} tokens" in msg and f"max_seq_len {cfg.max_seq_len}" in msg
    assert len(msg.splitlines()) == 1
    with pytest.raises(InputError, match=r"dialogs\[0\]: messages\[0\]: unknown role"):
        chat(cfg, params, tok, [[m("bot", "hi")]], 8)
    with pytest.raises(ValueError, match="params"):
        ChatSession(dataclasses.replace(cfg, n_layers=3), params, tok)
    session = ChatSession(cfg, params, tok)
    with pytest.raises(InputError, match="no longer fits the model's context"):
        session.send("hello world " * 600)
    assert session.ids == [] and session.messages == []


def test_interrupted_answer_is_closed_and_the_session_goes_on(models):
    """Ctrl-C (SIGINT) while an answer streams ends it after the current chunk, closed with the
    end-of-turn id; the next turn still equals `generate` on the whole conversation."""
    cfg, params, tok = models["2"]
    session = ChatSession(cfg, params, tok, temperature=0, max_new_tokens=200, chunk=4)
    sent = []

    def interrupt_once(piece):
        if not sent:
            sent.append(piece)
            os.kill(os.getpid(), signal.SIGINT)

    reply = session.send(TURNS[0], stream=interrupt_once)
    assert reply.stopped == "interrupted" and reply.generated < 200
    assert reply.ids[-1] == tok.eos_id and session.ids[-1] == tok.eos_id
    ids = list(session.ids) + encode_next_turn(tok, [m(U, TURNS[1])])
    calls = []
    reply = session.send(TURNS[1], max_new_tokens=12, stop=lambda: calls.append(1) or len(calls) > 2)
    assert reply.stopped == "interrupted" and reply.generated == 8  # two chunks of 4, then stop()
    assert reply.ids[:8] == generate(cfg, params, [ids], 8, stop_ids=())[0]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_cache_grows_in_powers_of_two_and_programs_are_reused(models):
    from llama_jax.inference import session as session_module
    cfg, params, tok = models["2"]
    session = ChatSession(cfg, params, tok, temperature=0, max_new_tokens=150, min_cache=64)
    assert session.cache_len == 64
    session.send(TURNS[0])
    assert session.cache_len == 256 and 150 < session.filled <= 256
    compiled = session_module._decode._cache_size()
    session.reset()
    session.send(TURNS[1], max_new_tokens=20)
    assert session.cache_len == 256 and session_module._decode._cache_size() == compiled


def test_chat_cache_benchmark_smoke(tmp_path):
    """benchmarks/chat_cache.py's CPU run, small: a row per turn, the cached turn prefilling only the new ids."""
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OUT": str(tmp_path), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, "benchmarks/chat_cache.py", "--turns", "2", "--user-tokens", "8",
                           "--answer-tokens", "4", "--repeats", "1"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "chat_cache.json").read_text())
    assert [(r["turn"], r["history"], r["new"]) for r in res["turns"]] == [(1, 0, 8), (2, 13, 8)]
    assert all(r["cached_ms"] > 0 and r["recompute_ms"] > 0 and r["generate_ms"] > 0 for r in res["turns"])
    assert "speedup" in proc.stdout
