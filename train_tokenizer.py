"""Train a SentencePiece BPE tokenizer with the LLaMA recipe (digits split, byte fallback).

    python train_tokenizer.py --source stdlib --vocab_size 4096 --output tokenizer.model
    python train_tokenizer.py --source jsonl --path 'data/*.jsonl' --field text --vocab_size 32000 --output t.model
    python train_tokenizer.py --source tfds --name lm1b --split train --vocab_size 32000 --output t.model
"""
import argparse
import sys
import time

from llama_jax.data import DataError, train_tokenizer
from llama_jax.data.cli import add_source_flags, source_from_flags


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_flags(p)
    p.add_argument("--vocab_size", type=int, required=True)
    p.add_argument("--output", required=True, help="path of the .model file to write")
    p.add_argument("--max_chars", type=int, default=20_000_000, help="characters read for training")
    args = p.parse_args(argv)
    start = time.time()
    try:
        tok = train_tokenizer(source_from_flags(args), args.vocab_size, args.output, max_chars=args.max_chars)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: vocab_size {tok.vocab_size}, {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
