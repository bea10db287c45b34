"""Orbax PyTree checkpoints of params written and read one layer slice at a time.

Orbax saves whole pytrees from memory, and a stacked leaf ([L, ...]) is the size of all
layers of one weight. To stream, `ParamsWriter` lets Orbax write the checkpoint (tree
metadata, sharding file, zarr array metadata) from zero-strided numpy arrays (full
shape, one element of memory), chunked one layer per chunk, then overwrites each chunk
with the real layer through TensorStore, opening the very arrays Orbax created. Zero
chunks compress to almost nothing, so the first pass costs little. The result is an
ordinary Orbax checkpoint (no OCDBT, zarr) that plain `restore` reads on any sharding.

`ParamsReader` reads leaf slices of any Orbax PyTree checkpoint (OCDBT or not, zarr2 or
zarr3), e.g. a training step's `params/`, without restoring whole leaves.
"""
from __future__ import annotations

import collections
import os

import numpy as np
import orbax.checkpoint as ocp
from etils import epath
import tensorstore as ts
from orbax.checkpoint.serialization import tensorstore_utils as ts_public

Path = tuple[str, ...]
_SMALL_CHUNK = 64 << 20  # unstacked leaves: chunks of at most this many bytes
_MAX_IN_FLIGHT = 2       # layer writes allowed to overlap the next read


def _flat(tree, prefix=()) -> dict[Path, object]:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out


def unflatten(flat: dict[Path, object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree


def _leaf_spec(directory: str, name: str, use_ocdbt: bool, use_zarr3: bool) -> dict:
    """The TensorStore spec of leaf `name` of the Orbax PyTree checkpoint in `directory`.

    The one use of a private Orbax module, on purpose: Orbax (0.12.8) has no public API
    that writes or reads part of one leaf (a layer slice of a stacked [L, ...] array).
    `ocp.experimental.v1.partial.save` adds whole leaves per call (and its own layout);
    `type_handlers.get_json_tspec_read` is public but marked deprecated. This function is
    the only code that knows how Orbax lays out a leaf on disk (OCDBT or a zarr per leaf)."""
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
    kvstore = ts_utils.build_kvstore_tspec(directory, name, use_ocdbt=use_ocdbt)
    return {"driver": "zarr3" if use_zarr3 else "zarr", "kvstore": kvstore}


def _open_leaves(directory: str, names: dict[Path, str], use_ocdbt: bool, use_zarr3: bool, **kw):
    context = ts_public.get_ts_context(use_ocdbt=use_ocdbt)
    return {path: ts.open(_leaf_spec(directory, name, use_ocdbt, use_zarr3), open=True, context=context,
                          **kw).result()
            for path, name in names.items()}


class ParamsWriter:
    """Writes a params tree {path: (shape, dtype)} to the Orbax checkpoint `directory`.

    `stacked` names the leaves whose axis 0 is the layer axis; they are written with
    `write(path, array, layer=i)`, the others whole with `write(path, array)`. `close()`
    waits for the writes and fails unless every leaf (every layer) was written.
    """

    def __init__(self, directory: str | os.PathLike, shapes: dict[Path, tuple[tuple[int, ...], np.dtype]],
                 stacked: set[Path]):
        self.directory = str(directory)
        self.shapes = {p: (tuple(s), np.dtype(d)) for p, (s, d) in shapes.items()}
        zeros, save_args = {}, {}
        for path, (shape, dtype) in self.shapes.items():
            zeros[path] = np.broadcast_to(np.zeros((), dtype), shape)
            if path in stacked:  # one chunk per layer: each layer write replaces whole chunks
                layer_bytes = int(np.prod(shape[1:])) * dtype.itemsize
                save_args[path] = ocp.SaveArgs(chunk_byte_size=max(layer_bytes, 1), shard_axes=(0,))
            else:
                save_args[path] = ocp.SaveArgs(chunk_byte_size=_SMALL_CHUNK)
        # Orbax deep-copies numpy leaves before an async save by default, which would turn
        # each zero-strided leaf into a full array: a registry whose handler does not copy.
        registry = ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
        handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False, type_handler_registry=registry)
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(self.directory, args=ocp.args.PyTreeSave(unflatten(zeros), save_args=unflatten(save_args)))
        names = {p: ".".join(p) for p in self.shapes}  # Orbax's leaf directory names
        self._arrays = _open_leaves(self.directory, names, use_ocdbt=False, use_zarr3=False)
        for path, arr in self._arrays.items():  # guard against a change in Orbax's naming
            if tuple(arr.shape) != self.shapes[path][0]:
                raise RuntimeError(f"{self.directory}: leaf {path} opened with shape {arr.shape}")
        self._todo = {p: set(range(s[0])) if p in stacked else {None} for p, (s, _) in self.shapes.items()}
        self._in_flight: collections.deque = collections.deque()

    def write(self, path: Path, array: np.ndarray, layer: int | None = None) -> None:
        shape, dtype = self.shapes[path]
        want = shape[1:] if layer is not None else shape
        if tuple(array.shape) != want or array.dtype != dtype:
            raise ValueError(f"{self.directory}: leaf {'/'.join(path)} layer {layer}: got {array.shape} "
                             f"{array.dtype}, expected {want} {dtype}")
        target = self._arrays[path] if layer is None else self._arrays[path][layer]
        self._in_flight.append((target.write(array), array))  # keep the source alive until written
        while len(self._in_flight) > _MAX_IN_FLIGHT:
            self._in_flight.popleft()[0].result()
        self._todo[path].discard(layer)

    def close(self) -> None:
        while self._in_flight:
            self._in_flight.popleft()[0].result()
        missing = {"/".join(p): sorted(v, key=str)[:4] for p, v in self._todo.items() if v}
        if missing:
            raise ValueError(f"{self.directory}: leaves (layers) never written: {missing}")


def tree_metadata(directory: str | os.PathLike):
    """Orbax's tree metadata (names, shapes, dtypes) of the PyTree checkpoint in `directory`.

    Asked of the handler, not a Checkpointer: a Checkpointer also looks for step metadata
    in `directory`, which a training step keeps one level up, and warns on every load."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.metadata(epath.Path(os.path.abspath(directory)))
    finally:
        handler.close()


class ParamsReader:
    """Reads leaves or layer slices of an Orbax PyTree checkpoint as numpy arrays."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = str(directory)
        meta = tree_metadata(self.directory)
        flat = _flat(dict(meta.tree))
        self.shapes = {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in flat.items()}
        use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(self.directory)
        self._arrays = _open_leaves(self.directory, {p: m.name for p, m in flat.items()},
                                    use_ocdbt=use_ocdbt, use_zarr3=bool(meta.use_zarr3), read=True)

    def read(self, path: Path, layer: int | None = None) -> np.ndarray:
        arr = self._arrays[path] if layer is None else self._arrays[path][layer]
        return np.asarray(arr.read().result())
