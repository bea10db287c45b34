"""Checkpoint integrity: a 64-bit positional checksum per array, and an all-finite check.

Every checkpoint we write carries `checksums.json` beside `params/`: one checksum per
array (params, and opt_state in training steps), named by its path in the tree
("params/layers/attention/wq"). Loading verifies each restored array against it, so a
deleted chunk (restored as zeros), flipped bytes or a truncated file is reported with the
array's name instead of being trained on, sampled from or exported.

The checksum (docs/checkpoint_integrity.md) is a sum over elements, modulo 2**32, of the
element's bits times an odd hash of its coordinates, in two lanes (the second of the
bits rotated and mixed). A sum is independent
of how the array is split, so it is computed on device over a sharded array (one fused
pass, no gather to a host), and on host over layer slices as converters stream them, with
the same result. Any change of a single element changes each lane (odd multipliers are
invertible modulo 2**32).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.checkpoint.layout import CHECKSUMS_FILE, PARAMS_DIR
from llama_jax.errors import InputError

log = logging.getLogger(__name__)

FILE = CHECKSUMS_FILE
ALGORITHM = "llama_jax-possum64-v1"
_warned: set[str] = set()


class CheckpointDamaged(InputError):
    """A stored array does not match its checksum (or could not be read)."""


class NonFiniteState(RuntimeError):
    """Arrays about to be saved hold NaN or inf."""


def _mix(h):
    # murmur3's 32-bit finaliser: every input bit affects every output bit.
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _lanes(x, coords):
    """(lane 1, lane 2) of array `x` whose elements sit at the uint32 coordinates `coords`
    (one per axis of the full array, each broadcastable to x: scalars for the axes a slice
    fixes, iotas shaped [1, .., n, .., 1] for the others)."""
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    else:
        words = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
        words = words.astype(jnp.uint32)
    # Row hash from the leading coordinates, column hash from the last: the per-element
    # work is a product of two small broadcast arrays, not a hash of every coordinate.
    row = jnp.uint32(0x9E3779B9)
    for c in coords[:-1]:
        row = _mix(row ^ c)
    col = coords[-1] if coords else jnp.uint32(0)
    m1 = (row | 1) * (_mix(col ^ jnp.uint32(0x7F4A7C15)) | 1)
    m2 = (_mix(row + jnp.uint32(0x632BE5AB)) | 1) * (_mix(col ^ jnp.uint32(0x2545F491)) | 1)
    rot = (words << 16) | (words >> 16)
    return jnp.stack([jnp.sum(words * m1, dtype=jnp.uint32), jnp.sum((rot ^ m2) * m2, dtype=jnp.uint32)])


def _iotas(shape, offset):
    lead = [offset[i] for i in range(offset.shape[0])]
    return lead + [jax.lax.broadcasted_iota(jnp.uint32, [n if b == a else 1 for b in range(len(shape))], a)
                   for a, n in enumerate(shape)]


@jax.jit
def _slice_sums(x, offset):
    return _lanes(x, _iotas(x.shape, offset))


def host_sum(x: np.ndarray, offset: tuple[int, ...] = ()) -> np.ndarray:
    """The two lanes (uint32 [2]) of `x`, a slice of a larger array starting at `offset`
    (leading axes of the full array indexed by `offset`, e.g. (layer,) for a layer slice).
    Computed by XLA on the CPU: the same code as on device, one fused pass."""
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu: the default device then
        cpu = jax.devices()[0]
    return np.asarray(_slice_sums(jax.device_put(np.asarray(x), cpu),
                                  jax.device_put(np.asarray(offset, np.uint32).reshape(-1), cpu)))


def _device_summary(x):
    sums = _lanes(x, _iotas(x.shape, jnp.zeros((0,), jnp.uint32)))
    finite = jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return sums, finite


def leaf_names(tree, prefix: str) -> set[str]:
    """The names `summarize` gives the leaves of `tree` under `prefix` (as checksums.json keys them)."""
    return set(_named_leaves(tree, prefix))


def _named_leaves(tree, prefix: str) -> dict[str, object]:
    def name(path):
        return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    return {f"{prefix}/{name(p)}": x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def summarize(trees: dict) -> tuple[dict[str, str], list[str]]:
    """({name: checksum hex}, [names of non-finite arrays]) of jax arrays, computed on device
    in one jitted pass (arrays may be sharded over several processes)."""
    leaves = {}
    for prefix, tree in trees.items():
        leaves.update(_named_leaves(tree, prefix))
    out = _summary_fn(leaves)
    sums = {k: _hex(_local(v[0])) for k, v in out.items()}
    return sums, sorted(k for k, v in out.items() if not bool(_local(v[1])))


_summary_fn = jax.jit(lambda leaves: {k: _device_summary(v) for k, v in leaves.items()})


def _local(x) -> np.ndarray:
    # The results are replicated: any process reads its own copy.
    return np.asarray(x.addressable_data(0) if hasattr(x, "addressable_data") else x)


def _hex(lanes: np.ndarray) -> str:
    return "".join(f"{int(v):08x}" for v in np.asarray(lanes, np.uint32))


def file_bytes(sums: dict[str, str]) -> bytes:
    return json.dumps({"algorithm": ALGORITHM, "arrays": sums}, indent=1).encode()


def stored(directory: str | os.PathLike) -> dict[str, str] | None:
    """The checksums written with the checkpoint in `directory`; None (warned once) for a
    checkpoint written before checksums existed."""
    path = Path(directory) / FILE
    if not path.is_file():
        if str(directory) not in _warned:
            _warned.add(str(directory))
            log.warning("%s: no %s (written by an older llama_jax): its arrays are not verified", directory, FILE)
        return None
    try:
        d = json.loads(path.read_text())
        if d.get("algorithm") != ALGORITHM:
            raise ValueError(f"algorithm {d.get('algorithm')!r}")
        return dict(d["arrays"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointDamaged(f"{path}: unreadable ({e}); expected {ALGORITHM} checksums") from None


def compare(directory: str | os.PathLike, want: dict[str, str] | None, got: dict[str, str]) -> None:
    """Raises CheckpointDamaged naming the first array (and its directory) whose checksum differs."""
    if want is None:
        return
    for name in sorted(got):
        if name not in want:
            raise CheckpointDamaged(f"{directory}/{FILE}: no checksum for {name} (the file is damaged or stale)")
        if want[name] != got[name]:
            root, _, leaf = name.partition("/")
            raise CheckpointDamaged(
                f"{Path(directory) / root / leaf.replace('/', '.')}: array {name} is damaged "
                f"(checksum {got[name]}, expected {want[name]} from {FILE})")


def verify(directory: str | os.PathLike, trees: dict) -> None:
    """Checks restored jax arrays `trees` ({"params": ..., ...}) against `directory`'s checksums."""
    want = stored(directory)
    if want is not None:
        compare(directory, want, summarize(trees)[0])


def cast_leaves(tree, dtype):
    """`tree` with every leaf cast to `dtype` (None: unchanged), freeing each original as it goes."""
    if dtype is None:
        return tree

    def cast(x):
        if x.dtype == dtype:
            return x
        y = x.astype(dtype)
        x.delete()
        return y
    return jax.tree.map(cast, tree)


class HostSums:
    """Checksums accumulated from numpy slices (converters stream one layer at a time)."""

    def __init__(self, prefix: str = PARAMS_DIR):
        self.prefix, self._sums, self._seen = prefix, {}, set()

    def add(self, path: tuple[str, ...], array: np.ndarray, layer: int | None = None) -> None:
        """Adds a leaf (`layer` None) or one layer slice of it; a slice added again is ignored."""
        name = f"{self.prefix}/{'/'.join(path)}"
        if (name, layer) in self._seen:
            return
        self._seen.add((name, layer))
        with np.errstate(over="ignore"):  # sums modulo 2**32
            self._sums[name] = self._sums.get(name, np.zeros(2, np.uint32)) + host_sum(
                array, () if layer is None else (layer,))

    def hexdigests(self) -> dict[str, str]:
        return {k: _hex(v) for k, v in self._sums.items()}
