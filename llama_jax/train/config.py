"""The training recipe as an ml_collections ConfigDict: defaults and typed readers.

`configs/*.py` start from `base_config()` and change what they need; `train.py` lets any
key be overridden as `--config.KEY=VALUE` (config_flags rejects unknown keys and wrong
types, listing the valid ones). Every ModelConfig field (the architecture) is a key under
`model`, filled from a preset, so `--config.model.n_layers=4` works like any other
override; how the run executes it (RunOptions: dtypes, remat, layer loop...) is under `run`,
e.g. `--config.run.dtype=float32`.
"""
from __future__ import annotations

import dataclasses
import enum
import typing

import ml_collections
from ml_collections import config_dict

from llama_jax.config import ModelConfig
from llama_jax.runtime import RunOptions
from llama_jax.train.optim import OptimizerConfig

def model_dict(preset: str, **overrides) -> ml_collections.ConfigDict:
    """All fields of `ModelConfig.preset(preset, **overrides)` as a ConfigDict, plus `preset`."""
    fields = ModelConfig.preset(preset, **overrides).to_dict()
    d = ml_collections.ConfigDict({"preset": preset})  # informational: the fields below are what is used
    for name, v in fields.items():
        setattr(d, name, _placeholder(name) if v is None else v)
    return d


def _placeholder(name: str):
    """A typed None: ml_collections needs a field's type to accept an override of a None value."""
    hint = typing.get_type_hints(ModelConfig)[name]  # e.g. int | None
    t = next(a for a in typing.get_args(hint) if a is not type(None))
    return config_dict.placeholder(dict if dataclasses.is_dataclass(t) else t)


def model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig a training config describes."""
    d = cfg.model.to_dict()
    d.pop("preset")
    return ModelConfig.from_dict(d, source="config.model")


def run_dict(**overrides) -> ml_collections.ConfigDict:
    """All fields of `RunOptions(**overrides)` as a ConfigDict (dtypes by name, enums by value)."""
    return ml_collections.ConfigDict(RunOptions(**overrides).to_dict())


def run_options(cfg: ml_collections.ConfigDict) -> RunOptions:
    """The RunOptions a training config describes."""
    return RunOptions.from_dict(cfg.run, source="config.run")


def optimizer_config(cfg: ml_collections.ConfigDict) -> OptimizerConfig:
    return OptimizerConfig.from_dict(cfg.optimizer)


def data_dict(sources: list[dict], tokenizer: str = "") -> ml_collections.ConfigDict:
    """`data`: DataConfig's fields plus `tokenizer` (a .model path; "": train one on the
    training sources with the model's vocab_size, saved in the workdir) and `shards`
    (input shards; 0: one per process. Fix it to resume on another process count)."""
    d = ml_collections.ConfigDict()
    d.tokenizer = tokenizer
    d.shards = 0
    d.sources = sources
    d.shuffle = True
    d.read_threads = 2
    d.prefetch_buffer = 256
    return d


def base_config() -> ml_collections.ConfigDict:
    """Defaults for every key; a config file changes some of them."""
    c = ml_collections.ConfigDict()
    c.steps = 1000               # optimizer updates to run (resume continues to this)
    c.log_every = 10
    c.eval_every = 200           # 0: never (an eval also runs at the last step)
    c.eval_batches = 4
    c.checkpoint_every = 500     # also saved at the last step and on SIGTERM/SIGINT
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.seed = 0
    c.mesh = (1, -1, 1)          # (data, fsdp, tensor); one -1 takes the remaining devices
    c.batch_size = 8             # global, in sequences
    c.seq_len = 256
    c.micro_batches = 1          # gradient accumulation: batch_size / micro_batches rows at a time
    c.model = model_dict("tiny")
    c.run = run_dict(dtype="bfloat16")  # compute dtype; params stay float32
    c.data = data_dict([{"kind": "stdlib", "split": "train"}])
    c.eval_data = ml_collections.ConfigDict({"sources": [{"kind": "stdlib", "split": "eval"}]})
    c.optimizer = ml_collections.ConfigDict(dataclasses.asdict(OptimizerConfig()))
    c.init_from = ""             # params-only checkpoint directory to fine-tune from
    c.peak_tflops = 0.0          # per device, for MFU; 0: look up the device kind
    c.sample = ml_collections.ConfigDict({"prompt": "def ", "max_new_tokens": 0, "temperature": 0.0})
    return c


def sources_list(data) -> list[dict]:
    """A DataConfig's sources as plain dicts (the `data.sources` value of a config)."""
    out = []
    for s in data.sources:
        d = dataclasses.asdict(s)
        out.append({k: v.value if isinstance(v, enum.Enum) else v for k, v in d.items() if v is not None})
    return out


def paper_config(preset: str, peak_lr: float, train_tokens: float) -> ml_collections.ConfigDict:
    """The paper's recipe (Table 2, section 2.2) for a preset: 4M-token batches (2048 x 2048),
    warmup 2000 + cosine to 10%, AdamW b2 0.95, wd 0.1, clip 1.0, bf16 compute, float32
    master weights and optimizer state, remat keeping the linear layers' outputs, and the
    layer loop unrolled (faster on GPUs; `--config.run.layer_loop=scan` compiles faster), and
    w1|w3 as one matmul with a one-kernel SwiGLU backward on GPUs (`fuse_gate_up`)."""
    c = base_config()
    c.batch_size = 2048
    c.seq_len = 2048
    c.steps = int(train_tokens // (c.batch_size * c.seq_len))
    c.log_every = 10
    c.eval_every = 1000
    c.eval_batches = 8
    c.checkpoint_every = 1000
    c.model = model_dict(preset)
    c.run = run_dict(dtype="bfloat16", param_dtype="float32", remat_policy="dots_flash",
                     layer_loop="unrolled", fuse_gate_up=True)
    c.optimizer.peak_lr = peak_lr
    c.data = data_dict([{"kind": "tfds", "name": "c4/en", "split": "train"}])
    c.eval_data.sources = [{"kind": "tfds", "name": "c4/en", "split": "validation"}]
    return c
