"""Tokenize a corpus once into array_record shards; train from them with a source of
kind "pretokenized" (SourceConfig(kind="pretokenized", path=OUTPUT_DIR)).

    python pretokenize.py --source stdlib --tokenizer tokenizer.model --output /tmp/stdlib_tok
"""
import argparse
import sys
import time

from tqdm import tqdm

from llama_jax.data import DataError, load_tokenizer, pretokenize
from llama_jax.data.cli import add_source_flags, source_from_flags


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_flags(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer.model: SentencePiece or LLaMA 3 tiktoken BPE")
    p.add_argument("--output", required=True, help="directory for the shards")
    p.add_argument("--docs_per_shard", type=int, default=100_000)
    args = p.parse_args(argv)
    start = time.time()
    try:
        bar = tqdm(unit="doc")
        meta = pretokenize(source_from_flags(args), load_tokenizer(args.tokenizer), args.output,
                           docs_per_shard=args.docs_per_shard, progress=lambda n: bar.update(1))
        bar.close()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {meta['documents']} documents, {meta['tokens']} tokens, "
          f"{len(meta['shards'])} shard(s), {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
