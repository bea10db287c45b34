"""Evaluate a llama_jax checkpoint: the paper's zero-shot tasks and rolling perplexity.

    python eval.py --checkpoint DIR --tasks piqa,hellaswag,arc_easy --data-dir DATA --output results.json
    python eval.py --checkpoint DIR --perplexity tfds:lm1b:test --output ppl.json

Tasks read `DATA/{task}/{split}.jsonl` (or `DATA/{task}_{split}.jsonl`) in Hugging Face layout
when present, else TFDS (`--tfds-data-dir`; nothing is downloaded). Perplexity sources:
stdlib[:split], text:PATH, lines:PATH, jsonl:PATH[#field], pretokenized:DIR, tfds:NAME[:split];
fine-tuning sources (chat_jsonl:PATH, prompt_completion:PATH) score only their loss-masked
tokens (the answers), as training counts them.
Without --output the JSON goes to stdout (the table to stderr). Flags, task names and the
perplexity spec are checked before the checkpoint loads.
"""
from __future__ import annotations

import builtins
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llama_jax.cli.args import ArgumentParser, non_negative_int, positive_int, quiet_logs  # noqa: E402
from llama_jax.errors import input_error, run_cli  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="llama_jax checkpoint directory (model_config.json + params/)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the one in the checkpoint)")
    p.add_argument("--tasks", default="", help="comma-separated: boolq,piqa,siqa,hellaswag,winogrande,arc_easy,"
                                               "arc_challenge,openbookqa (or 'all')")
    p.add_argument("--data-dir", default=None, help="directory of local task JSONL files")
    p.add_argument("--tfds-data-dir", default=None, help="TFDS data_dir (default: TFDS's own)")
    p.add_argument("--split", default=None, help="evaluation split (default: the harness's per task)")
    p.add_argument("--num-fewshot", type=non_negative_int, default=0,
                   help="solved examples from the train split per prompt")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed")
    p.add_argument("--limit", type=positive_int, default=None, help="first N documents per task / perplexity source")
    p.add_argument("--perplexity", default=None, help="a data source to compute rolling perplexity on")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="perplexity window stride (default: disjoint windows)")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="context length, at most the model's max_seq_len (default: max_seq_len)")
    p.add_argument("--tokens-per-batch", type=positive_int, default=4096, help="tokens scored per forward pass")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="cast params on load; scoring computes in the params' dtype")
    p.add_argument("--output", default=None,
                   help="JSON result file, checked writable before anything runs (default: the JSON to stdout, "
                        "the table to stderr)")
    return p.parse_args(argv)


def check_output_writable(path: str) -> None:
    """Fail in a second, not after the whole evaluation, when the result file cannot be written."""
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise input_error(f"--output {path}", f"cannot write the result file: {e.strerror or e}") from None
    if not existed:
        os.remove(path)


def check_lengths(args, config) -> None:
    """--max-length and --stride against the model's context, before any scoring."""
    if args.max_length is not None and not 2 <= args.max_length <= config.max_seq_len:
        raise input_error("--max-length", "must fit the model's context", f"2..{config.max_seq_len}", args.max_length)
    length = args.max_length or config.max_seq_len
    if args.stride is not None and args.stride > length:
        raise input_error("--stride", "must be at most the context length", f"<= {length}", args.stride)


def _progress(total, desc):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="req" if desc != "perplexity" else "doc", dynamic_ncols=True)


def run_tasks(args, scorer, tokenizer, names) -> dict:
    from llama_jax.evaluation import evaluate_docs, get_task, load_docs
    from llama_jax.evaluation.multiple_choice import n_options, option
    tasks = [get_task(n) for n in names]
    # Load every dataset before scoring anything, so a missing one fails in seconds.
    loaded = []
    for t in tasks:
        docs = load_docs(t, args.split, args.data_dir, args.tfds_data_dir)[:args.limit]
        if not docs:
            raise input_error(t.name, "no documents to evaluate (an empty file?)", ">= 1 document", 0)
        train = load_docs(t, t.train_split, args.data_dir, args.tfds_data_dir) if args.num_fewshot else ()
        loaded.append((t, docs, train))
    results = {}
    for t, docs, train in loaded:
        total = sum(n_options(d) for d in docs)
        if t.paper_norm:
            total += len({option(d, i)[1] for d in docs for i in range(n_options(d))})
        start = time.perf_counter()
        with _progress(total, t.name) as bar:
            m = evaluate_docs(scorer, tokenizer, t, docs, num_fewshot=args.num_fewshot, train_docs=train,
                              seed=args.seed, progress=bar.update)
        m["seconds"] = time.perf_counter() - start
        m["requests_per_second"] = total / m["seconds"]
        results[t.name] = m
    return results


def open_perplexity_source(args):
    """The --perplexity source, parsed and opened (paths checked) before the checkpoint loads."""
    from llama_jax.data.source_kinds import open_source
    from llama_jax.data.spec import check_paths
    from llama_jax.evaluation import parse_source
    cfg = parse_source(args.perplexity, args.tfds_data_dir)
    check_paths((cfg,), "--perplexity")
    return open_source(cfg)


def run_perplexity(args, scorer, tokenizer, src) -> dict:
    from llama_jax.evaluation import perplexity
    n = len(src) if args.limit is None else min(args.limit, len(src))
    if n == 0:
        raise input_error(args.perplexity, "empty corpus, nothing to score", ">= 1 document", 0)
    exact_ids = True
    if hasattr(src, "meta"):  # pretokenized: ids from the tokenizer recorded in pretokenized.json
        vocab = src.vocab_size
        if vocab > scorer.config.vocab_size:
            raise input_error(f"--perplexity {args.perplexity}", "pretokenized with a tokenizer larger than the "
                              "model's vocabulary", f"vocab_size <= {scorer.config.vocab_size}", vocab)
        exact_ids = vocab == tokenizer.vocab_size  # else decoding with our tokenizer would be wrong text
    with _progress(n, "perplexity") as bar:
        m = perplexity(scorer, tokenizer, (src[i] for i in range(n)), stride=args.stride, progress=bar.update,
                       exact_ids=exact_ids)
    m["source"] = args.perplexity
    return m


def print_table(results: dict, ppl: dict | None, file=None) -> None:
    print = functools.partial(builtins.print, file=file or sys.stdout)  # noqa: A001
    cols = ("n", "acc", "acc_norm", "acc_paper")
    if results:
        print(f"\n{'task':<15}" + "".join(f"{c:>10}" for c in cols) + f"{'paper':>11}")
        for name, m in results.items():
            cells = "".join(f"{m[c]:>10}" if c == "n" else (f"{100 * m[c]:>10.1f}" if c in m else f"{'-':>10}")
                            for c in cols)
            print(f"{name:<15}{cells}{100 * m[m['paper_metric']]:>11.1f}")
        print("(accuracies in %; 'paper' is the paper's Table 3 metric: acc_norm by characters, "
              "acc_paper for BoolQ/OBQA, acc for WinoGrande)")
    if ppl:
        answers = ppl.get("scored") == "answers"
        print(f"\nperplexity on {ppl['source']}: {ppl['documents']} documents, {ppl['tokens']} "
              f"{'answer tokens' if answers else 'tokens'}: token ppl {ppl['token_perplexity']:.4f}, " + (
                  f"bits/byte {ppl['bits_per_byte']:.4f}, word ppl {ppl['word_perplexity']:.4f}"
                  if ppl["bits_per_byte"] is not None else "bits/byte and word ppl not available ("
                  + ("answers only" if answers else "no exact text") + ")"))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.output is not None:
        check_output_writable(args.output)
    quiet_logs()
    from llama_jax.data import check_vocab
    from llama_jax.evaluation import TASKS, Scorer, get_task
    from llama_jax.checkpoint import load_checkpoint, tokenizer_file
    from llama_jax.data import load_tokenizer
    names = list(TASKS) if args.tasks == "all" else [n.strip() for n in args.tasks.split(",") if n.strip()]
    names = [get_task(n).name for n in names]  # unknown names fail before the model loads
    if not names and not args.perplexity:
        raise input_error("eval.py", "nothing to do", "--tasks and/or --perplexity", "neither")
    src = open_perplexity_source(args) if args.perplexity else None  # a bad spec fails before loading
    tokenizer = load_tokenizer(str(tokenizer_file(args.checkpoint, args.tokenizer)))
    config, params = load_checkpoint(args.checkpoint, dtype=args.dtype)
    check_vocab(tokenizer, config.vocab_size)
    check_lengths(args, config)
    scorer = Scorer(config, params, max_length=args.max_length, tokens_per_batch=args.tokens_per_batch)
    results = run_tasks(args, scorer, tokenizer, names) if names else {}
    ppl = run_perplexity(args, scorer, tokenizer, src) if args.perplexity else None
    print_table(results, ppl, file=sys.stdout if args.output else sys.stderr)
    out = {"config": {**vars(args), "tasks": names, "max_length": scorer.max_length, "model": config.to_dict(),
                      "tokenizer": tokenizer.path, "tokenizer_vocab_size": tokenizer.vocab_size},
           "results": results, "perplexity": ppl}
    if args.output is None:
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    with open(args.output, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
