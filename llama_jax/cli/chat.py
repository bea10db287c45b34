"""`python -m llama_jax chat`: talk to an instruct checkpoint in the terminal.

    python -m llama_jax chat --checkpoint ckpt/llama3-8b-instruct
    python -m llama_jax chat --checkpoint ckpt/llama2-7b-chat --system "Answer in one sentence."

The chat format is the tokenizer's family (LLaMA 2 [INST], LLaMA 3 headers; see
docs/chat_formats.md). The conversation's KV cache is kept between turns, so a new message
prefills only its own tokens. Answers stream as they are sampled (Meta's chat defaults:
temperature 0.6, top-p 0.9), then `[N tokens, X tok/s]`.

    /reset          forget the conversation (the system message stays)
    /system TEXT    start over with a new system message (/system alone: none)
    /exit           quit (so does Ctrl-D)
    Ctrl-C          stop the answer being written; the conversation goes on
"""
from __future__ import annotations

import re
import sys

from llama_jax.cli.args import ArgumentParser, check_sampling_flags, positive_int, quiet_logs
from llama_jax.errors import InputError

PROMPT = "> "
# Control characters a model may sample (ESC, ^C, ^S, a bare CR ...) would act on the
# terminal instead of showing: they are shown as U+FFFD.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f]")


def _parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m llama_jax chat", description=__doc__)
    ap.add_argument("--checkpoint", required=True, help="a llama_jax checkpoint directory, training step or workdir")
    ap.add_argument("--system", help="a system message that starts the conversation")
    ap.add_argument("--tokenizer", help="tokenizer.model (default: the one in the checkpoint directory)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=512, help="most tokens per answer")
    ap.add_argument("--temperature", type=float, default=0.6, help="softmax temperature (Meta's chat default 0.6); "
                    "0 is greedy")
    ap.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass, in (0, 1] (Meta's default 0.9)")
    ap.add_argument("--top-k", type=positive_int, help="keep only the k most likely tokens (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="cast the params on load (default: as stored); computation follows the params' dtype")
    ap.add_argument("--verbose", action="store_true",
                    help="after each answer, also print what was prefilled and the cache's size")
    return ap


def _session(a):
    from llama_jax.checkpoint import load_checkpoint, tokenizer_file
    from llama_jax.data import load_tokenizer
    from llama_jax.inference.session import ChatSession
    tok = load_tokenizer(str(tokenizer_file(a.checkpoint, a.tokenizer)))
    config, params = load_checkpoint(a.checkpoint, dtype=a.dtype)
    return ChatSession(config, params, tok, system=a.system, max_new_tokens=a.max_new_tokens,
                       temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed)


def _answer(session, text: str, verbose: bool) -> None:
    slot = session.filled
    try:
        reply = session.send(text, stream=lambda piece: print(_CONTROL.sub("\ufffd", piece), end="", flush=True))
    except InputError as e:  # the conversation is full: say so, keep the session
        print(f"error: {e}", flush=True)
        return
    note = {"interrupted": ", interrupted", "max_tokens": ", max tokens", "context": ", context full"}
    print(f"\n[{reply.generated} tokens, {reply.tokens_per_s:.1f} tok/s{note.get(reply.stopped, '')}]", flush=True)
    if verbose:
        print(f"[prefilled {reply.prefilled} ids at slot {slot} in {reply.prefill_s * 1e3:.0f} ms; "
              f"cache {session.filled}/{session.cache_len} slots]", flush=True)


def _loop(session, system: str | None, verbose: bool) -> int:
    while True:
        try:
            line = input(PROMPT).strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, the conversation stays
            print()
            continue
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command == "/exit":
            return 0
        if command == "/reset":
            session.reset(system)
            print("[conversation reset]")
        elif command == "/system":
            system = rest.strip() or None
            session.reset(system)
            print("[new conversation, " + ("with that system message]" if system else "no system message]"))
        elif command.startswith("/") and command[1:].isalpha():
            print(f"unknown command {command}: /reset, /system TEXT, /exit")
        else:
            _answer(session, line, verbose)


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    check_sampling_flags(a)
    quiet_logs()
    session = _session(a)
    print(f"chat with {a.checkpoint} ({type(session.tokenizer).__name__}); /reset, /system TEXT, /exit; "
          "Ctrl-C stops an answer", flush=True)
    rc = _loop(session, a.system, a.verbose)
    sys.stdout.flush()
    return rc
