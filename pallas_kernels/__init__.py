"""Pallas kernels: one family per module, each with its plain-jnp `*_reference`.

Import the module you need (`from pallas_kernels.flash_attention import flash_attention`):
nothing is imported here, so `import jaxlm.train` does not load the Triton or Mosaic GPU
lowerings until a kernel is used (the Triton form of Pallas is deprecated upstream).
"""
