"""Params-only checkpoints: save, find and load (onto a mesh) with the model config.

A params-only checkpoint directory holds
  model_config.json   ModelConfig.to_dict()
  params/             an Orbax PyTree checkpoint of the params in our stacked layout
  checksums.json      one checksum per array (llama_jax.checkpoint.integrity), verified on load
  tokenizer files     copied from the source, when known (tokenizer.model, tokenizer.json ...)
A training step directory (`WORKDIR/checkpoints/<step>/`) has the same two entries beside
its other items, so `load_checkpoint` reads a step, a workdir or its `checkpoints/`
directory (the latest step) as well.

This module owns the paths of checkpoints: every loader, CLI and converter resolves a
user's path through `resolve_checkpoint` (relative paths become absolute here: Orbax and
TensorStore want absolute ones), finds the tokenizer through `find_tokenizer_file`, and
writes through `output_dir` (refuses an output that is, contains or is inside an input).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llama_jax.checkpoint import integrity

from llama_jax.train import workdir_lock
from llama_jax import model as model_lib
from llama_jax.checkpoint import streaming as params_io
from llama_jax.config import ModelConfig
from llama_jax.errors import input_error

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_FILES = (TOKENIZER_MODEL, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def absolute(path: str | os.PathLike) -> Path:
    """`path` made absolute against the working directory (`~` expanded, symlinks kept)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _is_checkpoint(d: Path) -> bool:
    return (d / CONFIG_FILE).is_file() and (d / PARAMS_DIR).is_dir()


def _steps(d: Path) -> list[Path]:
    """Completed step directories (integer names; Orbax's temporary dirs have suffixes)."""
    return sorted((p for p in d.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The directory holding model_config.json and params/: `path` itself, or the latest
    step of a training workdir or of its checkpoints/ directory; always an absolute path."""
    d = absolute(path)
    if not d.is_dir():
        raise FileNotFoundError(f"not a llama_jax checkpoint: {d} does not exist or is not a directory")
    if _is_checkpoint(d):
        return d
    for root in (d / "checkpoints", d):
        steps = [s for s in _steps(root)] if root.is_dir() else []
        if steps:
            latest = steps[-1]
            if not _is_checkpoint(latest):
                raise ValueError(f"not a llama_jax checkpoint: latest step {latest} has no {CONFIG_FILE} "
                                 f"and {PARAMS_DIR}/ (expected {latest / CONFIG_FILE})")
            return latest
    raise ValueError(f"not a llama_jax checkpoint: no {CONFIG_FILE} and {PARAMS_DIR}/ in {d} "
                     f"(nor step directories in {d} or {d / 'checkpoints'})")


def find_tokenizer_file(path: str | os.PathLike, name: str = TOKENIZER_MODEL) -> Path | None:
    """The tokenizer file of the checkpoint at `path`, looked up as `resolve_checkpoint` looks
    up the params: in the resolved step (or params-only) directory, else in the training
    workdir above the step, else in `path` itself (any folder); None when there is none."""
    given = absolute(path)
    try:
        d = resolve_checkpoint(given)
    except (ValueError, OSError):
        dirs = [given]
    else:
        dirs = [d, d.parent.parent if d.parent.name == "checkpoints" else d, given]
    return next((x / name for x in dirs if (x / name).is_file()), None)


def check_output_apart(output: str | os.PathLike, inputs) -> None:
    """Refuse an output folder that is, contains or is inside one of `inputs` (symlinks
    resolved): replacing it would delete the input, or write into it."""
    out = Path(output).expanduser().resolve()
    for given in inputs:
        inp = Path(given).expanduser().resolve()
        how = ("is the input" if out == inp else "contains the input" if out in inp.parents
               else "is inside the input" if inp in out.parents else None)
        if how:
            raise input_error(output, f"the output folder {how} {given}; nothing was written",
                              "an output outside the input", str(out))


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, overwrite: bool = False, inputs=()):
    """Yield a temporary directory beside `path`; swap it in as `path` on success.

    A failed or interrupted write leaves no directory that looks like a checkpoint, and
    an existing `path` (with `overwrite`) stays whole until the new one is complete.
    `inputs`: folders the output must not be, contain or be inside (see check_output_apart).
    """
    check_output_apart(path, inputs)
    out = absolute(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir_lock.remove_stale_dirs(out.parent, f".{out.name}.tmp-")  # a killed earlier attempt's
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    held = workdir_lock.lock_dir(tmp)  # marks it as live for remove_stale_dirs
    try:
        yield tmp
        _swap_in(tmp, out)
    finally:
        if held is not None:
            os.close(held)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is moved aside first and deleted only once
    `new` is in place (a kill in between leaves it whole, as `.NAME.old-*`)."""
    if not os.path.lexists(out):
        new.rename(out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()  # a file, or a symlink: its target is left alone


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files found in `src` to `dst`; returns their names."""
    found = [n for n in TOKENIZER_FILES if (Path(src) / n).is_file()]
    for n in found:
        shutil.copyfile(Path(src) / n, Path(dst) / n)
    return found


def save_params(path: str | os.PathLike, params, config: ModelConfig, overwrite: bool = False,
                tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write a params-only checkpoint (model_config.json + params/) to `path`, atomically."""
    params = nn.unbox(params)
    found = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), params)
    check_params_tree(abstract_params(config), found, str(path))
    with output_dir(path, overwrite) as tmp:
        config.save(tmp / CONFIG_FILE)
        integrity.write(tmp, integrity.summarize({"params": params})[0])
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, params)
            ckptr.wait_until_finished()
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return Path(path)


def abstract_params(config: ModelConfig) -> dict:
    """Our params tree as {leaf: (shape, dtype)}, from eval_shape (no memory)."""
    return jax.tree.map(lambda x: (tuple(x.shape), x.dtype), nn.unbox(model_lib.param_shapes(config)))


def check_params_tree(expected: dict, found: dict, where: str) -> None:
    is_leaf = lambda x: isinstance(x, tuple)  # noqa: E731
    exp = {jax.tree_util.keystr(k): v[0] for k, v in jax.tree_util.tree_leaves_with_path(expected, is_leaf)}
    got = {jax.tree_util.keystr(k): v[0] for k, v in jax.tree_util.tree_leaves_with_path(found, is_leaf)}
    missing, unknown = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
    wrong = {k: (got[k], exp[k]) for k in sorted(set(exp) & set(got)) if tuple(got[k]) != tuple(exp[k])}
    if missing or unknown or wrong:
        raise ValueError(f"{where}: params do not match the model config: missing {missing}, unknown {unknown}, "
                         f"shape (found, expected) {wrong}")


def load_checkpoint(path: str | os.PathLike, dtype=None, mesh: jax.sharding.Mesh | None = None):
    """Load a params-only checkpoint or a training step -> (ModelConfig, params).

    With `mesh`, each array is restored straight onto its sharding from the logical axis
    rules (no host ever holds the full params); else onto the first local device.
    `dtype` casts on restore.
    """
    from llama_jax import sharding as sharding_lib  # jax mesh helpers; only needed here

    d = resolve_checkpoint(path)
    config = ModelConfig.load(d / CONFIG_FILE)
    stored = params_io.tree_metadata(d / PARAMS_DIR).tree  # no "Metadata file does not exist" warning
    stored = jax.tree.map(lambda m: (tuple(m.shape), m.dtype), dict(stored),
                          is_leaf=lambda x: hasattr(x, "shape"))
    check_params_tree(abstract_params(config), stored, str(d / PARAMS_DIR))
    if mesh is not None:
        shardings = sharding_lib.logical_to_shardings(model_lib.param_shapes(config), mesh)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, stored, is_leaf=lambda x: isinstance(x, tuple))
    cast = None if dtype is None else jnp.dtype(dtype)
    sums = integrity.stored(d)  # verified in the stored dtype, then cast
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s[0], s[1] if sums else cast or s[1], sharding=sh),
                          stored, shardings, is_leaf=lambda x: isinstance(x, tuple))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(d / PARAMS_DIR, target)
    if sums is not None:
        integrity.compare(d, sums, integrity.summarize({"params": params})[0])
        params = integrity.cast_leaves(params, cast)
    return config, params
