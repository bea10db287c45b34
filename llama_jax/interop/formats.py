"""The variants interop speaks, and the facts shared by its readers and writers.

`Format` is the torch-side layout of a checkpoint: Meta's (params.json +
consolidated.NN.pth) or Hugging Face's (config.json + safetensors / pytorch_model.bin).
User strings become a `Format` once, at the API edge (`Format.parse`); below it nothing
compares format strings. The layouts themselves are described in docs/rotary_and_layouts.md.
"""
from __future__ import annotations

import enum

import ml_dtypes
import numpy as np

from llama_jax.errors import input_error


class Format(enum.Enum):
    META = "meta"  # params.json + consolidated.NN.pth, Meta's names, interleaved-pair rotary
    HF = "hf"      # config.json + safetensors/.bin, transformers' names, rotate-half rotary

    @classmethod
    def parse(cls, value: Format | str, where: str = "format") -> Format:
        """`value` as a Format; anything else is a one-line error naming the allowed values."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise input_error(where, "unknown checkpoint format", " or ".join(f.value for f in cls), value) from None


# The dtypes a LLaMA weight file may hold (anything else is refused: an integer tensor is
# a quantised format we do not read), and those our params may be stored in.
WEIGHT_DTYPES = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16))
PARAM_DTYPES = ("float32", "bfloat16", "float16")


def get_path(tree: dict, path: tuple[str, ...]):
    """The leaf of a nested dict at `path` (our params are keyed ("layers", "attention", "wq"))."""
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    """Set the leaf at `path`, creating the dicts on the way."""
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value
