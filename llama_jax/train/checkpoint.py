"""Train-state checkpoints: Orbax CheckpointManager, async, last N kept.

Layout of one step (`WORKDIR/checkpoints/<step>/`), item names in STEP_ITEMS:
  params/            the float32 parameters (StandardSave), sharded writes by every process
  opt_state/         the optax state
  fp8/               FP8 delayed-scaling runs only (FP8_ITEM): the amax histories (TrainState.fp8);
                     a delayed run resumed from a step without it starts them afresh; one
                     saved with another run.fp8_history is cut or zero-padded (newest kept)
  data/              data-iterator state, one JSON per input shard (`shard_<i>-of-<n>.json`)
  meta/              {"step": ...}
  model_config.json  checksums.json, tokenizer.model: the files a params-only checkpoint
                     holds beside params/ (llama_jax.checkpoint.files_beside_params), so that
                     `llama_jax.load_checkpoint(step_dir)` reads a training step directly.
                     The checksums cover params/, opt_state/ (and fp8/) and are verified on restore;
                     a step is saved only when its state is finite.
  lora.json          LoRA runs only (LORA_FILE): {"lora": LoraConfig's fields, "base": the
                     base checkpoint's absolute path ("" = random init from the seed)}; then
                     params/ and opt_state/ hold the adapters only, not a params-only checkpoint
  files/             (empty: the item whose handler writes the files above)
Orbax writes a step into a temporary directory and renames it when complete, so a kill
-9 at any moment leaves the previous steps intact; leftovers are cleaned on the next start.
Old steps are pruned by renaming them into `checkpoints/.deleted/` (atomic) and deleting
them there, so a kill while pruning never leaves a half-deleted step that looks like one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from llama_jax import checkpoint as ckpt_format
from llama_jax.checkpoint import integrity
from llama_jax.config import ModelConfig

log = logging.getLogger(__name__)
DELETED_DIR = ".deleted"  # pruned steps are renamed here, then removed
# Orbax items of a step (each its own directory); params/ is the params-only format's.
PARAMS_ITEM, OPT_STATE_ITEM, DATA_ITEM, META_ITEM = ckpt_format.PARAMS_DIR, "opt_state", "data", "meta"
FILES_ITEM = "files"
FP8_ITEM = "fp8"
LORA_FILE = ckpt_format.LORA_FILE
ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"  # Orbax's own file in each step (no public name for it)
# What a complete step holds (the files item writes nothing in its own directory).
STEP_ITEMS = (PARAMS_ITEM, OPT_STATE_ITEM, DATA_ITEM, META_ITEM, ckpt_format.CONFIG_FILE, ORBAX_STEP_METADATA)


def is_complete(step_dir: str | os.PathLike) -> bool:
    """Whether the step directory holds every one of STEP_ITEMS."""
    return all(os.path.exists(os.path.join(step_dir, item)) for item in STEP_ITEMS)


class DataStateHandler(ocp.CheckpointHandler):
    """Per-input-shard iterator states: each process writes and reads its own shards."""

    def save(self, directory: epath.Path, args: "DataStateSave"):
        for shard, state in args.states.items():
            (directory / f"shard_{shard}-of-{args.shard_count}.json").write_text(json.dumps(state))

    def restore(self, directory: epath.Path, args: "DataStateRestore") -> dict[int, Any]:
        out = {}
        for shard in args.shards:
            path = directory / f"shard_{shard}-of-{args.shard_count}.json"
            if not path.exists():
                raise FileNotFoundError(f"{path}: no data state for input shard {shard} of {args.shard_count} "
                                        f"(was the run saved with another data.shards?)")
            out[shard] = json.loads(path.read_text())
        return out

    def metadata(self, directory):
        return None


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    states: dict[int, Any]
    shard_count: int


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    shards: tuple[int, ...]
    shard_count: int


class StepFilesHandler(ocp.CheckpointHandler):
    """Writes small files into the step directory itself (beside params/).

    Why not an Orbax item such as JsonSave: every item gets its own directory
    (`<step>/<item>/...`), while the params-only format keeps model_config.json and
    checksums.json beside params/; a step must stay such a checkpoint. The item directory's
    parent is the step's temporary directory, renamed as a whole when the step completes:
    the files appear atomically with the rest of the step.
    """

    def save(self, directory: epath.Path, args: "StepFilesSave"):
        if jax.process_index() == 0:
            for name, data in args.files.items():
                (directory.parent / name).write_bytes(data)

    def restore(self, directory: epath.Path, args=None):
        return None

    def metadata(self, directory):
        return None


@ocp.args.register_with_handler(StepFilesHandler, for_save=True)
@dataclasses.dataclass
class StepFilesSave(ocp.args.CheckpointArgs):
    files: dict[str, bytes]


@ocp.args.register_with_handler(StepFilesHandler, for_restore=True)
@dataclasses.dataclass
class StepFilesRestore(ocp.args.CheckpointArgs):
    """Unused (the files are read directly); Orbax wants a restore type per handler."""


def make_manager(directory: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` keeping the last `keep` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save, todelete_subdir=DELETED_DIR)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, state, data_states: dict[int, Any], shard_count: int,
         config: ModelConfig, tokenizer_model: str | None = None, lora: dict | None = None) -> None:
    """Starts an (async) save of `state` at its step; every process must call it.
    `tokenizer_model`: the run's tokenizer file, kept in the step as tokenizer.model.
    `lora`: LORA_FILE's content (the state then holds adapters).

    Raises `integrity.NonFiniteState` (saving nothing) if any array holds NaN or inf."""
    step = int(state.step)
    sums, bad = integrity.summarize(_checked(state))
    if bad:
        raise integrity.NonFiniteState(f"step {step}: {len(bad)} arrays of the state hold NaN or inf "
                                       f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    tokenizers = {ckpt_format.TOKENIZER_MODEL: tokenizer_model} if tokenizer_model else None
    files = ckpt_format.files_beside_params(config, sums, tokenizers)
    if lora is not None:
        files[LORA_FILE] = json.dumps(lora, indent=1).encode()
    fp8 = {FP8_ITEM: ocp.args.StandardSave(state.fp8)} if state.fp8 else {}
    manager.save(step, args=ocp.args.Composite(**{
        PARAMS_ITEM: ocp.args.StandardSave(state.params),
        OPT_STATE_ITEM: ocp.args.StandardSave(state.opt_state),
        **fp8,
        DATA_ITEM: DataStateSave(data_states, shard_count),
        META_ITEM: ocp.args.JsonSave({"step": step}),
        FILES_ITEM: StepFilesSave(files),
    }), force=True)


def _checked(state) -> dict:
    """The arrays a step's checksums cover: params, optimizer state, and the fp8 state if any."""
    trees = {PARAMS_ITEM: state.params, OPT_STATE_ITEM: state.opt_state}
    if state.fp8:
        trees[FP8_ITEM] = state.fp8
    return trees


def lora_record(step_dir: str | os.PathLike) -> dict | None:
    """LORA_FILE of a step directory, None when the step is not a LoRA run's."""
    path = os.path.join(step_dir, LORA_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_lora_step(step_dir: str | os.PathLike):
    """(adapters, LoraConfig, base checkpoint path) of a LoRA run's step directory, on the
    host: for `interop.peft.save_peft` or `lora.merge` with the base's params."""
    from llama_jax.errors import input_error
    from llama_jax.lora import LoraConfig
    record = lora_record(step_dir)
    if record is None:
        raise input_error(str(step_dir), f"is not a LoRA run's step (no {LORA_FILE})")
    adapters = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(step_dir, PARAMS_ITEM)))
    return jax.device_get(adapters), LoraConfig(**record["lora"]), record["base"]


def merge_lora_step(step_dir: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False):
    """A params-only checkpoint at `output` of a LoRA run's step (a step, or a workdir's
    latest): its adapters merged into its base (`lora.merge`, in the base's stored dtype),
    the step's tokenizer files beside them; convert/from_orbax.py, generate and eval.py read
    it as any checkpoint. Returns its path."""
    from llama_jax.errors import input_error
    from llama_jax.lora import merge
    step_dir = ckpt_format.resolve_checkpoint(step_dir)
    adapters, lora, base = load_lora_step(step_dir)
    if not base:
        raise input_error(step_dir / LORA_FILE, "names no base checkpoint (the run started from random weights, "
                          "which only the run itself rebuilds)", "a base checkpoint path", base)
    config, params = ckpt_format.load_checkpoint(base)
    return ckpt_format.save_params(output, merge(params, adapters, lora), config, overwrite=overwrite,
                                   tokenizer_dir=step_dir)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, shardings, shards: tuple[int, ...],
            shard_count: int):
    """(state, data states) of `step`, each array restored directly onto `shardings`
    (which may describe another mesh than the one that saved it)."""
    def target(tree, shard_tree):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shard_tree)
    step_dir = os.path.join(str(manager.directory), str(step))
    # A delayed-scaling run's amax histories; a step saved without them (another scaling,
    # or before they existed) or with other call sites (fuse_gate_up toggled: w1_w3 against
    # w1 and w3) leaves them to start afresh: the first step calibrates them (train/state.py).
    with_fp8 = bool(abstract_state.fp8) and os.path.isdir(os.path.join(step_dir, FP8_ITEM))
    if with_fp8:
        saved = {k for k in integrity.stored(step_dir) or {} if k.startswith(FP8_ITEM + "/")}
        wanted = integrity.leaf_names(abstract_state.fp8, FP8_ITEM)
        if saved and saved != wanted:
            log.warning("%s: its FP8 amax histories are of other call sites (%s) than this run's (%s): all "
                        "histories start afresh", os.path.join(step_dir, FP8_ITEM), ", ".join(sorted(saved - wanted)),
                        ", ".join(sorted(wanted - saved)))
            with_fp8 = False
    # Histories as saved (their length may be another run.fp8_history): fitted after the checksums.
    saved_fp8 = _saved_histories(step_dir, abstract_state.fp8) if with_fp8 else None
    fp8 = {FP8_ITEM: ocp.args.StandardRestore(target(saved_fp8, shardings.fp8))} if with_fp8 else {}
    restored = manager.restore(step, args=ocp.args.Composite(**{
        PARAMS_ITEM: ocp.args.StandardRestore(target(abstract_state.params, shardings.params)),
        OPT_STATE_ITEM: ocp.args.StandardRestore(target(abstract_state.opt_state, shardings.opt_state)),
        **fp8,
        DATA_ITEM: DataStateRestore(tuple(shards), shard_count),
        META_ITEM: ocp.args.JsonRestore(),
    }))
    params, opt_state = restored[PARAMS_ITEM], restored[OPT_STATE_ITEM]
    if restored[META_ITEM]["step"] != step:
        raise ValueError(f"checkpoint {step}: meta says step {restored[META_ITEM]['step']}")
    if with_fp8:
        fp8_state = restored[FP8_ITEM]
    else:
        fp8_state = jax.tree.map(lambda a, s: jax.device_put(jax.numpy.zeros(a.shape, a.dtype), s),
                                 abstract_state.fp8, shardings.fp8)
    state = abstract_state.replace(
        step=jax.device_put(jax.numpy.asarray(step, jax.numpy.int32), shardings.step),
        params=params, opt_state=opt_state, fp8=fp8_state)
    integrity.verify(step_dir, _checked(state) if with_fp8 else {PARAMS_ITEM: params, OPT_STATE_ITEM: opt_state})
    had, keep = (jax.tree.leaves(t)[0].shape[-1] for t in (saved_fp8, abstract_state.fp8)) if with_fp8 else (0, 0)
    if had != keep:
        log.warning("%s: amax histories of %d steps, this run keeps %d (run.fp8_history): the newest %d carry "
                    "over", os.path.join(step_dir, FP8_ITEM), had, keep, min(had, keep))
        state = state.replace(fp8=fit_histories(fp8_state, abstract_state.fp8, shardings.fp8))
    return state, restored[DATA_ITEM]


def _saved_histories(step_dir: str, abstract_fp8):
    """`abstract_fp8` with the shapes the step's fp8/ item was saved with."""
    from llama_jax.checkpoint.streaming import tree_metadata
    saved = tree_metadata(os.path.join(step_dir, FP8_ITEM))
    saved = getattr(saved, "tree", saved)
    return jax.tree.map(lambda a, m: jax.ShapeDtypeStruct(tuple(m.shape), a.dtype), abstract_fp8, saved)


def fit_histories(fp8_state, abstract_fp8, shardings):
    """Amax histories resized to this run's length (the last axis): newest first (fp8._push),
    so a shorter one keeps the newest amaxes and a longer one is padded with zeros (no amax)."""
    def fit(h, a):
        n = a.shape[-1]
        h = h[..., :n]
        return jax.numpy.pad(h, [(0, 0)] * (h.ndim - 1) + [(0, n - h.shape[-1])])
    return jax.jit(lambda t: jax.tree.map(fit, t, abstract_fp8), out_shardings=shardings)(fp8_state)
