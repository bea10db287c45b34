"""Shared helpers: random transformers Llama models and their weights in our layout."""
import numpy as np
import torch
import transformers

from llama_jax import ModelConfig

from llama_jax.interop import mapping as weights
from llama_jax.interop.formats import Format
from llama_jax.interop.hf_config import hf_config_of

torch.set_num_threads(2)


def hf_model(config: ModelConfig, seed: int = 0, attn: str = "eager") -> "transformers.LlamaForCausalLM":
    """A float32 LlamaForCausalLM with random weights (norm weights randomised too)."""
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(**hf_config_of(config), attn_implementation=attn)
    model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:  # std larger than HF's 0.02 init so logits are far from zero
                p.copy_(0.08 * torch.randn_like(p))
    return model


def state_dict_np(model) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def params_from_hf(model, config: ModelConfig) -> dict:
    return weights.from_state_dict(state_dict_np(model), config, Format.HF)


def hf_logits(model, tokens: np.ndarray, **kw) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), **kw).logits.float().numpy()


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: one number for 'how far', scaled by the values' size."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
