"""The checkpoint format: one owner of its names, writers, readers and validator.

  layout     file and directory names; resolve_checkpoint, find_tokenizer_file, tokenizer_file
  params     check_params, save_params / writing (+ files_beside_params), load_checkpoint
  output     output_dir: outputs written whole or not at all
  integrity  checksums.json: one checksum per array, verified on load
  streaming  ParamsWriter / ParamsReader: Orbax params one layer slice at a time
The trainer (llama_jax.train.checkpoint), the converters (llama_jax.interop.convert) and every
loader call these; nobody else spells a file name of the format.
"""
import importlib

from llama_jax.checkpoint.layout import (
    CHECKPOINTS_DIR, CHECKSUMS_FILE, CONFIG_FILE, LORA_FILE, PARAMS_DIR, TOKENIZER_FILES, TOKENIZER_MODEL, absolute,
    check_not_lora_step, checkpoints_dir, copy_tokenizer_files, find_tokenizer_file, foreign_format, resolve_checkpoint, tokenizer_file,
    tokenizer_files_in)

# The rest loads on first use (PEP 562): the names of the format (layout, above) are read by
# command lines and the tokenizer export without importing jax and Orbax.
_LAZY = {name: "llama_jax.checkpoint.output" for name in ("check_output_apart", "output_dir")}
_LAZY.update({name: "llama_jax.checkpoint.params" for name in (
    "Draft", "abstract_params", "check_params", "config_json", "files_beside_params", "load_checkpoint",
    "read_config", "save_params", "writing")})


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'llama_jax.checkpoint' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "CHECKPOINTS_DIR", "CHECKSUMS_FILE", "CONFIG_FILE", "LORA_FILE", "PARAMS_DIR", "TOKENIZER_FILES", "TOKENIZER_MODEL", "Draft",
    "absolute", "abstract_params", "check_not_lora_step", "check_output_apart", "check_params", "checkpoints_dir", "config_json",
    "copy_tokenizer_files", "files_beside_params", "find_tokenizer_file", "foreign_format", "load_checkpoint",
    "output_dir", "read_config", "resolve_checkpoint", "save_params", "tokenizer_file", "tokenizer_files_in",
    "writing",
]
