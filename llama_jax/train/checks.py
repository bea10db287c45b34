"""Checks of a training config made before anything is created or trained.

Each failure is an `InputError` naming the key: `config.<key>: <what> (expected ..., got ...)`.
Settings that only fail late (a sample after training) or that destroy data
(`keep_checkpoints=0` would let the checkpoint manager delete every step) are caught here.
"""
from __future__ import annotations

import math

import ml_collections
import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.errors import input_error

_F32_MAX = float(np.finfo(np.float32).max)


def check_config(cfg: ml_collections.ConfigDict, model: ModelConfig) -> None:
    """Raises InputError for a setting that cannot give a sound run of `model`."""
    if cfg.keep_checkpoints < 1:
        raise input_error("config.keep_checkpoints", "must keep at least one checkpoint", ">= 1",
                          cfg.keep_checkpoints)
    for key, v in cfg.optimizer.items():
        if isinstance(v, float) and not (math.isfinite(v) and abs(v) <= _F32_MAX):
            raise input_error(f"config.optimizer.{key}", "must be a finite float32 number",
                              f"|x| <= {_F32_MAX:.3g}", v)
    check_seq_len(cfg, model)
    if cfg.sample.max_new_tokens < 0 or cfg.sample.max_new_tokens >= model.max_seq_len:
        raise input_error("config.sample.max_new_tokens", "leaves no room for the prompt in the model's context",
                          f"0 <= value < max_seq_len={model.max_seq_len}", cfg.sample.max_new_tokens)


def check_schedule(cfg: ml_collections.ConfigDict, opt_cfg) -> None:
    """The learning-rate schedule must have steps after its warmup."""
    steps = opt_cfg.total_steps or cfg.steps
    if steps <= opt_cfg.warmup_steps:
        raise input_error("config.optimizer.warmup_steps",
                          f"{opt_cfg.warmup_steps} warmup steps leave nothing of a {steps}-step schedule",
                          "warmup_steps < optimizer.total_steps (or steps)", opt_cfg.warmup_steps)


def check_seq_len(cfg: ml_collections.ConfigDict, model: ModelConfig) -> None:
    if not 0 < cfg.seq_len <= model.max_seq_len:
        raise input_error("config.seq_len", "exceeds the model's context",
                          f"1 <= seq_len <= model.max_seq_len={model.max_seq_len}", cfg.seq_len)


def check_sample_prompt(cfg: ml_collections.ConfigDict, model: ModelConfig, tokenizer) -> None:
    """The end-of-run sample must fit the context: checked before training, not after."""
    n = cfg.sample.max_new_tokens
    if n <= 0:
        return
    prompt = len(tokenizer.encode(cfg.sample.prompt, bos=True, eos=False))
    if prompt + n > model.max_seq_len:
        raise input_error("config.sample.max_new_tokens", "with the prompt exceeds the model's context",
                          f"<= max_seq_len - prompt tokens = {model.max_seq_len - prompt}", n)
