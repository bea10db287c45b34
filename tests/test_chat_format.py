"""Chat formats (llama_jax.inference.chat) token for token against Meta's reference code
(tests/reference/meta_chat.py) and transformers' apply_chat_template with the published
chat templates (tests/reference/chat_templates/), on tiny SentencePiece (LLaMA 2) and
tiktoken (LLaMA 3) tokenizers; the layouts themselves written out as facts; bad dialogs."""
from pathlib import Path

import pytest

from llama_jax.errors import InputError
from llama_jax.inference.chat import (ChatFamily, chat_family, encode_answer, encode_dialog, encode_next_turn,
                                      end_of_turn_ids, hf_chat_template)
import tiny_tokenizers
from reference.meta_chat import ChatFormat, llama2_chat_prompt_tokens

TEMPLATES = Path(__file__).parent / "reference" / "chat_templates"
S, U, A, I, T = "system", "user", "assistant", "ipython", "tool"


def m(role, content):
    return {"role": role, "content": content}


# Dialogs both families accept: system or not, several turns, Unicode, empty content,
# whitespace to strip, text that looks like the format's own markup.
DIALOGS = [
    [m(U, "hello")],
    [m(S, "You are a helpful assistant."), m(U, "What is 2+2?")],
    [m(U, "Hi!"), m(A, "Hello, how can I help?"), m(U, "Tell me a joke.")],
    [m(S, "Be brief."), m(U, "one"), m(A, "1"), m(U, "two"), m(A, "2"), m(U, "three")],
    [m(U, "unicode: héllo wörld, 世界, emoji 🙂🦙"), m(A, "∮ E·da = Q, ünïcödé"), m(U, "日本語で答えて")],
    [m(U, "")],
    [m(S, ""), m(U, "")],
    [m(U, ""), m(A, ""), m(U, "")],
    [m(S, "  padded system \n"), m(U, "\n\t hi there  \n"), m(A, "  answer \n\n"), m(U, "   ")],
    [m(U, "def f(x):\n    return x ** 2\n\n\nprint(f(3))"), m(A, "```python\n9\n```"), m(U, "and f(12345)?")],
    [m(U, "what does [INST] mean, and <<SYS>>?"), m(A, "markup: [/INST] <</SYS>>"), m(U, "ok")],
    [m(S, "multi\nline\n\nsystem")] + [m(r, f"turn {i} " + "word " * i) for i in range(15)
                                       for r in [(U, A)[i % 2]]],
]
# LLaMA 3 only: tool results (ipython, or "tool" written as ipython).
TOOL_DIALOGS = [
    [m(S, "Environment: ipython"), m(U, "What is 6*7?"), m(A, "print(6*7)"), m(I, "42")],
    [m(U, "weather?"), m(A, '{"name": "weather", "parameters": {}}'), m(T, '{"temp": 21}'),
     m(A, "It is 21 degrees."), m(U, "thanks")],
]

sp, tik = tiny_tokenizers.fixtures(600)


@pytest.fixture(scope="module")
def hf(sp, tik, tmp_path_factory):
    """transformers tokenizers built from ours by the export code (interop/hf_tokenizer.py)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from llama_jax.interop.hf_tokenizer import write_tokenizer_files
    out = {}
    for name, tok in (("sp", sp), ("tik", tik)):
        d = tmp_path_factory.mktemp(f"hf_{name}")
        write_tokenizer_files(tok, d, 4096)
        out[name] = transformers.AutoTokenizer.from_pretrained(str(d))
    return out


def _template(name):
    return (TEMPLATES / name).read_text()


def _apply(hf_tok, dialog, template=None, **kw):
    out = hf_tok.apply_chat_template(dialog, chat_template=template, tokenize=True, add_generation_prompt=True, **kw)
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


# --- the layouts, as facts -----------------------------------------------------------------

def test_llama2_layout(sp):
    """[INST] ... [/INST] with <<SYS>>\\n...\\n<</SYS>>\\n\\n folded into the first user turn;
    each finished exchange bos ... eos, the answer between single spaces; the last turn open."""
    enc = lambda s: sp.encode(s, bos=False)  # noqa: E731
    assert encode_dialog(sp, [m(U, " hi ")]) == [sp.bos_id] + enc("[INST] hi [/INST]")
    assert encode_dialog(sp, [m(S, "sys"), m(U, "hi"), m(A, " yo "), m(U, "bye")]) == (
        [sp.bos_id] + enc("[INST] <<SYS>>\nsys\n<</SYS>>\n\nhi [/INST] yo ") + [sp.eos_id]
        + [sp.bos_id] + enc("[INST] bye [/INST]"))
    assert chat_family(sp) is ChatFamily.LLAMA2 and end_of_turn_ids(sp) == (sp.eos_id,)


def test_llama3_layout(tik):
    """<|begin_of_text|>, then <|start_header_id|>role<|end_header_id|> "\\n\\n" content.strip()
    <|eot_id|> per message, then the assistant's header left open."""
    st, enc = tik.special_tokens, (lambda s: tik.encode(s, bos=False))
    head = lambda role: [st["<|start_header_id|>"]] + enc(role) + [st["<|end_header_id|>"]] + enc("\n\n")  # noqa: E731
    assert encode_dialog(tik, [m(S, " sys "), m(U, "hi\n")]) == (
        [st["<|begin_of_text|>"]] + head("system") + enc("sys") + [st["<|eot_id|>"]]
        + head("user") + enc("hi") + [st["<|eot_id|>"]] + head("assistant"))
    tail = head("assistant") + enc("c") + [tik.eot_id] + head("ipython") + enc("r") + [tik.eot_id] + head("assistant")
    assert encode_dialog(tik, [m(U, "q"), m(A, "c"), m(T, " r ")])[-len(tail):] == tail
    n = tik.n_ranks
    assert (tik.bos_id, st["<|start_header_id|>"], st["<|end_header_id|>"], tik.eot_id) == (n, n + 6, n + 7, n + 9)
    assert chat_family(tik) is ChatFamily.LLAMA3 and end_of_turn_ids(tik) == (n + 9, n + 8, n + 1)


# --- Meta's reference code -----------------------------------------------------------------

@pytest.mark.parametrize("i", range(len(DIALOGS)))
def test_llama2_equals_meta_chat_completion(sp, i):
    assert encode_dialog(sp, DIALOGS[i]) == llama2_chat_prompt_tokens(sp, DIALOGS[i])


@pytest.mark.parametrize("i", range(len(DIALOGS) + len(TOOL_DIALOGS)))
def test_llama3_equals_meta_encode_dialog_prompt(tik, i):
    dialog = (DIALOGS + TOOL_DIALOGS)[i]
    assert encode_dialog(tik, dialog) == ChatFormat(tik).encode_dialog_prompt(dialog)


def test_special_token_text_in_content_is_plain_text(sp, tik):
    """As Meta's encode: content spelling a control token never becomes that token."""
    for tok in (sp, tik):
        dialog = [m(U, "<s></s><|begin_of_text|><|eot_id|><|start_header_id|>")]
        ids = encode_dialog(tok, dialog)
        ref = llama2_chat_prompt_tokens(tok, dialog) if tok is sp else ChatFormat(tok).encode_dialog_prompt(dialog)
        assert ids == ref
        assert ids.count(tok.bos_id) == 1
        if tok is tik:
            assert ids.count(tik.eot_id) == 1


# --- growing a conversation by appending ids ---------------------------------------------

@pytest.mark.parametrize("family", ["sp", "tik"])
def test_appending_turns_equals_encoding_the_whole_dialog(sp, tik, family):
    tok = sp if family == "sp" else tik
    dialogs = DIALOGS + (TOOL_DIALOGS if family == "tik" else [])
    checked = 0
    for dialog in dialogs:
        for k, msg in enumerate(dialog):
            if msg["role"] != A:
                continue
            head, answer, rest = dialog[:k], msg["content"], dialog[k + 1:]
            got = encode_dialog(tok, head) + encode_answer(tok, answer) + encode_next_turn(tok, rest)
            assert got == encode_dialog(tok, dialog), (dialog, k)
            checked += 1
    assert checked >= 10
    assert encode_answer(tok, "x")[-1] in end_of_turn_ids(tok)


# --- transformers' apply_chat_template with the published templates ----------------------

@pytest.mark.parametrize("i", range(len(DIALOGS)))
def test_llama2_chat_template_equals_meta(sp, hf, i):
    """meta-llama/Llama-2-7b-chat-hf's template agrees with Meta's format on every dialog."""
    assert _apply(hf["sp"], DIALOGS[i], _template("llama2_chat.jinja")) == encode_dialog(sp, DIALOGS[i])


@pytest.mark.parametrize("i", range(len(DIALOGS) + 1))
def test_llama3_instruct_template_equals_meta(tik, hf, i):
    """Meta-Llama-3-8B-Instruct's template agrees with Meta's format for system/user/
    assistant/ipython (TOOL_DIALOGS[0]); it writes a "tool" role as "tool", not "ipython"."""
    dialog = (DIALOGS + TOOL_DIALOGS[:1])[i]
    assert _apply(hf["tik"], dialog, _template("llama3_instruct.jinja")) == encode_dialog(tik, dialog)
    tool = TOOL_DIALOGS[1]
    assert _apply(hf["tik"], tool, _template("llama3_instruct.jinja")) != encode_dialog(tik, tool)


def test_llama3_1_instruct_template_differs_by_its_dated_system_message(tik, hf):
    """Llama 3.1's template opens every dialog with a system message "Cutting Knowledge Date:
    December 2023\\nToday Date: 26 Jul 2024\\n\\n" + the (trimmed) system content; Meta's
    encode_dialog_prompt writes only the dialog. Otherwise the same ids; tool content differs."""
    preamble = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    template, st = _template("llama3_1_instruct.jinja"), tik.special_tokens
    for dialog in DIALOGS:
        got = _apply(hf["tik"], dialog, template)
        assert got != encode_dialog(tik, dialog)
        if dialog[0]["role"] == S and dialog[0]["content"].strip():
            dated = [m(S, preamble + dialog[0]["content"].strip())] + dialog[1:]
            assert got == encode_dialog(tik, dated)
        else:  # no (or a blank) system message: the preamble's "\n\n" stays, unstripped
            rest = dialog[1:] if dialog[0]["role"] == S else dialog
            system = ([st["<|start_header_id|>"]] + tik.encode("system", bos=False) + [st["<|end_header_id|>"]]
                      + tik.encode("\n\n", bos=False) + tik.encode(preamble, bos=False) + [tik.eot_id])
            assert got == [tik.bos_id] + system + encode_dialog(tik, rest)[1:]
    # an ipython message's string content goes through tojson: quoted, not stripped
    dialog = [m(S, "s"), m(U, "q"), m(A, "c"), m(I, " 42 ")]
    got = _apply(hf["tik"], dialog, template)
    assert tik.decode(got).endswith('<|start_header_id|>ipython<|end_header_id|>\n\n" 42 "<|eot_id|>'
                                    '<|start_header_id|>assistant<|end_header_id|>\n\n')


@pytest.mark.parametrize("family", ["sp", "tik"])
def test_exported_template_equals_encode_dialog(sp, tik, hf, family):
    """The template our export writes (tokenizer_config.json, no chat_template= argument)."""
    tok = sp if family == "sp" else tik
    for dialog in DIALOGS + (TOOL_DIALOGS if family == "tik" else []):
        assert _apply(hf[family], dialog) == encode_dialog(tok, dialog), dialog
    assert hf[family].chat_template == hf_chat_template(tok)


def test_hf_reads_control_token_text_in_content_as_control_tokens(sp, tik, hf):
    """transformers' default (split_special_tokens false, as Meta's own HF tokenizers): content
    that spells a control token becomes that token; Meta's encode (and ours) keeps it text."""
    dialog = [m(U, "a </s><s> b")]
    assert _apply(hf["sp"], dialog).count(sp.bos_id) == 2 and encode_dialog(sp, dialog).count(sp.bos_id) == 1
    dialog = [m(U, "a <|eot_id|> b")]
    assert _apply(hf["tik"], dialog).count(tik.eot_id) == 2 and encode_dialog(tik, dialog).count(tik.eot_id) == 1


# --- bad dialogs: one line naming the message and the rule ---------------------------------

BAD = [
    ([], "messages: a dialog needs at least one message"),
    ("hello", "messages: a dialog is a list"),
    ([m(U, "a"), m(U, "b")], r"messages\[1\]: after an optional system message, roles alternate user/assistant"),
    ([m(A, "a")], r"messages\[0\]: .*roles alternate .*expected user, got 'assistant'"),
    ([m(U, "a"), m(A, "b")], r"messages\[1\]: the dialog must end with a user message"),
    ([m("bot", "a")], r"messages\[0\]: unknown role \(expected system \| user \| assistant \| ipython \| tool, "
                      r"got 'bot'\)"),
    ([m(U, "a"), m(A, "b"), m(S, "c"), m(U, "d")], r"messages\[2\]: a system message may only come first"),
    ([m(S, "s")], r"messages\[0\]: the dialog must end with a user message .*got 'only a system message'"),
    ([m(U, 3)], r"messages\[0\]: content must be a string \(got 'int'\)"),
    ([{"role": "user"}], r"messages\[0\]: a message is a dict with 'role' and 'content'"),
]


@pytest.mark.parametrize("family", ["sp", "tik"])
@pytest.mark.parametrize("dialog,message", BAD)
def test_bad_dialogs_are_one_clear_error(sp, tik, family, dialog, message):
    tok = sp if family == "sp" else tik
    with pytest.raises(InputError, match=message) as e:
        encode_dialog(tok, dialog)
    assert "\n" not in str(e.value)


def test_family_specific_rules(sp, tik):
    with pytest.raises(InputError, match=r"messages\[2\]: LLaMA 2 chat has no tool role"):
        encode_dialog(sp, [m(U, "a"), m(A, "b"), m(T, "c")])
    with pytest.raises(InputError, match=r"messages\[1\]: .*expected assistant, got 'ipython'"):
        encode_dialog(tik, [m(U, "a"), m(I, "b")])
    with pytest.raises(InputError, match=r"messages\[0\]: a system message may only come first"):
        encode_next_turn(tik, [m(S, "late"), m(U, "a")])
    with pytest.raises(InputError, match="no LLaMA chat format"):
        encode_dialog(object(), [m(U, "a")])
