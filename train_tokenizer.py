"""Train a SentencePiece BPE tokenizer with the LLaMA recipe (digits split, byte fallback).

    python train_tokenizer.py --source stdlib --vocab-size 4096 --output tokenizer.model
    python train_tokenizer.py --source 'jsonl:data/*.jsonl#text' --vocab-size 32000 --output t.model
    python train_tokenizer.py --source tfds:lm1b:train --vocab-size 32000 --output t.model
    (--source: a spec as train.py's and eval.py's, or a bare kind with --path/--field/--name/--split:
     --source jsonl --path 'data/*.jsonl' --field text)
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llama_jax.cli.args import ArgumentParser, positive_int, quiet_logs  # noqa: E402
from llama_jax.cli.sources import add_source_flags, source_from_flags  # noqa: E402
from llama_jax.errors import run_cli  # noqa: E402


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    add_source_flags(p)
    p.add_argument("--vocab-size", type=positive_int, required=True, help="pieces in the tokenizer")
    p.add_argument("--output", required=True, help="path of the .model file to write")
    p.add_argument("--max-chars", type=positive_int, default=20_000_000, help="characters read for training")
    args = p.parse_args(argv)
    quiet_logs()
    from llama_jax.data import train_tokenizer
    start = time.time()
    tok = train_tokenizer(source_from_flags(args), args.vocab_size, args.output, max_chars=args.max_chars)
    print(f"wrote {args.output}: vocab_size {tok.vocab_size}, {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
