"""Meta's chat prompt building, transcribed from Meta's published code (facts, not our code).

- Llama 2: meta-llama/llama, commit 689c7f261b9c5514636ecc3c5fefefcbb3e6eed7,
  llama/generation.py, `Llama.chat_completion` (the token-building part, lines 318-362):
  `llama2_chat_prompt_tokens`. The `unsafe_requests` check there only replaces the answer
  with an error text after generation; it does not change the prompt, so it is left out.
- Llama 3: meta-llama/llama3, commit a0940f9cf7065d45bb6675660f80d305c041a754,
  llama/tokenizer.py, `ChatFormat.encode_header` / `encode_message` / `encode_dialog_prompt`.
  meta-llama/llama-models (commit a9c89c47, models/llama3/chat_format.py, Llama 3.1 on) writes
  role "tool" as "ipython" (`role_str`), and does not strip content (a difference from the
  llama3 repo; Meta's llama3 code and every published HF template strip, so we do too).

`tokenizer` is anything with Meta's `encode(s, bos=..., eos=...)` and, for Llama 3, Meta's
`special_tokens` dict: our Tokenizer / Llama3Tokenizer have both.
"""
from typing import List

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def llama2_chat_prompt_tokens(tokenizer, dialog) -> List[int]:
    if dialog[0]["role"] == "system":
        dialog = [
            {
                "role": dialog[1]["role"],
                "content": B_SYS
                + dialog[0]["content"]
                + E_SYS
                + dialog[1]["content"],
            }
        ] + dialog[2:]
    assert all([msg["role"] == "user" for msg in dialog[::2]]) and all(
        [msg["role"] == "assistant" for msg in dialog[1::2]]
    ), (
        "model only supports 'system', 'user' and 'assistant' roles, "
        "starting with 'system', then 'user' and alternating (u/a/u/a/u...)"
    )
    dialog_tokens: List[int] = sum(
        [
            tokenizer.encode(
                f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ",
                bos=True,
                eos=True,
            )
            for prompt, answer in zip(
                dialog[::2],
                dialog[1::2],
            )
        ],
        [],
    )
    assert (
        dialog[-1]["role"] == "user"
    ), f"Last message must be from user, got {dialog[-1]['role']}"
    dialog_tokens += tokenizer.encode(
        f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}",
        bos=True,
        eos=False,
    )
    return dialog_tokens


class ChatFormat:
    """Llama 3's, with llama-models' "tool" -> "ipython" header name."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode_header(self, message) -> List[int]:
        tokens = []
        tokens.append(self.tokenizer.special_tokens["<|start_header_id|>"])
        role = "ipython" if message["role"] == "tool" else message["role"]  # llama-models' role_str
        tokens.extend(self.tokenizer.encode(role, bos=False, eos=False))
        tokens.append(self.tokenizer.special_tokens["<|end_header_id|>"])
        tokens.extend(self.tokenizer.encode("\n\n", bos=False, eos=False))
        return tokens

    def encode_message(self, message) -> List[int]:
        tokens = self.encode_header(message)
        tokens.extend(
            self.tokenizer.encode(message["content"].strip(), bos=False, eos=False)
        )
        tokens.append(self.tokenizer.special_tokens["<|eot_id|>"])
        return tokens

    def encode_dialog_prompt(self, dialog) -> List[int]:
        tokens = []
        tokens.append(self.tokenizer.special_tokens["<|begin_of_text|>"])
        for message in dialog:
            tokens.extend(self.encode_message(message))
        # Add the start of an assistant message for the model to complete.
        tokens.extend(self.encode_header({"role": "assistant", "content": ""}))
        return tokens
