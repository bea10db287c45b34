"""`python -m llama_jax generate`: sample text from a checkpoint, streaming one prompt's tokens.

    python -m llama_jax generate --checkpoint ckpt/tiny --prompt "def fib(n):" --max-new-tokens 64
    python -m llama_jax generate --checkpoint runs/demo --prompt "import" --prompt "class" \\
        --temperature 0.8 --top-p 0.95

Sampling is Meta's: temperature 0 is greedy; otherwise softmax(logits / temperature), then
nucleus (top-p) filtering, then top-k when given. Generation stops at the tokenizer's eos.
One prompt streams its text as it is produced; several are printed together at the end.
"""
from __future__ import annotations

import sys
import time

from llama_jax.cli.args import ArgumentParser, check_sampling_flags, non_negative_int, positive_int, quiet_logs
from llama_jax.errors import input_error


def _parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m llama_jax generate", description=__doc__)
    ap.add_argument("--checkpoint", required=True, help="a llama_jax checkpoint directory, training step or workdir")
    ap.add_argument("--prompt", action="append", required=True, help="text to continue; repeat for a batch")
    ap.add_argument("--tokenizer", help="tokenizer.model (default: the one in the checkpoint directory)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate per prompt")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="softmax temperature; 0 (default) is greedy decoding")
    ap.add_argument("--top-p", type=float, default=1.0,
                    help="nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1]")
    ap.add_argument("--top-k", type=positive_int, help="keep only the k most likely tokens (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="cast the params on load; generation computes in the params' dtype (default: as stored)")
    ap.add_argument("--tensor-parallel", type=non_negative_int, default=0,
                    help="devices on the tensor axis (0: all devices when there are several)")
    return ap


def _check_lengths_early(a):
    """The tokenizer, once each prompt + --max-new-tokens is known to fit the model's context
    (read from model_config.json, before the params load and before anything is printed);
    None when the config cannot be read here (loading the checkpoint then says why)."""
    from llama_jax.checkpoint import read_config, resolve_checkpoint, tokenizer_file
    from llama_jax.data import load_tokenizer
    try:
        config = read_config(resolve_checkpoint(a.checkpoint))
    except Exception:  # noqa: BLE001 - load_checkpoint reports it properly
        return None
    tok = load_tokenizer(str(tokenizer_file(a.checkpoint, a.tokenizer)))
    for i, prompt in enumerate(a.prompt):
        n = len(tok.encode(prompt, bos=True))
        if n + a.max_new_tokens > config.max_seq_len:
            raise input_error(f"--prompt {i}" if len(a.prompt) > 1 else "--prompt",
                              f"{n} prompt tokens + --max-new-tokens {a.max_new_tokens} exceed the model's "
                              f"context", f"<= max_seq_len {config.max_seq_len}", n + a.max_new_tokens)
    return tok


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    check_sampling_flags(a)
    quiet_logs()
    from llama_jax.checkpoint import load_checkpoint, tokenizer_file
    from llama_jax.data import load_tokenizer
    from llama_jax.inference import text as gt
    tok = _check_lengths_early(a)
    import jax
    mesh = None
    n = a.tensor_parallel or jax.device_count()
    if n > 1:
        from llama_jax import sharding
        mesh = sharding.make_mesh((1, 1, n), devices=jax.devices()[:n])
    config, params = load_checkpoint(a.checkpoint, dtype=a.dtype, mesh=mesh)
    tok = tok or load_tokenizer(str(tokenizer_file(a.checkpoint, a.tokenizer)))
    one = len(a.prompt) == 1
    stream = (lambda r, s: print(s, end="", flush=True)) if one else None
    if one:
        print(a.prompt[0], end="", flush=True)
    t0 = time.perf_counter()
    texts = gt.generate_text(config, params, tok, a.prompt, a.max_new_tokens, temperature=a.temperature,
                             top_p=a.top_p, top_k=a.top_k, seed=a.seed, stream=stream, mesh=mesh)
    print() if one else print("\n\n".join(p + t for p, t in zip(a.prompt, texts)))
    sys.stdout.flush()
    print(f"[{time.perf_counter() - t0:.2f} s, compile included]", file=sys.stderr)
    return 0
