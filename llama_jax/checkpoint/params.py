"""Params-only checkpoints: validate, write (from memory or streamed), load onto a mesh.

Every writer of the format goes through `writing` (a new checkpoint directory, swapped in
whole) and `files_beside_params` (model_config.json, checksums.json, tokenizer files):
`save_params` writes params from memory, the converters stream them (`ParamsWriter` into
`draft.params_dir`), and the trainer hands the same files to its step item. Every reader
checks the stored tree with `check_params`, the one validator of names and shapes.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llama_jax import model as model_lib
from llama_jax.checkpoint import integrity, streaming
from llama_jax.checkpoint.layout import (CONFIG_FILE, PARAMS_DIR, check_not_lora_step, resolve_checkpoint,
                                        tokenizer_files_in)
from llama_jax.checkpoint.output import output_dir
from llama_jax.config import ModelConfig


# ---------------------------------------------------------------- the config file

def config_json(config: ModelConfig) -> bytes:
    """The bytes of model_config.json for `config`."""
    return json.dumps(config.to_dict(), indent=2).encode()


def read_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored in checkpoint `directory` (a resolved one: see resolve_checkpoint)."""
    return ModelConfig.load(Path(directory) / CONFIG_FILE)


# ---------------------------------------------------------------- validation

def abstract_params(config: ModelConfig) -> dict:
    """Our params tree as {leaf: (shape, dtype)}, from eval_shape (no memory)."""
    return jax.tree.map(lambda x: (tuple(x.shape), x.dtype), nn.unbox(model_lib.param_shapes(config)))


def _is_shape_dtype(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _shapes(tree) -> dict[str, tuple]:
    """{"layers/attention/wq": shape} of a tree of arrays, ShapeDtypeStructs, Orbax metadata
    or (shape, dtype) leaves."""
    is_leaf = lambda x: _is_shape_dtype(x) or hasattr(x, "shape")  # noqa: E731
    leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(tree), is_leaf=is_leaf)
    return {_name(k): tuple(v[0] if _is_shape_dtype(v) else np.shape(v)) for k, v in leaves}


@functools.lru_cache(maxsize=16)
def _config_shapes(config: ModelConfig) -> dict[str, tuple]:
    return _shapes(abstract_params(config))  # an eval_shape of the model: cached per config


def check_params(config: ModelConfig, params, where: str | None = None, expected=None) -> None:
    """Raise ValueError unless `params` has exactly the names and shapes of `config`'s params.

    `params`: arrays, ShapeDtypeStructs, Orbax metadata or (shape, dtype) leaves; `expected`
    overrides the tree it is checked against (default `abstract_params(config)`, our stored
    layout; e.g. the runtime form of the params); `where` prefixes the message."""
    exp = _config_shapes(config) if expected is None else _shapes(expected)
    try:
        got = _shapes(params)
    except Exception:  # noqa: BLE001 - not a tree of arrays at all
        got = {}
    missing, unknown = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
    wrong = {k: (got[k], exp[k]) for k in sorted(set(exp) & set(got)) if got[k] != exp[k]}
    if missing or unknown or wrong:
        head = f"{where}: " if where else ""
        raise ValueError(f"{head}params do not match the model config ({config.n_layers} layers, dim {config.dim}, "
                         f"vocab {config.vocab_size}): missing {missing[:4]}, unknown {unknown[:4]}, "
                         f"shape (found, expected) {dict(list(wrong.items())[:4])}; "
                         "load params and config from the same checkpoint")


# ---------------------------------------------------------------- writing

def files_beside_params(config: ModelConfig, checksums: dict[str, str],
                        tokenizers: dict[str, str | os.PathLike] | None = None) -> dict[str, bytes]:
    """{name: bytes} of what a checkpoint holds beside params/: model_config.json,
    checksums.json and the tokenizer files ({stored name: source file}). A params-only
    checkpoint and a training step hold the same."""
    files = {CONFIG_FILE: config_json(config), integrity.FILE: integrity.file_bytes(checksums)}
    files.update({name: Path(src).read_bytes() for name, src in (tokenizers or {}).items()})
    return files


class Draft:
    """A checkpoint being written (see `writing`): params go into `params_dir`, then `finish`."""

    def __init__(self, directory: Path):
        self.directory, self.params_dir, self.finished = directory, directory / PARAMS_DIR, False

    def finish(self, config: ModelConfig, checksums: dict[str, str],
               tokenizers: dict[str, str | os.PathLike] | None = None) -> None:
        """Writes model_config.json, checksums.json and the tokenizer files beside params/."""
        for name, data in files_beside_params(config, checksums, tokenizers).items():
            (self.directory / name).write_bytes(data)
        self.finished = True


@contextlib.contextmanager
def writing(path: str | os.PathLike, overwrite: bool = False, inputs=()):
    """Yields a `Draft` of a new params-only checkpoint at `path`; it appears there, whole,
    when the body returns after `draft.finish(...)` (see output.output_dir)."""
    with output_dir(path, overwrite, inputs) as tmp:
        draft = Draft(tmp)
        yield draft
        if not draft.finished:
            raise RuntimeError(f"{path}: checkpoint written without {CONFIG_FILE} (Draft.finish never called)")


def save_params(path: str | os.PathLike, params, config: ModelConfig, overwrite: bool = False,
                tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write a params-only checkpoint (model_config.json + params/) to `path`, atomically."""
    params = nn.unbox(params)
    check_params(config, params, str(path))
    with writing(path, overwrite) as draft:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(draft.params_dir, params)
            ckptr.wait_until_finished()
        draft.finish(config, integrity.summarize({PARAMS_DIR: params})[0],
                     None if tokenizer_dir is None else tokenizer_files_in(tokenizer_dir))
    return Path(path)


# ---------------------------------------------------------------- loading

def _stored_tree(d: Path) -> dict:
    """{leaf: (shape, dtype)} of `d`/params/, from Orbax's metadata (no arrays read)."""
    try:
        # Asked of the handler: no "Metadata file does not exist" warning (streaming.tree_metadata).
        stored = streaming.tree_metadata(d / PARAMS_DIR).tree
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"{d / PARAMS_DIR}: not an Orbax params checkpoint (made by convert/to_orbax.py "
                         f"or save_params): {e}") from e
    return jax.tree.map(lambda m: (tuple(m.shape), m.dtype), dict(stored), is_leaf=lambda x: hasattr(x, "shape"))


def load_checkpoint(path: str | os.PathLike, dtype=None, mesh: jax.sharding.Mesh | None = None):
    """Load a params-only checkpoint or a training step -> (ModelConfig, params).

    `path` may name a training workdir or its checkpoints/ folder (the latest step).
    With `mesh`, each array is restored straight onto its sharding from the logical axis
    rules (no host ever holds the full params); else onto the first local device.
    `dtype` casts on restore.
    """
    from llama_jax import sharding as sharding_lib  # jax mesh helpers; only needed here

    d = resolve_checkpoint(path)
    check_not_lora_step(d)
    config = read_config(d)
    stored = _stored_tree(d)
    check_params(config, stored, str(d / PARAMS_DIR))
    if mesh is not None:
        shardings = sharding_lib.logical_to_shardings(model_lib.param_shapes(config), mesh)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, stored, is_leaf=_is_shape_dtype)
    cast = None if dtype is None else jnp.dtype(dtype)
    sums = integrity.stored(d)  # verified in the stored dtype, then cast
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s[0], s[1] if sums else cast or s[1], sharding=sh),
                          stored, shardings, is_leaf=_is_shape_dtype)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(d / PARAMS_DIR, target)
    if sums is not None:
        integrity.compare(d, sums, integrity.summarize({PARAMS_DIR: params})[0])
        params = integrity.cast_leaves(params, cast)
    return config, params
