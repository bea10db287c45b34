"""What keeping the KV cache between chat turns saves: the next turn's time to its first
token with `ChatSession` (prefill the new user ids only, after the cached conversation)
against recomputing the whole conversation (a fresh prefill of every id, as a stateless
`chat()` call must), turn after turn as the conversation grows.

Random weights, a synthetic conversation: each turn appends `--user-tokens` ids and then
decodes `--answer-tokens` (greedy, no stop), which stay in the cache. Per turn:
- cached_ms:    `session.extend(new ids)` until the next token's logits are ready (the
                same slots rewritten on each repeat)
- recompute_ms: the same code on a reset session, `extend(every id so far)`
- generate_ms:  `generate(config, weights, [every id so far], 1)`: chat()'s stateless path
- decode tok/s: the answer's sampling rate
Every shape is compiled by a full warm-up conversation first; the timed one repeats it. Both
sessions' caches grow in powers of two with what they hold (the recompute's: one new session
per turn, the best of --repeats kept).

    python benchmarks/chat_cache.py                # CPU: tiny preset, float32
    python benchmarks/chat_cache.py --preset llama3-8b --dtype bfloat16 --turns 8 \\
        --user-tokens 256 --answer-tokens 256     # the GPU shape (the default on a GPU)
Writes $OUT/chat_cache.json (or ./chat_cache.json) and prints a table.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", help="model shape (default: tiny on a CPU, llama3-8b on an accelerator)")
    ap.add_argument("--dtype", help="params and compute dtype (default: float32 on a CPU, bfloat16 otherwise)")
    ap.add_argument("--turns", type=int, help="user turns (default: 6 on a CPU, 8 otherwise)")
    ap.add_argument("--user-tokens", type=int, help="ids per user message (default: 64 on a CPU, 256 otherwise)")
    ap.add_argument("--answer-tokens", type=int, help="ids per answer (default: 64 on a CPU, 256 otherwise)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each prefill (the best is kept)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def _defaults(args, cpu: bool):
    small = dict(preset="tiny", dtype="float32", turns=6, user_tokens=64, answer_tokens=64)
    big = dict(preset="llama3-8b", dtype="bfloat16", turns=8, user_tokens=256, answer_tokens=256)
    for k, v in (small if cpu else big).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def byte_tokenizer(folder: str):
    """A LLaMA 3 tokenizer of the 256 byte tokens (ids 0..255, specials from 256): the
    session's chat format and end-of-turn id; the benchmark feeds ids directly."""
    from llama_jax.data import Llama3Tokenizer
    path = os.path.join(folder, "tokenizer.model")
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))
    return Llama3Tokenizer(path)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def conversation(args, new_session, generate, config, rng, timed: bool) -> list[dict]:
    """One synthetic conversation in a fresh session; per turn the timings (when `timed`)."""
    import jax
    session = new_session()
    session.stops = ()  # answers run their full length
    rows = []
    for turn in range(args.turns):
        new = rng.integers(0, 256, args.user_tokens).tolist()
        history = session.filled
        whole = session.ids + new

        ref = new_session() if timed else None  # made outside the timing (it checks the params' shapes)

        def recompute():  # from slot 0; its cache grows to the conversation's bucket, as the cached one's has
            ref.reset()
            jax.block_until_ready(ref.extend(whole))

        row = {"turn": turn + 1, "history": history, "new": len(new), "total": len(whole)}
        if timed:  # before the cached prefill, which changes the session
            row["recompute_ms"] = 1e3 * _best(recompute, args.repeats)
            gen = lambda: generate(config, session.weights, [whole], 1, stop_ids=(), run=session.run)  # noqa: E731
            row["generate_ms"] = 1e3 * _best(gen, args.repeats)
        def cached():  # writes the same keys and values into the same slots each time
            del session.ids[history:]
            return jax.block_until_ready(session.extend(new))

        row["cached_ms"] = 1e3 * _best(cached, args.repeats if timed else 1)
        logits = cached()
        t0 = time.perf_counter()
        answer, _ = session._answer(logits, args.answer_tokens, None, lambda: False)
        session.extend([session.close_id])
        row["decode_tokens_per_s"] = len(answer) / (time.perf_counter() - t0)
        rows.append(row)
    return rows


def main(argv=None):
    args = parse(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import flax.linen as nn
    from llama_jax import Llama, ModelConfig, RunOptions, generate
    from llama_jax.inference.decode import prepare
    from llama_jax.inference.session import ChatSession
    args = _defaults(args, jax.default_backend() == "cpu")
    config = ModelConfig.preset(args.preset)
    need = args.turns * (args.user_tokens + args.answer_tokens + 1)
    if need > config.max_seq_len:
        sys.exit(f"error: {need} ids in the conversation exceed {args.preset}'s context {config.max_seq_len}")
    run = RunOptions(dtype=args.dtype, param_dtype=args.dtype)
    init = jax.jit(lambda k: nn.unbox(Llama(config, run).init(k, jnp.ones((1, 8), jnp.int32))["params"]))
    params = init(jax.random.PRNGKey(args.seed))
    with tempfile.TemporaryDirectory() as d:
        tok = byte_tokenizer(d)
    weights = jax.jit(prepare)(params)
    del params  # one copy of the weights, in the decode runtime form, shared by every session
    new_session = lambda: ChatSession(config, weights, tok, temperature=0, run=run)  # noqa: E731
    t0 = time.perf_counter()
    # The first conversation compiles every shape (its first repeats included); the second is timed.
    conversation(args, new_session, generate, config, np.random.default_rng(args.seed), timed=True)
    warm = time.perf_counter() - t0
    rows = conversation(args, new_session, generate, config, np.random.default_rng(args.seed), timed=True)
    for r in rows:
        r["speedup"] = r["recompute_ms"] / r["cached_ms"]
    result = {"args": vars(args), "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
              "warmup_s": round(warm, 1), "turns": rows}
    path = os.path.join(os.environ.get("OUT", "."), "chat_cache.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{args.preset} {args.dtype} on {result['device']}; first conversation (compiling) {warm:.1f} s; {path}")
    print(f"{'turn':>4}{'history':>9}{'new':>6}{'cached ms':>11}{'recompute ms':>14}{'generate ms':>13}"
          f"{'speedup':>9}{'decode tok/s':>14}")
    for r in rows:
        print(f"{r['turn']:>4}{r['history']:>9}{r['new']:>6}{r['cached_ms']:>11.2f}{r['recompute_ms']:>14.2f}"
              f"{r['generate_ms']:>13.2f}{r['speedup']:>8.1f}x{r['decode_tokens_per_s']:>14.1f}")
    return result


if __name__ == "__main__":
    main()
