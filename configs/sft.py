"""SFT: full supervised fine-tuning of a converted checkpoint on chat data (JSON lines).

    python train.py --config configs/sft.py --workdir runs/sft \
        --config.init_from=checkpoints/llama-2-7b-chat \
        --config.data.sources=chat_jsonl:data/train.jsonl \
        --config.eval_data.sources=chat_jsonl:data/eval.jsonl

Rows `{"messages": [{"role": ..., "content": ...}, ...]}` ending with the assistant's answer,
written in the checkpoint's chat format; the loss counts only the assistant tokens (README,
"Fine-tuning data"). The architecture and tokenizer come from `init_from`. Recipe: 1000
steps of 32 x 2048 tokens, AdamW at 2e-5 (warmup 30, cosine to 10%), weight decay 0, bf16
compute with float32 master weights, remat, unrolled layers. Expected: the held-out masked
loss falls within the first hundred steps and then flattens (no reference run measured yet);
tests/test_sft_task.py shows the mechanism on a synthetic task (held-out answers > 90% right
when trained on the assistant tokens, < 20% with the mask inverted).
"""
from llama_jax.train.config import base_config, model_dict, run_dict


def get_config():
    c = base_config()
    c.steps = 1000
    c.log_every = 10
    c.eval_every = 100
    c.eval_batches = 8
    c.checkpoint_every = 250
    c.batch_size = 32
    c.seq_len = 2048
    c.model = model_dict("llama-7b")  # replaced by init_from's model_config.json
    c.run = run_dict(dtype="bfloat16", param_dtype="float32", remat_policy="dots_flash", layer_loop="unrolled")
    c.optimizer.peak_lr = 2e-5
    c.optimizer.warmup_steps = 30
    c.optimizer.weight_decay = 0.0
    c.data.sources = [{"kind": "chat_jsonl", "path": "data/train.jsonl"}]
    c.eval_data.sources = [{"kind": "chat_jsonl", "path": "data/eval.jsonl"}]
    # Packed rows on cuDNN's packed attention kernel, 16 runs per row (docs/attention.md);
    # a batch with a row of more documents runs a dense-mask step (train/packed_guard.py).
    c.run.packed_segments = 16
    return c
