"""`python -m llama_jax COMMAND ...`: the library's command lines, each in llama_jax/cli/.

    python -m llama_jax generate --checkpoint DIR --prompt TEXT     sample text
    python -m llama_jax chat --checkpoint DIR [--system TEXT]       talk to an instruct model
    python -m llama_jax plot WORKDIR [--output PATH]                a run's curves as a PNG

Nothing heavy is imported before the command is known, so `--help` is fast.
"""
import sys

COMMANDS = {
    "generate": ("llama_jax.cli.generate", "sample text from a checkpoint, streaming"),
    "chat": ("llama_jax.cli.chat", "chat with an instruct checkpoint in the terminal, keeping the KV cache"),
    "plot": ("llama_jax.cli.plot", "draw a training run's curves (WORKDIR/metrics.jsonl) as a PNG"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items()]
        usage = "usage: python -m llama_jax COMMAND [--help]\n\ncommands:\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; known: {', '.join(COMMANDS)}", file=sys.stderr)
            print(usage, file=sys.stderr)
            return 2
        print(usage)
        return 0
    import importlib
    from llama_jax.errors import run_cli
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return run_cli(module.main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
