import os
import sys

# Tests run on the CPU, with 8 virtual devices for the sharding tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

# Exactness tests compare float32 results: keep GPUs from using TF32 matmuls.
jax.config.update("jax_default_matmul_precision", "highest")
