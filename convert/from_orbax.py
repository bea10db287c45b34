"""Export a params-only Orbax checkpoint (or a training step) to Meta or Hugging Face files.

    python convert/from_orbax.py --target meta --input ckpt/llama-7b --output out/llama-7b --shards 1
    python convert/from_orbax.py --target hf --input workdir/ --output out/hf --max-shard-size 5GB

Meta: params.json + consolidated.NN.pth (N model-parallel shards). Hugging Face:
config.json, generation_config.json, safetensors (sharded, with an index, past
--max-shard-size), and transformers' tokenizer files made from tokenizer.model. Tokenizer
files found beside the checkpoint are copied.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama_jax.cli.args import ArgumentParser, positive_int, quiet_logs  # noqa: E402
from llama_jax.errors import run_cli  # noqa: E402
from llama_jax.generations import Generation  # noqa: E402
from llama_jax.interop.formats import PARAM_DTYPES, Format  # noqa: E402


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--target", required=True, choices=[f.value for f in Format])
    p.add_argument("--input", required=True, help="params-only checkpoint, training step, or workdir (latest step)")
    p.add_argument("--output", required=True, help="folder to create")
    p.add_argument("--shards", type=positive_int, default=1, help="Meta model-parallel shards to write")
    p.add_argument("--max-shard-size", default="5GB", help="Hugging Face: largest safetensors file, e.g. 5GB")
    p.add_argument("--dtype", choices=PARAM_DTYPES, default=None,
                   help="write tensors in this dtype (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--generation", choices=[g.value for g in Generation], default=None,
                   help="export as this LLaMA generation (params.json keys, shard axis, token ids); "
                        "default: the checkpoint's")
    args = p.parse_args(argv)
    quiet_logs()
    from tqdm import tqdm
    from llama_jax.interop import convert as conversion
    bar = tqdm(unit="tensor", desc="from_orbax", delay=1)  # no bar when failing fast

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    try:
        config = conversion.from_orbax(Format(args.target), args.input, args.output, shards=args.shards,
                                       max_shard_size=args.max_shard_size, dtype=args.dtype,
                                       overwrite=args.overwrite, progress=progress, generation=args.generation)
    finally:
        bar.close()  # before an error line, not after it
    print(f"wrote {args.output}: Llama {config.generation.value}, {config.n_layers} layers, dim {config.dim}, "
          f"{args.dtype or 'as stored'}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
