"""Every test runs on CPU with 8 emulated devices, so mesh tests need no GPU.

The flags must be set before JAX initializes its backends, hence at import time of conftest.
"""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# Tests compile many small programs: skipping LLVM's optimizations cuts compile time about 3x.
if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
