"""Tiny: the tests' run. CPU, seconds, the embedded default corpus (Python's stdlib).

    python train.py --config configs/tiny.py --workdir runs/tiny

Trains a 512-piece tokenizer on the stdlib corpus, then 40 steps of a 2-layer, 64-dim
model in float32 on 8 x 64 tokens a step. Expected: loss from ~6.2 (ln 512) to ~4 in
well under a minute on a 2-core CPU.
"""
from llama_jax.train.config import base_config, model_dict, run_dict


def get_config():
    c = base_config()
    c.steps = 40
    c.log_every = 5
    c.eval_every = 20
    c.eval_batches = 2
    c.checkpoint_every = 20
    c.batch_size = 8
    c.seq_len = 64
    c.model = model_dict("tiny")
    c.run = run_dict(dtype="float32")
    c.optimizer.peak_lr = 3e-3
    c.optimizer.warmup_steps = 5
    c.data.read_threads = 1
    c.data.prefetch_buffer = 16
    return c
