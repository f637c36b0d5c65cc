"""Stateless building blocks of the Transformer: RMSNorm, rotary embeddings, SwiGLU.

All functions are pure and take their weights as arguments; parameter declaration lives in
model.py. Norms are computed in float32 whatever the compute dtype, then cast back.

RoPE layout: the "rotate half" convention (Hugging Face Llama/Qwen/Mistral), where dim i pairs
with dim i + H/2, not with dim i + 1 (the GPT-J / Meta interleaved layout). Using the same layout
as HF means checkpoints load without permuting q/k weights.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxlm.config import RopeScaling


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * scale over the last dim (Zhang & Sennrich 2019)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float,
                             scaling: Optional[RopeScaling] = None) -> np.ndarray:
    """theta^(-2i/H) for i < H/2, optionally with Llama 3's wavelength-dependent scaling.

    Llama 3 (Meta, 2024): wavelengths longer than original_len/low_freq_factor are divided by
    `factor`, shorter than original_len/high_freq_factor are kept, and the band between is
    interpolated smoothly.
    """
    inverse = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inverse.astype(np.float32)
    low_wavelength = scaling.original_max_seq_len / scaling.low_freq_factor
    high_wavelength = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelength = 2 * math.pi / inverse
    scaled = np.where(wavelength > low_wavelength, inverse / scaling.factor, inverse)
    smooth = (scaling.original_max_seq_len / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    interpolated = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
    return np.where(medium, interpolated, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inverse_frequencies: np.ndarray) -> jax.Array:
    """Rotate x [B, T, heads, H] by angle position * frequency; positions [B, T] int."""
    angles = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(inverse_frequencies)  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """down(silu(x @ gate) * (x @ up)) (Shazeer 2020, "GLU Variants Improve Transformer")."""
    hidden = jax.nn.silu(jnp.einsum("btd,df->btf", x, gate)) * jnp.einsum("btd,df->btf", x, up)
    hidden = checkpoint_name(hidden, "mlp_hidden")  # ModelConfig.remat_save
    return jnp.einsum("btf,fd->btd", hidden, down)
