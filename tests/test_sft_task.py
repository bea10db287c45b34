"""Supervised fine-tuning learns from the assistant tokens only.

A synthetic chat task (made here): the user names one of six words among random digits, the
assistant answers the word's fixed partner. Only the answer tokens can teach the mapping:
trained on the chat loss mask, the model answers held-out prompts; trained on the inverted
mask (the prompt tokens only), it does not. Full SFT through train/state's step, CPU.
"""
import jax
import numpy as np
import optax

from llama_jax import Llama, ModelConfig, sharding as S
from llama_jax.data import load_tokenizer
from llama_jax.data.sft import chat_pieces
from llama_jax.train import state as TS
from train_helpers import tokenizer_path  # noqa: F401  (fixture)

PAIRS = {"apple": "river", "house": "green", "table": "seven", "music": "stone", "water": "paper", "light": "north"}
T = 48


def _dialog(rng):
    word = rng.choice(list(PAIRS))
    digits = " ".join(str(d) for d in rng.integers(0, 10, 3))
    return [{"role": "user", "content": f"{digits} {word} {digits[::-1]}"},
            {"role": "assistant", "content": PAIRS[word]}]


def _batch(tokenizer, rng, n, invert=False):
    rows = {k: np.zeros((n, T), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    mask = np.zeros((n, T), np.float32)
    answer = np.zeros((n, T), np.float32)
    for r in range(n):
        pieces = chat_pieces(tokenizer, _dialog(rng))
        ids = np.asarray([i for p, _ in pieces for i in p])
        w = np.asarray([m for p, m in pieces for _ in p], np.float32)
        assert len(ids) <= T + 1
        k = len(ids) - 1
        rows["tokens"][r, :k], rows["targets"][r, :k] = ids[:-1], ids[1:]
        rows["positions"][r, :k], rows["segment_ids"][r, :k] = np.arange(k), 1
        answer[r, :k] = w[1:]  # the loss of target t sits at position t - 1
        mask[r, :k] = 1 - w[1:] if invert else w[1:]
    return {**rows, "loss_mask": mask}, answer


def _train(tokenizer, invert, steps=80):
    cfg = ModelConfig.preset("tiny").replace(vocab_size=tokenizer.vocab_size)
    mesh = S.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model, tx = Llama(cfg), optax.adam(3e-3)
    shardings = TS.state_shardings(TS.abstract_state(model, tx), mesh)
    state = TS.init_state(model, tx, mesh, jax.random.PRNGKey(0))
    step = TS.make_train_step(model, tx, optax.constant_schedule(3e-3), mesh, shardings)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        state, _ = step(state, _batch(tokenizer, rng, 16, invert)[0])
    held_out, answer = _batch(tokenizer, np.random.default_rng(123), 64)
    logits = jax.jit(model.apply)({"params": state.params}, held_out["tokens"], held_out["positions"],
                                  held_out["segment_ids"])
    right = (np.argmax(np.asarray(logits), -1) == held_out["targets"]) | (answer == 0)
    return float(np.mean(np.all(right, axis=1)))  # whole answers right (word and end of turn)


def test_sft_learns_the_answers_and_the_inverted_mask_does_not(tokenizer_path):
    tokenizer = load_tokenizer(tokenizer_path)
    learned = _train(tokenizer, invert=False)
    inverted = _train(tokenizer, invert=True)
    assert learned > 0.9 and inverted < 0.2, (learned, inverted)
