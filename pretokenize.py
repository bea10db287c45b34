"""Tokenize a corpus once into array_record shards; train from them with a source of
kind "pretokenized" (SourceConfig(kind="pretokenized", path=OUTPUT_DIR)).

    python pretokenize.py --source stdlib --tokenizer tokenizer.model --output /tmp/stdlib_tok
    python pretokenize.py --source text:notes.txt --tokenizer tokenizer.model --output /tmp/notes_tok
    (--source: a spec as train.py's and eval.py's, or a bare kind with --path: --source text --path notes.txt)
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
    p.add_argument("--tokenizer", required=True, help="tokenizer.model: SentencePiece or LLaMA 3 tiktoken BPE")
    p.add_argument("--output", required=True, help="directory for the shards")
    p.add_argument("--docs-per-shard", type=positive_int, default=100_000, help="documents per array_record shard")
    args = p.parse_args(argv)
    quiet_logs()
    from tqdm import tqdm
    from llama_jax.data import load_tokenizer, pretokenize
    start = time.time()
    bar = tqdm(unit="doc", delay=1)  # no bar when failing fast
    try:
        meta = pretokenize(source_from_flags(args), load_tokenizer(args.tokenizer), args.output,
                           docs_per_shard=args.docs_per_shard, progress=lambda n: bar.update(1))
    finally:
        bar.close()  # before an error line, not after it
    print(f"wrote {args.output}: {meta['documents']} documents, {meta['tokens']} tokens, "
          f"{len(meta['shards'])} shard(s), {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
