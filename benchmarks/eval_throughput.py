"""Requests/s of the log-likelihood Scorer on multiple-choice-shaped requests.

    python benchmarks/eval_throughput.py [--requests 500] [--dim 256 --layers 4 --vocab 32000]

Requests look like HellaSwag's: contexts of 40-120 tokens, continuations of 10-40 (random
ids, random weights: speed does not depend on them). Reports the first pass (compiles one
program per row length) and a second, warm pass, with packing and without (pack_length
equal to the row length, i.e. one request per padded row, as plain padding would do).
"""
import argparse
import time

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
import flax.linen as nn

from llama_jax import Llama, ModelConfig
from llama_jax.evaluation import Scorer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens_per_batch", type=int, default=4096)
    a = p.parse_args()
    cfg = ModelConfig(dim=a.dim, n_layers=a.layers, n_heads=a.dim // 64, vocab_size=a.vocab, multiple_of=64,
                      max_seq_len=2048)
    params = nn.unbox(Llama(cfg).init(jax.random.PRNGKey(0), np.ones((1, 8), np.int32))["params"])
    rng = np.random.default_rng(0)
    reqs = [(rng.integers(3, a.vocab, int(rng.integers(40, 121))).tolist(),
             rng.integers(3, a.vocab, int(rng.integers(10, 41))).tolist()) for _ in range(a.requests)]
    tokens = sum(len(c) + len(x) - 1 for c, x in reqs)
    print(f"{jax.devices()[0].platform}, dim {a.dim}, layers {a.layers}, vocab {a.vocab}, "
          f"{a.requests} requests, {tokens} tokens ({tokens / a.requests:.0f}/request)")
    for name, pack in (("packed rows of 256", 256), ("one request per 256-row", None)):
        scorer = Scorer(cfg, params, tokens_per_batch=a.tokens_per_batch, pack_length=256)
        if pack is None:  # disable packing: every request gets its own row
            import llama_jax.evaluation.scoring as S
            orig = S.pack_rows
            S.pack_rows = lambda lengths, capacity: [[i] for i in range(len(lengths))]
        for label in ("first (compile)", "warm"):
            t = time.perf_counter()
            scorer.loglikelihood(reqs)
            dt = time.perf_counter() - t
            print(f"{name:>26} {label:>16}: {a.requests / dt:9.1f} requests/s  {tokens / dt:10.0f} tokens/s")
        if pack is None:
            S.pack_rows = orig


if __name__ == "__main__":
    main()
