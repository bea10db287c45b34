"""LoRA: adapters (rank 16 on every projection) trained on a frozen bf16 base, chat data.

    python train.py --config configs/lora.py --workdir runs/lora \
        --config.init_from=checkpoints/llama-3.1-8b-instruct \
        --config.data.sources=chat_jsonl:data/train.jsonl \
        --config.eval_data.sources=chat_jsonl:data/eval.jsonl

configs/sft.py with `lora.rank` > 0: only the adapters have gradients and optimizer state;
the base is read from `init_from` in `lora.base_dtype` and never written. Each checkpoint
step holds the adapters and `lora.json` naming the base (a resume reloads it from there).
Export: `llama_jax.interop.peft.save_peft` (peft's format), or merge into the base
(`lora.merge`, `interop.peft.merge_into_checkpoint`) for the HF / Meta exports.
Expected: like configs/sft.py at 1e-4 instead of 2e-5, with ~0.5% of the parameters trained
(no reference run measured yet; tests/test_lora_train.py: loss falls, base bit-identical,
resume exact).
"""
import importlib.util
import os

from llama_jax.train.config import lora_dict


def _sft():
    # configs/ is not a package train.py imports from: load the sibling file by its path
    spec = importlib.util.spec_from_file_location("_sft_config", os.path.join(os.path.dirname(__file__), "sft.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    c = _sft().get_config()
    c.lora = lora_dict(rank=16, alpha=32.0, dropout=0.05, targets="wq,wk,wv,wo,w1,w2,w3", base_dtype="bfloat16")
    c.optimizer.peak_lr = 1e-4
    # Keep only the attention half for the backward pass and recompute the MLP: on an H200
    # (8B, 4 x 2048) 13,367 tokens/s against dots_flash's 15,801, at 43 GB instead of 64
    # (benchmarks/RESULTS.md); the memory is what lets an 8B base fit beside its batch.
    c.run.remat_policy = "attention"
    return c
