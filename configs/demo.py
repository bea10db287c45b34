"""Demo: the README's first command. Trains a small LLaMA on the embedded default corpus
(the Python standard library's source), checkpoints, and prints a sample. Offline, CPU.

    python train.py --config configs/demo.py --workdir runs/demo

A 1024-piece tokenizer is trained on the corpus first (seconds), then 1000 steps of a
4-layer, 128-dim GQA model on 16 x 128 tokens a step, float32 (bf16 matmuls are slow on
CPUs). Measured on a 2-core machine shared with other work: 7.5 to 28 minutes for the
whole command (the 28-minute run: 7.4 minutes of CPU time, load average ~10, 1.5 s a step);
eval loss 4.47 at step 250, 3.45 at step 1000 (ln 1024 = 6.9 at the start), and a sample
with Python's look (def, docstrings, indentation) if not its sense.
Resume: run the same command again with a larger --config.steps (and the same
--config.optimizer.total_steps, so the schedule is unchanged).
"""
from llama_jax.train.config import base_config, model_dict, run_dict


def get_config():
    c = base_config()
    c.steps = 1000
    c.log_every = 10
    c.eval_every = 250
    c.eval_batches = 4
    c.checkpoint_every = 250
    c.batch_size = 16
    c.seq_len = 128
    c.model = model_dict("tiny", dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=1024,
                         max_seq_len=512)
    c.run = run_dict(dtype="float32")
    c.data.read_threads = 1  # 8k tokens/s is all the model eats: leave the cores to it
    c.optimizer.peak_lr = 3e-3
    c.optimizer.warmup_steps = 100
    c.sample.prompt = "def "
    c.sample.max_new_tokens = 64
    c.sample.temperature = 0.7
    return c
