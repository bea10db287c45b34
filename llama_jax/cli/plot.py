"""`python -m llama_jax plot WORKDIR [--output PATH]`: a run's curves (llama_jax.train.plot) as a PNG."""
from __future__ import annotations

import argparse
import os

from llama_jax.train.plot import plot_run


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_jax plot", description=__doc__)
    p.add_argument("workdir", help="a train.py --workdir (reads its metrics.jsonl)")
    p.add_argument("--output", default=None, help="PNG path (default: WORKDIR/plot.png)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.workdir):
        from llama_jax.errors import input_error
        raise input_error(args.workdir, "no such directory", "a train.py --workdir", args.workdir)
    print(f"wrote {plot_run(args.workdir, args.output)}")
    return 0
