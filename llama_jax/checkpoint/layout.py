"""The names of the checkpoint format, and the paths a user gives for a checkpoint.

A params-only checkpoint directory holds
  model_config.json   the ModelConfig (`config_json`)
  params/             an Orbax PyTree checkpoint of the params in our stacked layout
  checksums.json      one checksum per array (llama_jax.checkpoint.integrity), verified on load
  tokenizer files     copied from the source, when known (tokenizer.model, tokenizer.json ...)
A training step directory (`WORKDIR/checkpoints/<step>/`) has the same entries beside its
other items, so a step, a workdir or its `checkpoints/` directory (the latest step) are
checkpoints too. Every file and directory name of the format is defined here, once.

Every loader, CLI and converter resolves a user's path through `resolve_checkpoint`
(relative paths become absolute here: Orbax and TensorStore want absolute ones) and finds
the tokenizer through `find_tokenizer_file` / `tokenizer_file`.
"""
from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
CHECKSUMS_FILE = "checksums.json"
CHECKPOINTS_DIR = "checkpoints"  # a training workdir's steps: WORKDIR/checkpoints/<step>/
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_FILES = (TOKENIZER_MODEL, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# A LoRA run's step holds this beside params/, which then holds the adapters only
# (llama_jax.train.checkpoint writes and reads it).
LORA_FILE = "lora.json"


def absolute(path: str | os.PathLike) -> Path:
    """`path` made absolute against the working directory (`~` expanded, symlinks kept)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def checkpoints_dir(workdir: str | os.PathLike) -> Path:
    """Where a training run in `workdir` keeps its steps (absolute)."""
    return absolute(workdir) / CHECKPOINTS_DIR


def _is_checkpoint(d: Path) -> bool:
    return (d / CONFIG_FILE).is_file() and (d / PARAMS_DIR).is_dir()


def _steps(d: Path) -> list[Path]:
    """Completed step directories (integer names; Orbax's temporary dirs have suffixes)."""
    return sorted((p for p in d.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def foreign_format(path: str | os.PathLike) -> str | None:
    """"meta" or "hf" for a folder of PyTorch (Meta, Hugging Face) weights, else None."""
    p = os.fspath(path)
    if glob.glob(os.path.join(p, "consolidated.*.pth")):
        return "meta"
    if glob.glob(os.path.join(p, "*.safetensors")) or glob.glob(os.path.join(p, "pytorch_model*.bin")):
        return "hf"
    return None


def _check_not_foreign(d: Path) -> None:
    source = foreign_format(d)
    if source:
        raise ValueError(f"{d} holds a {'Meta' if source == 'meta' else 'Hugging Face'} PyTorch checkpoint, "
                         f"not a llama_jax one; convert it first: python convert/to_orbax.py --source {source} "
                         f"--input {d} --output OUT_DIR")


def check_not_lora_step(d: str | os.PathLike) -> None:
    """Raise, saying how to merge, when the resolved checkpoint `d` is a LoRA run's step:
    its params/ holds adapters, not the model's params."""
    if (Path(d) / LORA_FILE).is_file():
        raise ValueError(f"{d}: a LoRA run's step ({LORA_FILE}): {PARAMS_DIR}/ holds only the adapters, not a "
                         "params-only checkpoint; merge them into their base first: "
                         f"python -c \"from llama_jax.train.checkpoint import merge_lora_step; "
                         f"merge_lora_step('{d}', 'OUT_DIR')\"")


def _existing_dir(path: str | os.PathLike) -> Path:
    d = absolute(path)
    if not d.is_dir():
        raise FileNotFoundError(f"not a llama_jax checkpoint: {d} does not exist or is not a directory")
    return d


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The directory holding model_config.json and params/: `path` itself, or the latest
    step of a training workdir or of its checkpoints/ directory; always an absolute path.
    A folder of PyTorch weights is named as such (convert it first)."""
    d = _existing_dir(path)
    if _is_checkpoint(d):
        return d
    _check_not_foreign(d)
    for root in (d / CHECKPOINTS_DIR, d):
        steps = _steps(root) if root.is_dir() else []
        if steps:
            latest = steps[-1]
            if not _is_checkpoint(latest):
                raise ValueError(f"not a llama_jax checkpoint: latest step {latest} has no {CONFIG_FILE} "
                                 f"and {PARAMS_DIR}/ (expected {latest / CONFIG_FILE})")
            return latest
    raise ValueError(f"not a llama_jax checkpoint: no {CONFIG_FILE} and {PARAMS_DIR}/ in {d} "
                     f"(nor step directories in {d} or {d / CHECKPOINTS_DIR})")


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
        dirs = [d, d.parent.parent if d.parent.name == CHECKPOINTS_DIR else d, given]
    return next((x / name for x in dirs if (x / name).is_file()), None)


def tokenizer_file(checkpoint: str | os.PathLike, explicit: str | os.PathLike | None = None) -> Path:
    """`explicit` (a user's --tokenizer), else the checkpoint's tokenizer.model
    (`find_tokenizer_file`); a clear error for a missing or PyTorch folder, or no tokenizer."""
    if explicit:
        return Path(explicit)
    d = _existing_dir(checkpoint)
    _check_not_foreign(d)
    path = find_tokenizer_file(d)
    if path is None:
        raise ValueError(f"{checkpoint}: no {TOKENIZER_MODEL} in the checkpoint or its training workdir: "
                         f"pass --tokenizer PATH/{TOKENIZER_MODEL}")
    return path


def tokenizer_files_in(directory: str | os.PathLike) -> dict[str, Path]:
    """{name: path} of the tokenizer files found in `directory` (kept with a checkpoint)."""
    return {n: Path(directory) / n for n in TOKENIZER_FILES if (Path(directory) / n).is_file()}


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files found in `src` to `dst` (e.g. an exported folder); returns their names."""
    found = tokenizer_files_in(src)
    for name, path in found.items():
        shutil.copyfile(path, Path(dst) / name)
    return list(found)
