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


import pytest  # noqa: E402


@pytest.fixture
def hopper_lowering(monkeypatch):
    """Lets Pallas kernels lower for CUDA on CPU, up to Triton IR (no PTX), as for a Hopper GPU:
    catches constructs the Triton lowering rejects that interpret mode accepts. Uses JAX
    internals, hence the skips."""
    try:
        from jax._src.pallas.triton import pallas_call_registration as registration
    except ImportError:
        pytest.skip("Pallas Triton lowering internals not importable")
    if not hasattr(registration, "gpu_info_lib"):
        pytest.skip("this JAX's Triton lowering has no gpu_info_lib to stub a Hopper GPU with")
    hopper = type("GpuInfo", (), {"compute_capability": 90})()
    monkeypatch.setattr(registration.gpu_info_lib, "get_gpu_info", lambda: hopper)
