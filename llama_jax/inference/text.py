"""Text in, text out: a tokenizer around `generate`.

The tokenizer is duck-typed (`encode(text, bos=True)`, `decode(ids)`, `eos_id`,
`vocab_size`), e.g. `llama_jax.data.Tokenizer`; nothing here imports sentencepiece.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.inference.generate import default_stop_ids, generate
from llama_jax.inference.detokenize import TextDecoder, decode_continuation


class _TextStream:
    """Turns per-step token ids into per-row text pieces, each row decoded after its prompt
    (text_decode: leading spaces and characters split over tokens come out right)."""

    def __init__(self, tokenizer, prompts: list[list[int]], on_text: Callable[[int, str], None]):
        self.on_text = on_text
        self.rows = [TextDecoder(tokenizer, p) for p in prompts]

    def __call__(self, step: int, tokens: np.ndarray):
        for r, t in enumerate(tokens):
            text = self.rows[r].push(int(t)) if t >= 0 else self.rows[r].flush()
            if text:
                self.on_text(r, text)

    def finish(self):
        for r, row in enumerate(self.rows):
            text = row.flush()
            if text:
                self.on_text(r, text)


def generate_text(config: ModelConfig, params, tokenizer, prompts: str | Sequence[str], max_new_tokens: int = 64,
                  *, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, top_k: int | None = None,
                  stream: Callable[[int, str], None] | None = None, mesh=None) -> list[str]:
    """Continue each text prompt; returns the new text per prompt (without the prompt; the
    new ids decoded after the prompt's, so `prompt + text` reads right).

    Prompts are encoded with bos, generation stops at the tokenizer's eos or at a stop id of
    the model's generation that the tokenizer has (`default_stop_ids`), and
    `stream(row, text_piece)` receives text as it is produced.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{config.vocab_size}: wrong tokenizer for this checkpoint?")
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    # The tokenizer's eos, and the generation's stop ids it has (Llama 3.1: eot, eom too).
    stops = sorted({i for i in default_stop_ids(config) if i < tokenizer.vocab_size} |
                   ({tokenizer.eos_id} if tokenizer.eos_id >= 0 else set()))
    on_step = None if stream is None else _TextStream(tokenizer, ids, stream)
    out = generate(config, params, ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                   top_k=top_k, stop_ids=stops, stream=on_step, mesh=mesh)
    if on_step is not None:
        on_step.finish()
    return [decode_continuation(tokenizer, p, row) for p, row in zip(ids, out)]

