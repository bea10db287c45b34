"""LLaMA 13B with the paper's recipe (Table 2): peak LR 3.0e-4, 4M-token batches, 1.0e12 tokens.

    python train.py --config configs/llama_13b.py --workdir /mnt/shared/runs/llama_13b \
        --config.data.tokenizer=/path/to/llama/tokenizer.model

Steps: 1.0e12 tokens / (2048 x 2048) per step. Data: C4 from TFDS by default (see
configs/mixture.py for the paper's mixture). Compute bf16, float32 master params and
AdamW state, remat of everything but the linear layers' outputs.
Memory: params + grads + Adam state in float32 = 16 bytes x 13.0B params = 208 GB, spread over the
mesh's fsdp x tensor devices, plus activations (set --config.micro_batches=K to cut them by K).
Mesh: (1, -1, 1): FSDP over all devices (v5p-128, or 8+ H100/H200 hosts).
Expected throughput at the paper's ~50% MFU (tokens/s/device = 0.5 x peak FLOP/s / FLOPs per
token, FLOPs per token = 6 x params + 6 x L x D x 2048, see llama_jax/train/metrics.py): about 2.8k on TPU v5p, 6k on H100/H200, 1.9k on A100.
"""
from llama_jax.train.config import paper_config


def get_config():
    c = paper_config("llama-13b", peak_lr=3.0e-4, train_tokens=1.0e12)
    c.mesh = (1, -1, 1)
    c.micro_batches = 8
    # Packed rows on cuDNN's packed attention kernel, 16 runs per row (docs/attention.md);
    # a batch with a row of more documents runs a dense-mask step (train/packed_guard.py).
    c.run.packed_segments = 16
    return c
