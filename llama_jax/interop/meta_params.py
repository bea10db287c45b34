"""Meta's params.json: read (`config_from_meta`) and written (`meta_params_of`, `write`).

Meta's loaders build `ModelArgs(**params)`, and LLaMA 1/2/3 define ModelArgs as plain
dataclasses: a key their generation did not have is a TypeError there. So a Meta export
writes exactly the keys Meta shipped for the model's generation (`meta_params_of`),
and when the checkpoint came from Meta files, the source's params.json itself (kept beside
the converted checkpoint as `meta_params.json`), byte for byte, as long as it describes the
same architecture: its key order, `vocab_size: -1` and any optional keys survive the round trip.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from llama_jax import generations
from llama_jax.config import ModelConfig, RopeScaling
from llama_jax.errors import input_error
from llama_jax.generations import Generation

SOURCE_FILE = "meta_params.json"  # the source's params.json, kept in the Orbax checkpoint


def keep_source(meta_dir: str | Path, checkpoint_dir: str | Path) -> None:
    """Copy a Meta folder's params.json into a checkpoint being written."""
    shutil.copyfile(Path(meta_dir) / "params.json", Path(checkpoint_dir) / SOURCE_FILE)


def _source_text(config: ModelConfig, checkpoint_dir: Path) -> str | None:
    path = checkpoint_dir / SOURCE_FILE
    if not path.is_file():
        return None
    text = path.read_text()
    if not generations.fits_meta_keys(json.loads(text), config.generation):
        return None  # exported as another generation: write that generation's keys
    try:
        kept = config_from_meta(json.loads(text), vocab_size=config.vocab_size, source=str(path),
                                generation=config.generation, tied=config.tie_word_embeddings,
                                max_seq_len=config.max_seq_len)
    except ValueError:
        return None
    return text if kept.architecture == config.architecture else None


def write(path: str | Path, config: ModelConfig, checkpoint_dir: str | Path | None = None) -> None:
    """Write `config` as Meta's params.json: the kept source file if it still fits, else
    the generation's keys (meta_params_of)."""
    text = _source_text(config, Path(checkpoint_dir)) if checkpoint_dir is not None else None
    Path(path).write_text(text if text is not None else json.dumps(meta_params_of(config), indent=2))


def config_from_meta(params: dict, vocab_size: int | None = None, source: str = "params.json",
                     generation: Generation | str | None = None, tied: bool = False,
                     **execution: Any) -> ModelConfig:
    """Read Meta's params.json; `vocab_size` fills in its -1 ("from the tokenizer").

    `generation` overrides the one the keys say (generations.from_meta_params); `tied`
    says the weights have one embedding matrix for input and output.
    """
    p = dict(params)
    for k in ("dim", "n_layers", "n_heads", "norm_eps"):
        if k not in p:
            raise input_error(source, f"missing key {k!r}")
    known = set(generations.META_KEYS[Generation.LLAMA3_1]) | set(generations.META_ROPE_KEYS) | set(
        generations.META_IGNORED_KEYS)
    unknown = sorted(set(p) - known)
    if unknown:
        raise input_error(source, f"unknown key {unknown[0]!r}", f"one of Meta's keys {sorted(known)}")
    gen = generations.parse(generation) if generation is not None else generations.from_meta_params(p, tied)
    v = p.pop("vocab_size", -1)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
        raise input_error(f"{source}: vocab_size", "must be an integer (-1: from the tokenizer)", "an integer", v)
    if v is None or v < 0:
        v = vocab_size
    if v is None:
        raise input_error(source, "vocab_size is -1 (from the tokenizer): pass vocab_size")
    if vocab_size is not None and v != vocab_size:
        raise input_error(source, "vocab_size differs from the tokenizer/weights", vocab_size, v)
    factor, high = p.pop("rope_scaling_factor", None), p.pop("rope_high_freq_factor", None)
    if p.pop("use_scaled_rope", False):
        factor = factor or generations.ROPE_FACTOR.get(gen)
        if factor is None:
            raise input_error(source, f"use_scaled_rope is true but generation {gen.value} has no scaled "
                                      f"rope", "generation 3.1, 3.2 or 3.3")
        p["rope_scaling"] = RopeScaling(factor=float(factor), **({"high_freq_factor": float(high)} if high else {}))
    p.pop("max_batch_size", None)
    kw = {"max_seq_len": generations.CONTEXT[gen], **p, **execution}
    return ModelConfig.from_dict(dict(vocab_size=v, generation=gen, tie_word_embeddings=tied, **kw), source)


def meta_params_of(config: ModelConfig) -> dict:
    """params.json with exactly the keys Meta shipped for `generation` (generations.META_KEYS)."""
    g, where = config.generation, f"Meta params.json of generation {config.generation.value}"
    keys = generations.META_KEYS[g]
    if not g.llama3_family and config.rope_theta != 10000.0:
        raise input_error(where, "has no rope_theta key: export as generation 3 or later", 10000.0,
                          config.rope_theta)
    if g is Generation.LLAMA1 and (config.n_kv_heads is not None or config.ffn_dim_multiplier is not None):
        raise input_error(where, "has no n_kv_heads/ffn_dim_multiplier: export as generation 2 or later")
    p = {k: getattr(config, k) for k in keys if k != "use_scaled_rope"}
    if g is Generation.LLAMA2:  # its optional keys, where used (70B)
        p.update({k: getattr(config, k) for k in generations.META_OPTIONAL_KEYS if getattr(config, k) is not None})
    if g.llama3_family:
        p["n_kv_heads"] = config.kv_heads
        if config.ffn_dim_multiplier is None:
            del p["ffn_dim_multiplier"]
    if config.rope_scaling is not None:
        if not g.scaled_rope or config.rope_scaling != RopeScaling(factor=generations.ROPE_FACTOR[g]):
            raise input_error(where, "can only say use_scaled_rope (llama3 scaling with the generation's "
                              "factor); pass the right --generation", generations.ROPE_FACTOR.get(g),
                              config.rope_scaling)
    if g.scaled_rope:
        p["use_scaled_rope"] = config.rope_scaling is not None
    return p
