"""PyTorch checkpoint folders (Meta or Hugging Face) opened for tensor-by-tensor reading.

`open_source(fmt, dir)` (fmt a `Format`) reads the config file and every weight file's header, checks the
tensor names against the config, and returns a source whose `read(name)` gives one full
(merged, torch-layout) tensor as numpy.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from llama_jax.interop import mapping
from llama_jax.errors import input_error, read_json
from llama_jax.generations import Generation
from llama_jax.interop.formats import WEIGHT_DTYPES, Format
from llama_jax.interop.safetensors_files import SafetensorsFile
from llama_jax.interop.torch_files import TorchFile
from llama_jax.interop.meta_params import config_from_meta
from llama_jax.interop.hf_config import config_from_hf


class MetaSource:
    """params.json + consolidated.NN.pth (any number of model-parallel shards)."""

    fmt = Format.META

    def __init__(self, directory: str | Path, generation=None):
        d = Path(directory)
        if not (d / "params.json").is_file():
            raise FileNotFoundError(f"{d}: no params.json (a Meta checkpoint has params.json and consolidated.NN.pth)")
        paths = sorted(d.glob("consolidated.*.pth"))
        if not paths:
            raise FileNotFoundError(f"{d}: no consolidated.NN.pth files")
        indices = [int(m.group(1)) if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", p.name)) else -1 for p in paths]
        if sorted(indices) != list(range(len(paths))):
            raise ValueError(f"{d}: shard files {[p.name for p in paths]} are not consolidated.00 .. "
                             f"consolidated.{len(paths) - 1:02d} (a shard is missing or misnamed)")
        self.shards = [TorchFile(p) for p in paths]
        keys0 = set(self.shards[0].keys())
        for s in self.shards[1:]:
            if set(s.keys()) != keys0:
                diff = sorted(keys0 ^ set(s.keys()))
                raise ValueError(f"{s.path}: shards disagree in tensor names with {self.shards[0].path}: {diff[:8]}")
        params = read_json(d / "params.json")
        if not isinstance(params, dict):
            raise input_error(d / "params.json", "not a JSON object", "{dim, n_layers, ...}", type(params).__name__)
        args = dict(params=params, vocab_size=self._vocab_size(params), source=str(d / "params.json"),
                    generation=generation)
        self.config = config_from_meta(**args)
        if self._tied(keys0, explicit=generation is not None):
            self.config = config_from_meta(**args, tied=True)
        mapping.check_names(keys0, self.config, Format.META, source=str(self.shards[0].path))
        for s in self.shards:
            check_float_weights({n: s for n in keys0})

    def _tied(self, keys: set[str], explicit: bool) -> bool:
        """Meta's params.json does not say; Meta's model always has an output layer (loaded
        strictly), so Llama 3.2 files carry the embedding twice. Tied (Llama 3 on): output.weight
        equal to tok_embeddings.weight; a differing one is an error for a model said to be 3.2."""
        g = self.config.generation
        out, emb = mapping.OUTPUT.meta, mapping.EMBEDDING.meta
        if not g.llama3_family or out not in keys or emb not in keys:
            return False  # a missing tensor: check_names says so
        if self.shards[0].shape(out) != self.shards[0].shape(emb) and not (explicit and g is Generation.LLAMA3_2):
            return False
        same = np.array_equal(self.read(out), self.read(emb))
        if not same and explicit and g is Generation.LLAMA3_2:
            raise input_error(self.file_of(out), f"generation 3.2 ties the embeddings but {out} differs from {emb}")
        return same

    def _vocab_size(self, params: dict) -> int:
        name = mapping.EMBEDDING.meta
        if name not in self.shards[0].entries:
            raise ValueError(f"{self.shards[0].path}: missing tensor {name}")
        shapes = [s.shape(name) for s in self.shards]
        if len(shapes) > 1 and shapes[0][1] == params.get("dim"):  # LLaMA 3: split along the vocabulary
            return sum(s[0] for s in shapes)
        return shapes[0][0]

    def dtype(self, name: str) -> np.dtype:
        return self.shards[0].dtype(name)

    def read(self, name: str) -> np.ndarray:
        rule = mapping.rule_of(name, self.config, Format.META)
        if mapping.meta_merge_axis(rule, [s.shape(name) for s in self.shards], self.config) is None:
            return self.shards[0].read(name)  # replicated: shard 0 holds it whole
        return mapping.merge_meta_shards(rule, [s.read(name) for s in self.shards], self.config,
                                         f"{name} in {[Path(s.path).name for s in self.shards]}")

    def file_of(self, name: str) -> str:
        return self.shards[0].path if len(self.shards) == 1 else f"{Path(self.shards[0].path).parent}/consolidated.*.pth"


class HFSource:
    """config.json + model.safetensors / model-*.safetensors + index / pytorch_model*.bin."""

    fmt = Format.HF

    def __init__(self, directory: str | Path, generation=None):
        d = Path(directory)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{d}: no config.json (a Hugging Face checkpoint has config.json and weights)")
        self.config = config_from_hf(read_json(d / "config.json"), source=str(d / "config.json"),
                                                 generation=generation)
        self.files = {}  # tensor name -> opened file
        for path in _hf_weight_files(d):
            f = SafetensorsFile(path) if path.suffix == ".safetensors" else TorchFile(path)
            for name in f.keys():
                if name in self.files:
                    raise ValueError(f"{path}: tensor {name} also in {self.files[name].path}")
                self.files[name] = f
        mapping.check_names(self.files.keys(), self.config, Format.HF, source=str(d))
        check_float_weights(self.files)
        copy, emb = mapping.tied_copy_name(self.config, Format.HF), mapping.EMBEDDING.hf
        if copy in self.files and not np.array_equal(self.read(copy), self.read(emb)):
            raise input_error(self.file_of(copy), f"config.json has tie_word_embeddings true but {copy} "
                                                  f"differs from {emb}")

    def dtype(self, name: str) -> np.dtype:
        return self.files[name].dtype(name)

    def read(self, name: str) -> np.ndarray:
        return self.files[name].read(name)

    def file_of(self, name: str) -> str:
        return self.files[name].path


def _hf_weight_files(d: Path) -> list[Path]:
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (d / index).is_file():
            weight_map = read_json(d / index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise input_error(d / index, "no weight_map", '{"weight_map": {tensor: file}}', type(weight_map).__name__)
            files = [confined(d, f, d / index) for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{d / index}: lists files that do not exist: {missing}")
            return files
        if (d / single).is_file():
            return [d / single]
    raise FileNotFoundError(f"{d}: no weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])")


def confined(folder: Path, name: str, source) -> Path:
    """`folder / name`, refused unless it stays inside `folder` (no absolute paths, no `..`,
    no symlink leading out): an index file must not make us read files elsewhere."""
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or not name:
        raise input_error(source, "shard path leaves the model folder", "a file name inside the folder", name)
    root = folder.resolve()
    if not (folder / p).resolve().is_relative_to(root):
        raise input_error(source, "shard path leads out of the model folder (symlink)",
                          f"a file inside {root}", str((folder / p).resolve()))
    return folder / p


def check_float_weights(files: dict) -> None:
    """Every LLaMA weight is floating point: an integer tensor is refused (its bytes would be
    read as numbers of another kind, or it is a quantised format we do not read)."""
    for name, f in files.items():
        if f.dtype(name) not in WEIGHT_DTYPES:
            raise input_error(f"{f.path}: tensor {name}", "integer or bool dtype for a float weight",
                              "float16, bfloat16, float32 or float64", str(f.dtype(name)))


_SOURCES = {Format.META: MetaSource, Format.HF: HFSource}


def open_source(fmt: Format, directory: str | Path, generation=None):
    """A MetaSource or HFSource over `directory`; `generation` overrides the LLaMA generation
    the files say."""
    return _SOURCES[fmt](directory, generation=generation)
