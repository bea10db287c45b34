"""Meta's params.json on export: the source's own file when it still describes the model.

Meta's loaders build `ModelArgs(**params)`, and LLaMA 1/2/3 define ModelArgs as plain
dataclasses: a key their generation did not have is a TypeError there. So a Meta export
writes exactly the keys Meta shipped for the model's generation (`ModelConfig.to_meta_params`),
and when the checkpoint came from Meta files, the source's params.json itself (kept beside
the converted checkpoint as `meta_params.json`), byte for byte, as long as it describes the
same architecture: its key order, `vocab_size: -1` and any optional keys survive the round trip.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from llama_jax import generations
from llama_jax.config import ModelConfig

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
        kept = ModelConfig.from_meta_params(json.loads(text), vocab_size=config.vocab_size, source=str(path),
                                            generation=config.generation, tied=config.tie_word_embeddings,
                                            max_seq_len=config.max_seq_len)
    except ValueError:
        return None
    return text if kept.architecture == config.architecture else None


def write(path: str | Path, config: ModelConfig, checkpoint_dir: str | Path | None = None) -> None:
    """Write `config` as Meta's params.json: the kept source file if it still fits, else
    the generation's keys (ModelConfig.to_meta_params)."""
    text = _source_text(config, Path(checkpoint_dir)) if checkpoint_dir is not None else None
    Path(path).write_text(text if text is not None else json.dumps(config.to_meta_params(), indent=2))
