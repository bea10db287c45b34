"""Convert a Meta or Hugging Face PyTorch checkpoint to a params-only Orbax checkpoint.

    python convert/to_orbax.py --source meta --input llama-7b/ --output ckpt/llama-7b
    python convert/to_orbax.py --source hf --input Llama-3.1-8B/ --output ckpt/l31-8b --dtype bfloat16

Streams tensor by tensor (peak memory is a few layers, not the checkpoint); the output
appears only when complete. Read it with `llama_jax.load_checkpoint(OUTPUT)`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama_jax.cli.args import ArgumentParser, quiet_logs  # noqa: E402
from llama_jax.errors import run_cli  # noqa: E402
from llama_jax.generations import Generation  # noqa: E402
from llama_jax.interop.formats import PARAM_DTYPES, Format  # noqa: E402


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--source", required=True, choices=[f.value for f in Format])
    p.add_argument("--input", required=True, help="folder with params.json + consolidated.*.pth, or config.json + weights")
    p.add_argument("--output", required=True, help="checkpoint folder to create")
    p.add_argument("--dtype", choices=PARAM_DTYPES, default=None,
                   help="store the params in this dtype (default: as stored in the source)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--generation", choices=[g.value for g in Generation], default=None,
                   help="the LLaMA generation, when the files do not say it right "
                        "(3.3 has 3.1's files; LLaMA 1 65B reads as 2)")
    args = p.parse_args(argv)
    quiet_logs()
    from tqdm import tqdm
    from llama_jax.interop import convert as conversion
    bar = tqdm(unit="tensor", desc="to_orbax", delay=1)  # no bar when failing fast

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    try:
        config = conversion.to_orbax(Format(args.source), args.input, args.output, dtype=args.dtype,
                                     overwrite=args.overwrite, progress=progress, generation=args.generation)
    finally:
        bar.close()  # before an error line, not after it
    print(f"wrote {args.output}: Llama {config.generation.value}, {config.n_layers} layers, dim {config.dim}, "
          f"params {args.dtype or 'as stored'}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
