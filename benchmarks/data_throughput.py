"""Tokens/s through the input pipeline (read -> tokenize -> pack -> batch) on this machine.

    python benchmarks/data_throughput.py [--tokenizer PATH] [--vocab_size 4096] [--seconds 10]

Trains a tokenizer on the stdlib corpus unless one is given, then times, on the stdlib
corpus: bare SentencePiece encoding, the on-the-fly pipeline with 0/1/2 reader threads,
and the pipeline over pre-tokenized array_record shards. Tokens counted are real tokens
(segment_ids > 0), not padding.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from llama_jax.data import DataConfig, SourceConfig, load_tokenizer, make_dataset, pretokenize, train_tokenizer  # noqa: E402
from llama_jax.data.source_kinds import open_source  # noqa: E402


def time_pipeline(cfg, tok, seq_len, batch, seconds):
    it = make_dataset(cfg, tok, seq_len, batch, seed=0, shard_index=0, shard_count=1)
    next(it)  # start the threads before timing
    start, tokens, steps = time.perf_counter(), 0, 0
    while time.perf_counter() - start < seconds:
        tokens += int((next(it)["segment_ids"] > 0).sum())
        steps += 1
    dt = time.perf_counter() - start
    return {"tokens_per_s": tokens / dt, "batches_per_s": steps / dt}


def time_encode(tok, seconds):
    src = open_source(SourceConfig())
    start, tokens, i = time.perf_counter(), 0, 0
    while time.perf_counter() - start < seconds:
        tokens += len(tok.encode(src[i % len(src)], bos=True, eos=True))
        i += 1
    return {"tokens_per_s": tokens / (time.perf_counter() - start)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()
    tmp = tempfile.mkdtemp()
    t0 = time.perf_counter()
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else train_tokenizer(
        SourceConfig(), args.vocab_size, os.path.join(tmp, "tok.model"))
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
               "tokenizer_vocab": tok.vocab_size, "tokenizer_train_s": time.perf_counter() - t0,
               "seq_len": args.seq_len, "batch": args.batch}
    results["sentencepiece_encode"] = time_encode(tok, args.seconds)
    for threads in (0, 1, 2):
        cfg = DataConfig(read_threads=threads)
        results[f"pipeline_threads{threads}"] = time_pipeline(cfg, tok, args.seq_len, args.batch, args.seconds)
    t0 = time.perf_counter()
    pretokenize(SourceConfig(), tok, os.path.join(tmp, "pt"))
    results["pretokenize_s"] = time.perf_counter() - t0
    pre = DataConfig(sources=(SourceConfig(kind="pretokenized", path=os.path.join(tmp, "pt")),))
    results["pipeline_pretokenized"] = time_pipeline(pre, tok, args.seq_len, args.batch, args.seconds)
    print(json.dumps(results, indent=1, default=lambda x: round(float(x), 1)))


if __name__ == "__main__":
    main()
