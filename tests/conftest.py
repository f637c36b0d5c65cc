"""Every test runs on CPU with 8 emulated devices, so mesh tests need no GPU.

The flags must be set before JAX initializes its backends, hence at import time of conftest.
"""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
