"""llama_jax: Meta's LLaMA in JAX/Flax, exact against the reference implementations.

The public names load on first use (PEP 562), so that `import llama_jax.errors` or a CLI's
`--help` does not import jax.
"""
import importlib

_EXPORTS = {
    "ModelConfig": "llama_jax.config", "RopeScaling": "llama_jax.config", "RunOptions": "llama_jax.runtime",
    "AttentionImpl": "llama_jax.runtime", "RematPolicy": "llama_jax.runtime", "Llama": "llama_jax.model",
    "init_cache": "llama_jax.inference.decode",
    "load_checkpoint": "llama_jax.checkpoint", "generate": "llama_jax.inference.generate",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llama_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
