"""Chat formats of LLaMA's instruct models: a dialog (a list of `{"role", "content"}`
messages) as the token ids the model was fine-tuned on, ending where the assistant speaks.

The format is the tokenizer's family, told by its type (never by strings):
- LLaMA 2 (SentencePiece `Tokenizer`), as Meta's `Llama.chat_completion` (meta-llama/llama,
  llama/generation.py): a system message is folded into the first user message as
  `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}`; each finished exchange is
  `bos + encode("[INST] {user.strip()} [/INST] {answer.strip()} ") + eos`, the last user
  message `bos + encode("[INST] {user.strip()} [/INST]")`. Roles: user/assistant alternate,
  starting and ending with the user.
- LLaMA 3.x (tiktoken `Llama3Tokenizer`), as Meta's `ChatFormat.encode_dialog_prompt`
  (meta-llama/llama3, llama/tokenizer.py): `<|begin_of_text|>`, then per message
  `<|start_header_id|>{role}<|end_header_id|>` + encode("\\n\\n") + encode(content.strip()) +
  `<|eot_id|>`, then an open assistant header. Roles: system, user, assistant, and ipython
  (tool results, Llama 3.1 on; "tool" is written as "ipython", as in meta-llama/llama-models).
See docs/chat_formats.md for both layouts and where transformers' templates differ.

A conversation grows by appending ids: `encode_dialog(msgs + [answer] + more) ==
encode_dialog(msgs) + encode_answer(tok, answer) + encode_next_turn(tok, more)`, so a chat
with a KV cache never re-encodes earlier turns (for LLaMA 2 this holds when SentencePiece
pieces never span a space, as in LLaMA's tokenizer; a generated answer is kept as generated).
"""
from __future__ import annotations

import enum
from typing import Mapping, Sequence

from llama_jax.data.tiktoken_tokenizer import Llama3Tokenizer
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import input_error

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
ROLES = ("system", "user", "assistant", "ipython", "tool")


class ChatFamily(enum.Enum):
    LLAMA2 = "2"  # [INST] ... [/INST], SentencePiece
    LLAMA3 = "3"  # header ids and <|eot_id|>, tiktoken


def chat_family(tokenizer) -> ChatFamily:
    """The chat format of `tokenizer`'s family, from its type."""
    if isinstance(tokenizer, Llama3Tokenizer):
        return ChatFamily.LLAMA3
    if isinstance(tokenizer, Tokenizer):
        return ChatFamily.LLAMA2
    raise input_error("tokenizer", "no LLaMA chat format for this tokenizer",
                      "a llama_jax.data Tokenizer or Llama3Tokenizer", type(tokenizer).__name__)


def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
    """Ids that end an assistant turn: LLaMA 2 eos; LLaMA 3 <|eot_id|>, <|eom_id|> (a tool
    call awaits its result, 3.1 on), <|end_of_text|>."""
    if chat_family(tokenizer) is ChatFamily.LLAMA3:
        return (tokenizer.eot_id, tokenizer.eom_id, tokenizer.eos_id)
    return (tokenizer.eos_id,)


# Which role may follow which, per family (None: the dialog's start, after any system message).
_NEXT = {
    ChatFamily.LLAMA2: {None: ("user",), "user": ("assistant",), "assistant": ("user",)},
    ChatFamily.LLAMA3: {None: ("user",), "user": ("assistant",), "assistant": ("user", "ipython"),
                        "ipython": ("assistant",)},
}
_RULE = {ChatFamily.LLAMA2: "after an optional system message, roles alternate user/assistant starting with user",
         ChatFamily.LLAMA3: "after an optional system message, roles alternate user/assistant starting with user "
                            "(an assistant tool call may be answered by ipython, then the assistant)"}


def _checked(family: ChatFamily, messages, prev: str | None) -> list[tuple[str, str]]:
    """(role, content) of each message, "tool" as "ipython"; one InputError naming the first
    message that breaks a rule. `prev`: the role before messages[0] (None: dialog start)."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise input_error("messages", "a dialog is a list of {'role', 'content'} dicts", got=type(messages).__name__)
    if not messages:
        raise input_error("messages", "a dialog needs at least one message", "a user message", "[]")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping) or not {"role", "content"} <= set(m):
            raise input_error(where, "a message is a dict with 'role' and 'content'", got=repr(m)[:80])
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise input_error(where, "unknown role", " | ".join(ROLES), role)
        if not isinstance(content, str):
            raise input_error(where, "content must be a string", got=type(content).__name__)
        role = "ipython" if role == "tool" else role
        if family is ChatFamily.LLAMA2 and role == "ipython":
            raise input_error(where, "LLaMA 2 chat has no tool role", "system | user | assistant", m["role"])
        if role == "system":
            if i != 0 or prev is not None:
                raise input_error(where, "a system message may only come first in a dialog", got=f"system at index {i}")
        else:
            allowed = _NEXT[family][prev]
            if role not in allowed:
                raise input_error(where, _RULE[family], " or ".join(allowed), m["role"])
            prev = role
        out.append((role, content))
    if prev not in ("user", "ipython"):
        last = "only a system message" if prev is None else f"{prev!r} last"
        raise input_error(f"messages[{len(messages) - 1}]",
                          "the dialog must end with a user message (the assistant answers next)",
                          "user" if family is ChatFamily.LLAMA2 else "user or ipython", last)
    return out


def _llama3_message(tok: Llama3Tokenizer, role: str, content: str) -> list[int]:
    return (_llama3_header(tok, role) + tok.encode(content.strip(), bos=False)
            + [tok.special_tokens["<|eot_id|>"]])


def _llama3_header(tok: Llama3Tokenizer, role: str) -> list[int]:
    return ([tok.special_tokens["<|start_header_id|>"]] + tok.encode(role, bos=False)
            + [tok.special_tokens["<|end_header_id|>"]] + tok.encode("\n\n", bos=False))


def _llama2_user(tok: Tokenizer, content: str) -> list[int]:
    return tok.encode(f"{B_INST} {content.strip()} {E_INST}", bos=True)


def _encode(tok, family: ChatFamily, turns: list[tuple[str, str]]) -> list[int]:
    """Ids of `turns` (already checked), ending with an open assistant turn."""
    if family is ChatFamily.LLAMA3:
        ids = [i for role, content in turns for i in _llama3_message(tok, role, content)]
        return ids + _llama3_header(tok, "assistant")
    ids = []
    for role, content in turns:
        # Meta encodes each exchange "[INST] u [/INST] a " in one call; the user part and the
        # answer part give the same pieces apart (a piece never spans the space between them).
        ids += _llama2_user(tok, content) if role == "user" else encode_answer(tok, content)
    return ids


def encode_dialog(tokenizer, messages) -> list[int]:
    """Token ids of `messages` in the chat format of `tokenizer`'s family (Meta's), ending with
    the assistant's open turn. Bad dialogs raise one InputError naming the message and rule."""
    family = chat_family(tokenizer)
    turns = _checked(family, messages, None)
    if family is ChatFamily.LLAMA2 and turns[0][0] == "system":  # folded into the first user message, as Meta does
        turns = [("user", B_SYS + turns[0][1] + E_SYS + turns[1][1])] + turns[2:]
    ids = [tokenizer.bos_id] if family is ChatFamily.LLAMA3 else []
    return ids + _encode(tokenizer, family, turns)


def check_training_dialog(tokenizer, messages) -> None:
    """Check a dialog that ends with the assistant's answer (a training example) by the rules
    of `tokenizer`'s family; one InputError naming the first bad message by its index."""
    family = chat_family(tokenizer)
    # An answer may always be followed by a user turn: checking the dialog plus one puts every
    # error at the message of `messages` that breaks a rule.
    _checked(family, list(messages) + [{"role": "user", "content": ""}], None)


def encode_answer(tokenizer, content: str) -> list[int]:
    """Ids of a finished assistant answer as a dialog holds it: LLaMA 2 `encode("{content.strip()} ")`
    + eos (the space before it belongs to `[/INST]`'s side); LLaMA 3 content.strip() + <|eot_id|>
    (the header is already open). Append it when a generation stopped without an end of turn."""
    if not isinstance(content, str):
        raise input_error("answer", "content must be a string", got=type(content).__name__)
    if chat_family(tokenizer) is ChatFamily.LLAMA3:
        return tokenizer.encode(content.strip(), bos=False) + [tokenizer.eot_id]
    return tokenizer.encode(f"{content.strip()} ", bos=False, eos=True)


def encode_next_turn(tokenizer, messages) -> list[int]:
    """Ids to append after an assistant's answer (ended with its end-of-turn id) for the
    messages that follow it (a user message; LLaMA 3 also ipython results), ending with the
    assistant's open turn again."""
    family = chat_family(tokenizer)
    return _encode(tokenizer, family, _checked(family, messages, "assistant"))


# The chat_template our Hugging Face exports carry (interop/hf_tokenizer.py): transformers'
# `apply_chat_template(dialog, add_generation_prompt=True)` then gives `encode_dialog`'s ids.
# LLaMA 2: meta-llama/Llama-2-7b-chat-hf's, verbatim. LLaMA 3: Meta-Llama-3-8B-Instruct's with
# one change, "tool" written as "ipython" (as Meta's llama-models does); not 3.1's, which adds
# a dated system message that Meta's encode_dialog_prompt does not (docs/chat_formats.md).
# Neither template checks what encode_dialog checks (e.g. the last message is the user's).
HF_CHAT_TEMPLATES = {
    ChatFamily.LLAMA2: (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"),
    ChatFamily.LLAMA3: (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
        "{% set content = '<|start_header_id|>' + role + '<|end_header_id|>\n\n'+ message['content'] | trim"
        " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
}


def hf_chat_template(tokenizer) -> str:
    """The Jinja chat_template of `tokenizer`'s family for a Hugging Face tokenizer_config.json."""
    return HF_CHAT_TEMPLATES[chat_family(tokenizer)]
