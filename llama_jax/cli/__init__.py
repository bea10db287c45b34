"""The command lines' room: argparse helpers and the `python -m llama_jax COMMAND` entry points.

The library below never imports this package."""
