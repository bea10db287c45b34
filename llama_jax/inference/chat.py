"""Chat with instruct models: the dialog formats (llama_jax.data.chat_format, where the
training data's chat sources use them too), re-exported here as the chat API, and `chat()`,
which answers a batch of dialogs with `generate` (a conversation that keeps its KV cache
between turns: llama_jax.inference.session.ChatSession)."""
from __future__ import annotations

from typing import Mapping, Sequence

from llama_jax.data.chat_format import (ChatFamily, chat_family, encode_answer, encode_dialog, encode_next_turn,
                                        end_of_turn_ids, hf_chat_template)
from llama_jax.errors import input_error

__all__ = ["ChatFamily", "chat_family", "encode_answer", "encode_dialog", "encode_next_turn", "end_of_turn_ids",
           "hf_chat_template", "chat", "chat_stop_ids", "encode_dialogs", "CHAT_TEMPERATURE", "CHAT_TOP_P"]


# ---------------------------------------------------------------- answering dialogs

# Meta's sampling defaults for chat (meta-llama/llama example_chat_completion.py,
# meta-llama/llama3 example_chat_completion.py): temperature 0.6, top-p 0.9.
CHAT_TEMPERATURE, CHAT_TOP_P = 0.6, 0.9


def chat_stop_ids(config, tokenizer) -> tuple[int, ...]:
    """`end_of_turn_ids` that the model can produce (ids past a small model's vocabulary cannot)."""
    return tuple(i for i in end_of_turn_ids(tokenizer) if 0 <= i < config.vocab_size)


def encode_dialogs(config, tokenizer, dialogs) -> list[list[int]]:
    """`encode_dialog` of each dialog, checked to leave room for an answer in the context
    (one InputError naming the dialog, its length and the context, before any compute)."""
    if isinstance(dialogs, (str, Mapping)) or not isinstance(dialogs, Sequence) or not dialogs:
        raise input_error("dialogs", "a non-empty list of dialogs (each a list of messages)",
                          got=type(dialogs).__name__ if not isinstance(dialogs, Sequence) else len(dialogs))
    out = []
    for i, dialog in enumerate(dialogs):
        try:
            ids = encode_dialog(tokenizer, dialog)
        except ValueError as e:
            raise type(e)(f"dialogs[{i}]: {e}") from None
        if len(ids) >= config.max_seq_len:
            raise input_error(f"dialogs[{i}]", "the dialog leaves no room for an answer in the model's context",
                              f"< max_seq_len {config.max_seq_len} tokens", f"{len(ids)} tokens")
        out.append(ids)
    return out


class _AnswerStream:
    """Per-row text pieces of a batched generation, each row decoded after its dialog's ids,
    leading whitespace dropped and the end-of-turn id never shown (as `chat` returns it)."""

    def __init__(self, tokenizer, prompts, stops, on_text):
        from llama_jax.inference.detokenize import TextDecoder
        self.rows = [TextDecoder(tokenizer, p) for p in prompts]
        self.started = [False] * len(prompts)
        self.stops, self.on_text = set(stops), on_text

    def __call__(self, step, tokens):
        for r, t in enumerate(tokens):
            t = int(t)
            self._emit(r, self.rows[r].push(t) if t >= 0 and t not in self.stops else self.rows[r].flush())

    def _emit(self, r, text):
        if not self.started[r]:
            text = text.lstrip()
            self.started[r] = bool(text)
        if text:
            self.on_text(r, text)

    def finish(self):
        for r, row in enumerate(self.rows):
            self._emit(r, row.flush())


def chat(config, params, tokenizer, dialogs, max_new_tokens: int = 512, *, temperature: float = CHAT_TEMPERATURE,
         top_p: float = CHAT_TOP_P, top_k: int | None = None, seed: int = 0, stream=None, mesh=None,
         run=None) -> list[dict]:
    """Answer each dialog (a list of {"role", "content"} messages ending with the user's):
    returns one {"role": "assistant", "content": text} per dialog, in one batched `generate`.

    Sampling defaults are Meta's for chat (temperature 0.6, top-p 0.9; 0 is greedy). An answer
    ends at the family's end-of-turn ids (`end_of_turn_ids`: LLaMA 2 eos; LLaMA 3 <|eot_id|>,
    <|eom_id|>, <|end_of_text|>), which its text leaves out, or after max_new_tokens (clipped,
    as Meta does, to what the context leaves after the longest dialog). `stream(row, piece)`
    receives each answer's text as it is produced. A dialog that fills the context raises one
    InputError naming it, before any compute.
    """
    from llama_jax.inference.detokenize import decode_continuation
    from llama_jax.inference.generate import generate
    if tokenizer.vocab_size > config.vocab_size:
        raise input_error("tokenizer", "more tokens than the model's vocabulary: wrong tokenizer for this checkpoint?",
                          f"<= {config.vocab_size}", tokenizer.vocab_size)
    prompts = encode_dialogs(config, tokenizer, dialogs)
    max_new = min(max_new_tokens, config.max_seq_len - max(len(p) for p in prompts))
    stops = chat_stop_ids(config, tokenizer)
    on_step = None if stream is None else _AnswerStream(tokenizer, prompts, stops, stream)
    out = generate(config, params, prompts, max_new, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                   stop_ids=stops, stream=on_step, mesh=mesh, run=run)
    if on_step is not None:
        on_step.finish()
    answers = []
    for p, ids in zip(prompts, out):
        ids = ids[:-1] if ids and ids[-1] in stops else ids
        answers.append({"role": "assistant", "content": decode_continuation(tokenizer, p, ids).lstrip()})
    return answers
