"""llama_jax: Meta's LLaMA in JAX/Flax, exact against the reference implementations."""
from llama_jax.config import AttentionImpl, ModelConfig, RematPolicy, RopeScaling
from llama_jax.model import Llama, init_cache
from llama_jax.generate import generate
from llama_jax.checkpoint import load_checkpoint

__all__ = ["AttentionImpl", "ModelConfig", "RematPolicy", "RopeScaling", "Llama", "init_cache", "generate", "load_checkpoint"]
