"""Meta's `ModelArgs`, per LLaMA generation, as Meta's reference code defines them.

Facts, not our code: the fields and defaults of the dataclass each generation's loader
builds with `ModelArgs(max_seq_len=..., max_batch_size=..., **json.load(params.json))`:
- LLaMA 1: facebookresearch/llama, first release (llama/model.py);
- Llama 2: facebookresearch/llama, July 2023 (llama/model.py): + n_kv_heads, ffn_dim_multiplier;
- Llama 3: meta-llama/llama3 (llama/model.py): + rope_theta;
- Llama 3.1 (and 3.2, 3.3, which use the same code): meta-llama/llama-models
  (models/llama3_1/api/args.py): + use_scaled_rope. That one sets only known attributes in
  its own `__init__` (unknown keys are skipped, not rejected), as copied here.
LLaMA 1/2/3 are plain dataclasses: an unknown key is a TypeError.
"""
from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelArgsLlama1:
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    vocab_size: int = -1  # defined later by tokenizer
    multiple_of: int = 256
    norm_eps: float = 1e-5

    max_batch_size: int = 32
    max_seq_len: int = 1024


@dataclass
class ModelArgsLlama2:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5

    max_batch_size: int = 32
    max_seq_len: int = 2048


@dataclass
class ModelArgsLlama3:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000

    max_batch_size: int = 32
    max_seq_len: int = 2048


@dataclass
class ModelArgsLlama31:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000
    use_scaled_rope: bool = False

    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __init__(self, **kwargs):
        for k, v in kwargs.items():
            if hasattr(self, k):
                setattr(self, k, v)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        assert self.n_kv_heads <= self.n_heads
        assert self.n_heads % self.n_kv_heads == 0
        assert self.dim % self.n_heads == 0


MODEL_ARGS = {"1": ModelArgsLlama1, "2": ModelArgsLlama2, "3": ModelArgsLlama3,
              "3.1": ModelArgsLlama31, "3.2": ModelArgsLlama31, "3.3": ModelArgsLlama31}

# params.json as Meta published them (one per generation; 3.2: Llama-3.2-1B's).
PUBLISHED_PARAMS = {
    "1": {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06, "vocab_size": -1},
    "2": {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
          "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1},
    "3": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
          "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0},
    "3.1": {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
            "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256},
    "3.2": {"dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256, "n_heads": 32, "n_kv_heads": 8,
            "n_layers": 16, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256},
    "3.3": {"dim": 8192, "ffn_dim_multiplier": 1.3, "multiple_of": 4096, "n_heads": 64, "n_kv_heads": 8,
            "n_layers": 80, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256},
}
