"""LLaMA 7B on the paper's data mixture (Table 1 sampling proportions):
CommonCrawl 67%, C4 15%, GitHub 4.5%, Wikipedia 4.5%, Books 4.5%, ArXiv 2.5%,
StackExchange 2%. C4 and Wikipedia come from TFDS; the others from JSONL files
ROOT/<name>/*.jsonl (a "text" field per line), ROOT given after the colon:

    python train.py --config configs/mixture.py:/mnt/shared/llama_data \
        --workdir /mnt/shared/runs/llama_7b_mixture --config.data.tokenizer=/path/to/tokenizer.model

Otherwise the 7B recipe of configs/llama_7b.py (see its docstring for memory and speed).
"""
from llama_jax.data import paper_mixture
from llama_jax.train.config import paper_config, sources_list


def get_config(root: str = "data/llama_mixture"):
    c = paper_config("llama-7b", peak_lr=3.0e-4, train_tokens=1.0e12)
    c.micro_batches = 4
    c.data.sources = sources_list(paper_mixture(root))
    # Packed rows on cuDNN's packed attention kernel, 16 runs per row (docs/attention.md);
    # a batch with a row of more documents runs a dense-mask step (train/packed_guard.py).
    c.run.packed_segments = 16
    return c
