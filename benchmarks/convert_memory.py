"""Peak memory and time of the streaming converters on a LLaMA-7B-shaped checkpoint.

    python benchmarks/convert_memory.py --format meta --workdir /tmp/convert_bench
    python benchmarks/convert_memory.py --format hf --workdir /tmp/convert_bench --export

Writes a random bfloat16 checkpoint of the `llama-7b` preset (13.5 GB; Meta 1-shard .pth
or HF safetensors, itself written tensor by tensor), converts it with
convert/to_orbax.py in a child process (and back with convert/from_orbax.py with
--export), and prints each child's peak RSS (getrusage) and seconds as a Markdown row.
Deletes what it wrote unless --keep.
"""
import argparse
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llama_jax import ModelConfig  # noqa: E402

from llama_jax.interop import mapping as weights
from llama_jax.interop.convert import tensor_order  # noqa: E402
from llama_jax.interop.formats import Format  # noqa: E402
from llama_jax.interop.safetensors_files import SafetensorsWriter  # noqa: E402
from llama_jax.interop.torch_files import TorchFileWriter  # noqa: E402
from llama_jax.interop.meta_params import meta_params_of
from llama_jax.interop.hf_config import hf_config_of


def _random_bf16(rng, shape):
    import ml_dtypes
    # Random bits with the exponent field kept small: finite values, no NaNs, cheap to make.
    bits = (rng.integers(0, 1 << 16, size=shape, dtype=np.uint16) & np.uint16(0x8FFF)) | np.uint16(0x3000)
    return bits.view(ml_dtypes.bfloat16)


def write_source(fmt: str, config: ModelConfig, out: str) -> int:
    import json
    import ml_dtypes
    os.makedirs(out)
    rng = np.random.default_rng(0)
    order = list(tensor_order(config, Format(fmt)))
    specs = {name: (weights.torch_shape(rule, config), np.dtype(ml_dtypes.bfloat16)) for rule, _, name in order}
    if fmt == "meta":
        (open(os.path.join(out, "params.json"), "w")).write(json.dumps(meta_params_of(config)))
        writer = TorchFileWriter(os.path.join(out, "consolidated.00.pth"), specs)
    else:
        (open(os.path.join(out, "config.json"), "w")).write(json.dumps(hf_config_of(config)))
        writer = SafetensorsWriter(os.path.join(out, "model.safetensors"), specs)
    for name, (shape, _) in specs.items():
        writer.write(name, _random_bf16(rng, shape))
    writer.close()
    return sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))


def run_child(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of one child process (wait4 gives that child's own rusage)."""
    t0 = time.time()
    child = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{cmd[1]} failed with exit code {child.returncode}")
    return time.time() - t0, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--format", choices=["meta", "hf"], default="meta")
    p.add_argument("--workdir", default="/tmp/convert_bench")
    p.add_argument("--preset", default="llama-7b")
    p.add_argument("--export", action="store_true", help="also convert back with from_orbax.py")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    config = ModelConfig.preset(args.preset)
    src, dst, back = (os.path.join(args.workdir, n) for n in ("source", "orbax", "export"))
    shutil.rmtree(args.workdir, ignore_errors=True)
    try:
        t0 = time.time()
        size = write_source(args.format, config, src)
        gen_s = time.time() - t0
        print(f"source: {size / 1e9:.2f} GB {args.format} bf16 written in {gen_s:.0f} s ({size / gen_s / 1e6:.0f} MB/s)")
        py = sys.executable
        rows = [("to_orbax", *run_child([py, "convert/to_orbax.py", "--source", args.format,
                                         "--input", src, "--output", dst]))]
        if args.export:
            rows.append(("from_orbax", *run_child([py, "convert/from_orbax.py", "--target", args.format,
                                                   "--input", dst, "--output", back])))
        gib = size / 2**30
        print(f"\nmachine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}")
        print("| direction | format | checkpoint GiB | peak RSS GiB | % of checkpoint | seconds | MB/s |")
        print("|---|---|---|---|---|---|---|")
        for what, seconds, rss in rows:
            print(f"| {what} | {args.format} | {gib:.2f} | {rss:.2f} | {100 * rss / gib:.1f}% | {seconds:.0f} "
                  f"| {size / seconds / 1e6:.0f} |")
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
