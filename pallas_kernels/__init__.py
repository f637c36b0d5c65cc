"""Pallas kernels: one family per module, each with its plain-jnp `*_reference`."""

from pallas_kernels.flash_attention import (FlashConfig, KernelBlocks, default_config,
                                            flash_attention, flash_attention_reference)

__all__ = ["FlashConfig", "KernelBlocks", "default_config", "flash_attention",
           "flash_attention_reference"]
