"""LLaMA 7B with the paper's recipe (Table 2): peak LR 3.0e-4, 4M-token batches, 1.0e12 tokens.

    python train.py --config configs/llama_7b.py --workdir /mnt/shared/runs/llama_7b \
        --config.data.tokenizer=/path/to/llama/tokenizer.model

Steps: 1.0e12 tokens / (2048 x 2048) per step. Data: C4 from TFDS by default (see
configs/mixture.py for the paper's mixture). Compute bf16, float32 master params and
AdamW state, remat of everything but the linear layers' outputs.
Memory: params + grads + Adam state in float32 = 16 bytes x 6.7B params = 107 GB, spread over the
mesh's fsdp x tensor devices, plus activations (set --config.micro_batches=K to cut them by K).
Mesh: (1, -1, 1): FSDP over all devices (one v5p-64 slice or 4 x 8 H100/H200 hosts).
Expected throughput at the paper's ~50% MFU (tokens/s/device = 0.5 x peak FLOP/s / FLOPs per
token, FLOPs per token = 6 x params + 6 x L x D x 2048, see llama_jax/train/metrics.py): about 5.5k on TPU v5p, 12k on H100/H200, 3.8k on A100.
Measured: 12.9k tokens/s per GPU (531 TFLOP/s, MFU 0.54) with FSDP over two H200s, batch
8 x 2048 per GPU (benchmarks/train_step.py; benchmarks/RESULTS.md). That step needs ~106 GiB
per GPU: set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (JAX takes 75% of a GPU by default).
"""
from llama_jax.train.config import paper_config


def get_config():
    c = paper_config("llama-7b", peak_lr=3.0e-4, train_tokens=1.0e12)
    c.mesh = (1, -1, 1)
    c.micro_batches = 4
    # Packed rows on cuDNN's packed attention kernel, 16 runs per row (docs/attention.md);
    # a batch with a row of more documents runs a dense-mask step (train/packed_guard.py).
    c.run.packed_segments = 16
    return c
