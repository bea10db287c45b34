"""Streaming conversion: PyTorch (Meta, Hugging Face) checkpoints <-> params-only Orbax.

One tensor is in memory at a time (plus the writes in flight): torch tensors are read
with pread (torch_files, safetensors_files), mapped by mapping.py, and written one layer
slice at a time into the Orbax checkpoint (checkpoint.streaming); the way back reads layer
slices and writes torch files in place. The torch-side format is a `Format`; the public
functions also take its string ("meta", "hf") and parse it once, here. Outputs are built
in a temporary directory and renamed when complete. `progress(done, total)` is called
after each tensor.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from llama_jax import checkpoint
from llama_jax.checkpoint import integrity
from llama_jax.checkpoint.streaming import ParamsReader, ParamsWriter, unflatten
from llama_jax.config import ModelConfig
from llama_jax.interop import hf_tokenizer, meta_params
from llama_jax.interop import mapping as weights
from llama_jax.interop.formats import PARAM_DTYPES, Format, get_path
from llama_jax.interop.hf_config import hf_config_of
from llama_jax.interop.safetensors_files import SafetensorsWriter
from llama_jax.interop.sources import open_source
from llama_jax.interop.torch_files import TorchFileWriter, import_torch

Progress = Callable[[int, int], None]


def tensor_order(config: ModelConfig, fmt: Format, rules=None) -> Iterator[tuple[weights.Rule, int | None, str]]:
    """(rule, layer or None, torch name), embeddings first, then layer by layer, then the head.

    `rules`: the tensors to visit (default: those a `fmt` file holds, weights.file_rules)."""
    rules = weights.file_rules(config, fmt) if rules is None else rules
    unlayered = [r for r in rules if not r.layered]
    for rule in unlayered[:1]:
        yield rule, None, weights.names(rule, config, fmt)[0]
    for i in range(config.n_layers):
        for rule in (r for r in rules if r.layered):
            yield rule, i, weights.names(rule, config, fmt)[i]
    for rule in unlayered[1:]:
        yield rule, None, weights.names(rule, config, fmt)[0]


def _param_dtype(dtypes) -> str:
    """The weights' one dtype name (HF config.json "dtype"); float32 when mixed."""
    names = {np.dtype(d).name for d in dtypes}
    return names.pop() if len(names) == 1 and names <= set(PARAM_DTYPES) else "float32"


def to_orbax(source: Format | str, input_dir: str | os.PathLike, output_dir: str | os.PathLike, dtype=None,
             overwrite: bool = False, progress: Progress | None = None, generation=None) -> ModelConfig:
    """Convert a Meta (Format.META, "meta") or Hugging Face (Format.HF, "hf") folder to a
    params-only Orbax checkpoint.

    `generation` ("3.1", ...) overrides the LLaMA generation the source files say."""
    source = Format.parse(source, "source")
    src = open_source(source, input_dir, generation=generation)
    config = src.config
    rules = weights.param_rules(config)
    leaf_dtypes = {}
    for rule in rules:
        found = {np.dtype(src.dtype(n)) for n in weights.names(rule, config, source)}
        if dtype is None and len(found) > 1:
            raise ValueError(f"{input_dir}: {rule.name(source)} is stored in several "
                             f"dtypes {sorted(map(str, found))} across layers; pass dtype (--dtype) to pick one")
        leaf_dtypes[rule.path] = np.dtype(dtype) if dtype is not None else found.pop()
    abstract = checkpoint.abstract_params(config)
    shapes = {r.path: (get_path(abstract, r.path)[0], leaf_dtypes[r.path]) for r in rules}
    total = sum(1 for _ in tensor_order(config, source, rules))
    with checkpoint.writing(output_dir, overwrite, inputs=[input_dir]) as draft:
        writer = ParamsWriter(draft.params_dir, shapes, stacked={r.path for r in rules if r.layered})
        sums = integrity.HostSums()
        for done, (rule, layer, name) in enumerate(tensor_order(config, source, rules), 1):
            try:
                ours = weights.tensor_to_ours(rule, src.read(name), config, source, name)
            except ValueError as e:
                raise ValueError(f"{src.file_of(name)}: {e}") from e
            ours = ours.astype(leaf_dtypes[rule.path], copy=False)
            writer.write(rule.path, ours, layer)
            sums.add(rule.path, ours, layer)
            if progress:
                progress(done, total)
        writer.close()
        draft.finish(config, sums.hexdigests(), checkpoint.tokenizer_files_in(input_dir))
        if source is Format.META:
            meta_params.keep_source(input_dir, draft.directory)
    return config


def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9 bytes, '500MB', '2GiB', or a plain number of bytes."""
    if isinstance(size, int):
        return size
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    number = s.rstrip("KMGIB")
    try:
        n = int(float(number) * units[s[len(number):]])
    except (KeyError, ValueError):  # no number, an unknown unit, nan
        n = 0
    if n <= 0:
        raise ValueError(f"size {size!r}: expected a positive number of bytes or e.g. '5GB', '500MB', '2GiB'")
    return n


def _meta_writers(out: Path, config: ModelConfig, dtypes: dict, *, shards: int, source_dir: Path, **_):
    specs = [{} for _ in range(shards)]
    for rule, _, name in tensor_order(config, Format.META):
        shape = weights.meta_shard_shape(rule, weights.torch_shape(rule, config), shards, config)
        for s in specs:
            s[name] = (shape, dtypes[rule.path])
    meta_params.write(out / "params.json", config, source_dir)
    writers = [TorchFileWriter(out / f"consolidated.{k:02d}.pth", s) for k, s in enumerate(specs)]

    def write(rule, name, w):
        for writer, piece in zip(writers, weights.split_meta_shards(rule, w, shards, config)):
            writer.write(name, piece)
    return writers, write


def _hf_writers(out: Path, config: ModelConfig, dtypes: dict, *, max_shard_size: str | int, **_):
    max_shard_size = parse_size(max_shard_size)
    groups, size = [[]], 0
    for rule, _, name in tensor_order(config, Format.HF):
        shape = weights.torch_shape(rule, config)
        nbytes = int(np.prod(shape)) * dtypes[rule.path].itemsize
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append((name, shape, dtypes[rule.path]))
        size += nbytes
    n = len(groups)
    files = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    writers, writer_of, total = [], {}, 0
    for fname, group in zip(files, groups):
        w = SafetensorsWriter(out / fname, {name: (shape, dt) for name, shape, dt in group})
        writers.append(w)
        for name, shape, dt in group:
            writer_of[name] = w
            total += int(np.prod(shape)) * dt.itemsize
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: Path(v.path).name for k, v in writer_of.items()}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = hf_config_of(config, _param_dtype(dtypes.values()))
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return writers, lambda rule, name, w: writer_of[name].write(name, w)


# (output folder, config, dtypes by path, options) -> (file writers, write(rule, name, tensor))
_WRITERS = {Format.META: _meta_writers, Format.HF: _hf_writers}


def from_orbax(target: Format | str, input_dir: str | os.PathLike, output_dir: str | os.PathLike, shards: int = 1,
               max_shard_size: str | int = "5GB", dtype=None, overwrite: bool = False,
               progress: Progress | None = None, generation=None) -> ModelConfig:
    """Write a params-only checkpoint or training step as Meta files (Format.META, "meta";
    `shards` of them) or a Hugging Face folder (Format.HF, "hf").

    `generation` ("3.1", ...) overrides the checkpoint's: it decides the params.json keys,
    the embedding's shard axis and the special token ids written."""
    target = Format.parse(target, "target")
    if target is Format.HF and shards != 1:
        raise ValueError("shards applies to Meta output only (use max_shard_size for Hugging Face)")
    if target is Format.META:
        import_torch(str(output_dir))  # consolidated.NN.pth are torch files: say so before any work
    d = checkpoint.resolve_checkpoint(input_dir)
    checkpoint.check_not_lora_step(d)
    config = checkpoint.read_config(d)
    if generation is not None:
        config = config.replace(generation=generation)
    reader = ParamsReader(d / checkpoint.PARAMS_DIR)
    checkpoint.check_params(config, unflatten(reader.shapes), str(d / checkpoint.PARAMS_DIR))
    dtypes = {r.path: np.dtype(dtype) if dtype is not None else reader.shapes[weights.stored_rule(r, config).path][1]
              for r in weights.file_rules(config, target)}
    total = sum(1 for _ in tensor_order(config, target))
    want, sums = integrity.stored(d), integrity.HostSums()
    with checkpoint.output_dir(output_dir, overwrite, inputs=[input_dir, d]) as tmp:
        writers, write = _WRITERS[target](tmp, config, dtypes, shards=shards, source_dir=d,
                                          max_shard_size=max_shard_size)
        for done, (rule, layer, name) in enumerate(tensor_order(config, target), 1):
            stored = weights.stored_rule(rule, config)  # a tied output is the embedding again
            ours = reader.read(stored.path, layer)
            sums.add(stored.path, ours, layer)  # (a slice read twice counts once)
            ours = ours.astype(dtypes[rule.path], copy=False)
            write(rule, name, weights.tensor_to_torch(stored, ours, config, target))
            if progress:
                progress(done, total)
        for w in writers:
            w.close()
        integrity.compare(d, want, sums.hexdigests())  # a damaged input leaves no output
        checkpoint.copy_tokenizer_files(d, tmp)
        if target is Format.HF:
            hf_tokenizer.write_export_files(tmp, config)
    return config
