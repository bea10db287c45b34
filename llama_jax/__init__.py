"""llama_jax: Meta's LLaMA in JAX/Flax, exact against the reference implementations.

The public names load on first use (PEP 562), so that `import llama_jax.errors` or a CLI's
`--help` does not import jax, and `python -m llama_jax.generate` does not find its own
module already imported by the package (runpy's RuntimeWarning).
"""
import importlib
import sys
import types

_EXPORTS = {
    "AttentionImpl": "llama_jax.config", "ModelConfig": "llama_jax.config", "RematPolicy": "llama_jax.config",
    "RopeScaling": "llama_jax.config", "Llama": "llama_jax.model", "init_cache": "llama_jax.model",
    "load_checkpoint": "llama_jax.checkpoint",
}
__all__ = [*_EXPORTS, "generate"]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llama_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


class _Package(types.ModuleType):
    """`llama_jax.generate` names the function, as `from llama_jax import generate` always
    did, even after the submodule of the same name is imported (which sets the attribute)."""

    @property
    def generate(self):
        from llama_jax.generate import generate
        return generate

    @generate.setter
    def generate(self, value):
        pass  # the import system storing the submodule: the function keeps the name


sys.modules[__name__].__class__ = _Package


def __dir__():
    return sorted(set(globals()) | set(__all__))
