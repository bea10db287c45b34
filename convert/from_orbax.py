"""Export a params-only Orbax checkpoint (or a training step) to Meta or Hugging Face files.

    python convert/from_orbax.py --target meta --input ckpt/llama-7b --output out/llama-7b --shards 1
    python convert/from_orbax.py --target hf --input workdir/ --output out/hf --max_shard_size 5GB

Meta: params.json + consolidated.NN.pth (N model-parallel shards). Hugging Face:
config.json, generation_config.json, safetensors (sharded, with an index, past
--max_shard_size), and transformers' tokenizer files made from tokenizer.model. Tokenizer
files found beside the checkpoint are copied.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from llama_jax import conversion  # noqa: E402
from llama_jax.errors import run_cli  # noqa: E402
from llama_jax.generations import Generation  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, choices=["meta", "hf"])
    p.add_argument("--input", required=True, help="params-only checkpoint, training step, or workdir (latest step)")
    p.add_argument("--output", required=True, help="folder to create")
    p.add_argument("--shards", type=int, default=1, help="Meta model-parallel shards to write")
    p.add_argument("--max_shard_size", default="5GB", help="Hugging Face: largest safetensors file, e.g. 5GB")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="write tensors in this dtype (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--generation", choices=[g.value for g in Generation], default=None,
                   help="export as this LLaMA generation (params.json keys, shard axis, token ids); "
                        "default: the checkpoint's")
    args = p.parse_args(argv)
    bar = tqdm(unit="tensor", desc="from_orbax", delay=1)  # no bar for an early error

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    config = conversion.from_orbax(args.target, args.input, args.output, shards=args.shards,
                                   max_shard_size=args.max_shard_size, dtype=args.dtype,
                                   overwrite=args.overwrite, progress=progress, generation=args.generation)
    bar.close()
    print(f"wrote {args.output}: Llama {config.generation.value}, {config.n_layers} layers, dim {config.dim}, "
          f"{config.param_dtype}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
