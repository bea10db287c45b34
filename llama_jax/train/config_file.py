"""Training config files (`configs/*.py`): loaded once, listed, overrides and values checked.

A config file is Python, as big_vision's are: `--config FILE` runs FILE's code with your
permissions. Use only config files you trust, as you would any script.

`load(spec)` runs `get_config()` of `FILE` or `FILE:ARG` once; `keys(cfg)` lists every dotted
key with its default; `help_lines(cfg)` adds the comment that documents each key;
`check_overrides` refuses an unknown `--config.KEY` in one line with the closest key;
`check_values` refuses values the trainer cannot run (a zero interval, a negative count).
"""
from __future__ import annotations

import importlib.util
import inspect
import math
import os
import re

import ml_collections

from llama_jax.errors import input_error

TRUST_NOTE = ("Config files are Python: --config runs the file's code with your permissions. "
              "Use only config files you trust.")


def load(spec: str) -> ml_collections.ConfigDict:
    """`get_config()` (or `get_config(ARG)` for `FILE:ARG`) of a config file, run once."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise input_error(f"--config {path}", "no such config file", "a configs/*.py file with get_config()", path)
    module_spec = importlib.util.spec_from_file_location("_train_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)  # runs the file: see the module docstring
        if not callable(getattr(module, "get_config", None)):
            raise input_error(path, "no get_config() function (a config file defines def get_config(): ...)")
        cfg = module.get_config(arg) if arg else module.get_config()
    except SyntaxError as e:
        raise input_error(f"{path}:{e.lineno}", f"config file is not valid Python ({e.msg})") from None
    except (ImportError, NameError, AttributeError, TypeError, KeyError) as e:  # the file's own bug
        raise input_error(path, f"running the config file failed: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise input_error(f"{path}: get_config()", "must return an ml_collections.ConfigDict", "ConfigDict",
                          type(cfg).__name__)
    return cfg


def keys(cfg, prefix: str = "") -> dict[str, object]:
    """Every leaf of `cfg` as {dotted key: value}, in the config's order."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(keys(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _comments(obj, pattern: str, prefix: str) -> dict[str, str]:
    """{prefix + name: trailing comment} from the source of `obj` (a function or class)."""
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        return {}
    return {prefix + m.group(1): m.group(2).strip() for m in re.finditer(pattern, source, re.M)}


def key_help() -> dict[str, str]:
    """The one-line help of each key: the comment beside its default in the library."""
    from llama_jax import config, runtime
    from llama_jax.train import optim
    from llama_jax.train import config as train_config
    assign, field = r"^\s*c\.([\w.]+)\s*=.*?#\s*(.+)$", r"^\s+(\w+):[^=\n]+=[^#\n]*#\s*(.+)$"
    out = _comments(config.ModelConfig, field, "model.")
    out.update(_comments(runtime.RunOptions, field, "run."))
    out.update(_comments(optim.OptimizerConfig, field, "optimizer."))
    out.update(_comments(train_config.base_config, assign, ""))
    return out


def help_lines(cfg) -> list[str]:
    """`KEY = DEFAULT  help` per key, aligned."""
    flat, helps = keys(cfg), key_help()
    shown = {k: repr(v.get() if isinstance(v, ml_collections.FieldReference) else v) for k, v in flat.items()}
    width = min(max((len(k) + len(v) for k, v in shown.items()), default=0) + 3, 48)
    return [f"  {f'{k} = {v}':<{width}} {helps.get(k, '')}".rstrip() for k, v in shown.items()]


def _is_known(key: str, flat: dict) -> bool:
    if key in flat or any(k.startswith(key + ".") for k in flat):  # a leaf, or a whole section
        return True
    # A dict-valued leaf (e.g. model.rope_scaling) takes sub-keys.
    return any(key.startswith(k + ".") and isinstance(_value(v), (dict, type(None))) for k, v in flat.items())


def _value(v):
    return v.get() if isinstance(v, ml_collections.FieldReference) else v


def override_keys(argv: list[str]) -> list[str]:
    """The KEYs of `--config.KEY[=VALUE]` arguments."""
    return [re.sub(r"^--?(no)?config\.", "", a).split("=", 1)[0] for a in argv
            if re.match(r"^--?(no)?config\.", a)]


def check_overrides(cfg, argv: list[str], spec: str) -> None:
    """One line for the first unknown `--config.KEY`, with the closest known key."""
    import difflib
    flat = keys(cfg)
    for key in override_keys(argv):
        if not _is_known(key, flat):
            close = difflib.get_close_matches(key, list(flat), n=1, cutoff=0.5)
            hint = f"did you mean --config.{close[0]}?" if close else "see --help for the keys"
            raise input_error(f"--config.{key}", f"unknown key of {spec} ({hint})")


# (key, smallest allowed value): intervals and counts the trainer divides by or indexes with.
_AT_LEAST = (("steps", 1), ("log_every", 1), ("checkpoint_every", 1), ("eval_every", 0), ("eval_batches", 0),
             ("keep_checkpoints", 1), ("batch_size", 1), ("seq_len", 1), ("micro_batches", 1),
             ("data.shards", 0), ("data.read_threads", 0), ("data.prefetch_buffer", 0),
             ("sample.max_new_tokens", 0), ("optimizer.warmup_steps", 0), ("optimizer.total_steps", 0))


def check_values(cfg) -> None:
    """Refuse values that would crash the run later (ZeroDivisionError, IndexError) or run
    nonsense: each with the key, the allowed range and the value."""
    flat = {k: _value(v) for k, v in keys(cfg).items()}
    for key, low in _AT_LEAST:
        v = flat.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            raise input_error(f"config.{key}", "out of range", f"an integer >= {low}", v)
    from llama_jax.train import config as train_config
    train_config.model_config(cfg)  # ModelConfig's, RunOptions' and OptimizerConfig's own checks, before any work
    train_config.run_options(cfg)
    train_config.optimizer_config(cfg)
    if flat["batch_size"] % flat["micro_batches"]:
        raise input_error("config.micro_batches", "must divide batch_size",
                          f"a divisor of {flat['batch_size']}", flat["micro_batches"])
    for key in ("optimizer.peak_lr", "optimizer.weight_decay", "optimizer.clip_norm", "sample.temperature"):
        v = flat.get(key)
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise input_error(f"config.{key}", "must be a finite number >= 0", ">= 0", v)


def usage(doc: str, spec: str | None, cfg, flags_help: str) -> str:
    """train.py's --help: the command, the trust note, the flags, then the config's keys."""
    out = [doc.strip(), "", TRUST_NOTE, "", "flags:", flags_help]
    if cfg is None:
        out += ["", "Give --config FILE with --help to list that file's keys, defaults and help."]
    else:
        out += ["", f"config keys of {spec} (override any with --config.KEY=VALUE):", *help_lines(cfg)]
    return "\n".join(out)
