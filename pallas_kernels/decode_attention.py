"""Split-K decode attention (flash decoding) in Pallas, with a jnp reference: a Triton kernel
(here, the default) for every case, and on request (backend="mosaic") the Mosaic GPU kernel of
decode_attention_mosaic.py for the cases it takes (Hopper; bf16/fp16, head_dim 64 or 128, up
to 64 query rows a kv head, no int8), slower than this one today.

Layouts follow jaxlm/kv_cache.py: q [B, T, N, H] holds the T new tokens of each sequence (1 for a
decode step, gamma + 1 for speculative verification); k, v [B, K, S, H] is one layer of the cache,
which already contains those T tokens. G = N // K query heads share a kv head. Masking, True =
attend, bottom-right causal per sequence:
    q_pos[b, t] = q_offsets[b] + t       k_pos[s] = s
    causal:          k_pos <= q_pos       (slots past a sequence's length are never read)
    sliding_window:  q_pos - k_pos < window
Every query sees at least its own slot, so no row is empty.

Algorithm (Dao et al. 2023, "Flash-Decoding for long-context inference"): decoding has one query
per sequence, too few rows to fill a GPU with flash attention's one-program-per-query-block grid.
Here the grid is (B, K, splits): each program takes the G query heads of one kv head for all T
tokens, stacked into one [T * G, H] tile (rows r = t * G + g), so each K/V byte is read once for
all heads that share it, and streams one contiguous chunk of S / splits keys with an online
softmax (base 2), writing an unnormalized-free partial output and its logsumexp. A small jnp
combine rescales the partials: out = sum_i 2^(lse_i - lse) o_i with lse = log2 sum_i 2^lse_i.
Key blocks past the last visible slot of a sequence are skipped through the loop bound, so the
work is proportional to each sequence's own length, not S.

int8 caches: pass k_scale, v_scale [B, K, S] (float32, per token and kv head, kv_cache.py); the
kernel reads int8 and dequantizes in registers, halving the bytes of a bf16 cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
# NOTE: finite on purpose: a split with no visible key would otherwise rescale by
# exp2(-inf - -inf) = NaN; its probabilities are zeroed explicitly instead.
MASK_VALUE = -1e30
MIN_ROWS = 16  # smallest tile Triton's tl.dot accepts
TARGET_PROGRAMS = 264  # about two waves of programs on 132 SMs (H100)


@dataclasses.dataclass(frozen=True)
class _Static:
    """What the kernel specializes on."""
    group: int  # G
    q_len: int  # T
    rows: int  # T * G padded to a power of 2 >= MIN_ROWS
    block_k: int
    chunk: int  # keys per split, a multiple of block_k
    window: Optional[int]
    sm_scale: float
    quantized: bool
    num_warps: int
    num_stages: int
    interpret: bool
    layer: Optional[int]  # k, v are the stacked [L, B, K, S, H] cache; read this layer


def _dot(a, b, *, tb: bool = False):
    contract = ((1,), (1 if tb else 0,))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _decode_kernel(offset_ref, q_ref, k_ref, v_ref, *rest, st: _Static):
    ks_ref, vs_ref, o_ref, lse_ref = rest if st.quantized else (None, None, *rest)
    split = pl.program_id(2)
    first_k = split * st.chunk
    row = jnp.arange(st.rows)[:, None]
    q_pos = offset_ref[0] + row // st.group  # [rows, 1]; padded rows sit past the real ones
    last_visible = offset_ref[0] + st.q_len - 1
    q = q_ref[...]  # [rows, H]
    compute_dtype = q.dtype

    def load(ref, scale_ref, keys):
        x = ref[keys, :]
        if st.quantized:
            return (x.astype(jnp.float32) * scale_ref[keys][:, None]).astype(compute_dtype)
        return x

    def body(j, carry):
        acc, m, l = carry
        keys = pl.ds(j * st.block_k, st.block_k)
        s = _dot(q, load(k_ref, ks_ref, keys), tb=True) * (st.sm_scale * LOG2E)  # [rows, bk]
        k_pos = jnp.broadcast_to(first_k + j * st.block_k + jnp.arange(st.block_k)[None, :],
                                 s.shape)
        q_pos_full = jnp.broadcast_to(q_pos, s.shape)
        mask = k_pos <= q_pos_full
        if st.window is not None:
            mask &= q_pos_full - k_pos < st.window
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
        alpha = jnp.exp2(m - m_new)
        v = load(v_ref, vs_ref, keys)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    # Key blocks of this split up to the last visible slot (and from the window's start).
    visible = jnp.minimum(jnp.maximum(last_visible + 1 - first_k, 0), st.chunk)
    hi = lax.div(visible + st.block_k - 1, st.block_k)
    lo = 0
    if st.window is not None:
        first_visible = offset_ref[0] - st.window + 1
        lo = jnp.minimum(lax.div(jnp.clip(first_visible - first_k, 0, st.chunk), st.block_k), hi)
    head_dim = q_ref.shape[-1]
    carry = (jnp.zeros((st.rows, head_dim), jnp.float32),
             jnp.full((st.rows,), MASK_VALUE, jnp.float32), jnp.zeros((st.rows,), jnp.float32))
    acc, m, l = lax.fori_loop(lo, hi, body, carry)
    empty = l == 0.0
    o_ref[...] = acc / jnp.where(empty, 1.0, l)[:, None]
    lse_ref[...] = jnp.where(empty, MASK_VALUE, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _call(q, k, v, k_scale, v_scale, offsets, st: _Static):
    """q [B, K, rows, H] -> partial outputs [B, K, splits, rows, H] and lse [B, K, splits, rows]."""
    batch, num_kv_heads, kv_len, head_dim = k.shape[-4:]
    splits = kv_len // st.chunk
    if st.layer is None:
        kv_spec = pl.BlockSpec((None, None, st.chunk, head_dim), lambda b, n, s: (b, n, s, 0))
        scale_spec = pl.BlockSpec((None, None, st.chunk), lambda b, n, s: (b, n, s))
    else:  # the layer's blocks are read in place: no copy of the layer out of the stack
        kv_spec = pl.BlockSpec((None, None, None, st.chunk, head_dim),
                               lambda b, n, s: (st.layer, b, n, s, 0))
        scale_spec = pl.BlockSpec((None, None, None, st.chunk),
                                  lambda b, n, s: (st.layer, b, n, s))
    in_specs = [pl.BlockSpec((1,), lambda b, n, s: (b,)),
                pl.BlockSpec((None, None, st.rows, head_dim), lambda b, n, s: (b, n, 0, 0)),
                kv_spec, kv_spec]
    args = [offsets, q, k, v]
    if st.quantized:
        in_specs += [scale_spec, scale_spec]
        args += [k_scale, v_scale]
    return pl.pallas_call(
        functools.partial(_decode_kernel, st=st),
        grid=(batch, num_kv_heads, splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, st.rows, head_dim), lambda b, n, s: (b, n, s, 0, 0)),
            pl.BlockSpec((None, None, None, st.rows), lambda b, n, s: (b, n, s, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((batch, num_kv_heads, splits, st.rows, head_dim),
                                        jnp.float32),
                   jax.ShapeDtypeStruct((batch, num_kv_heads, splits, st.rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages),
        interpret=st.interpret,
        name="decode_attention",
    )(*args)


def _triton_stages(programs: int) -> int:
    """Triton's pipelining depth: 4 up to about two waves of programs (each then streams a long
    split: the deeper pipeline keeps more of it in flight), 2 past that (more programs an SM
    instead). Measured on an H200, three calls (docs/benchmarks.md, twenty-first session): at
    256 programs 29-35 us against 42-51 with 2; at 512, 41-49 against 41-46."""
    return 4 if programs <= TARGET_PROGRAMS else 2


def _choose_splits(batch: int, num_kv_heads: int, kv_len: int, block_k: int, target: int) -> int:
    """About `target` programs (or splits, in interpret mode), each a whole number of key
    blocks."""
    blocks = kv_len // block_k
    want = max(1, min(blocks, target if target <= 2 else -(-target // (batch * num_kv_heads))))
    return max(d for d in range(1, want + 1) if blocks % d == 0)


BACKENDS = ("auto", "mosaic", "triton")


def _backend(requested: str, q_len: int, group: int, head_dim: int, dtype,
             quantized: bool) -> str:
    """"mosaic" or "triton". auto: Triton, faster or on par on an H200 at every shape measured
    (docs/benchmarks.md, twenty-first session); "mosaic" that cannot run is an error."""
    from pallas_kernels import decode_attention_mosaic as mosaic

    if requested not in BACKENDS:
        raise ValueError(f"backend {requested!r}: one of {BACKENDS}")
    problem = mosaic.supports(q_len, group, head_dim, dtype, quantized)
    if requested == "mosaic" and problem:
        raise ValueError(f"the Mosaic GPU decode kernel does not take {problem}; use "
                         "backend='triton' or 'auto'")
    return "triton" if requested == "auto" else requested


@functools.partial(jax.jit, static_argnames=("layer", "sliding_window", "sm_scale", "block_k",
                                             "splits", "num_warps", "num_stages", "backend",
                                             "interpret"))
def decode_attention(q, k, v, q_offsets, *, k_scale=None, v_scale=None, layer: Optional[int] = None,
                     sliding_window: Optional[int] = None, sm_scale: Optional[float] = None,
                     block_k: Optional[int] = None, splits: Optional[int] = None,
                     num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                     backend: str = "auto", interpret: bool = False):
    """Attention [B, T, N, H] over a cache layer [B, K, S, H] -> [B, T, N, H] (module rules).

    q_offsets [B]: slot of query 0 of each sequence. k_scale, v_scale [B, K, S]: int8 cache
    scales. layer: k, v (and scales) are the whole stacked cache [L, B, K, S, H] and the kernel
    reads this layer where it lies (slicing it out first would copy it, every step).
    block_k (default 64, or less for short caches) and splits (default: fill the GPU) tune the
    grid; S is padded to a multiple of block_k * splits only if it is not one already.
    num_warps (Triton's; default 4, 8 past head_dim 128) and num_stages (Triton's software
    pipelining of the key loop, default 4 up to TARGET_PROGRAMS programs, else 2; the Mosaic
    kernel's K/V slots, default 2) tune each program (tools/sweep_decode_attention.py times
    the choices). backend: "auto" (Triton), "triton" or "mosaic" (decode_attention_mosaic.py:
    Hopper, the cases its `supports` takes; correct, slower today). The Mosaic kernel streams
    block_k (default 128) keys a step.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[-3], k.shape[-2]
    if num_heads % num_kv_heads:
        raise ValueError(f"kv heads {num_kv_heads} must divide query heads {num_heads}")
    quantized = k_scale is not None
    group = num_heads // num_kv_heads
    backend = _backend(backend, q_len, group, head_dim, q.dtype, quantized)
    mosaic = backend == "mosaic"
    sm_scale = float(head_dim ** -0.5 if sm_scale is None else sm_scale)
    if mosaic:
        from pallas_kernels import decode_attention_mosaic as dm

        block_k = block_k or (64 if kv_len <= 64 else dm.BLOCK_KV)
    block_k = block_k or min(64, max(16, pl.next_power_of_2(kv_len)))
    blocks = -(-kv_len // block_k)
    # NOTE: interpret mode (CPU) runs programs one by one: two splits still test the combine.
    target = 2 if interpret else dm.TARGET_CTAS if mosaic else TARGET_PROGRAMS
    splits = splits or _choose_splits(batch, num_kv_heads, blocks * block_k, block_k, target)
    padded = -(-kv_len // (block_k * splits)) * block_k * splits
    if padded != kv_len and layer is not None:  # pad this layer only, not the whole stack
        k, v = k[layer], v[layer]
        k_scale, v_scale = (None, None) if not quantized else (k_scale[layer], v_scale[layer])
        layer = None
    if padded != kv_len:
        widths = [(0, 0), (0, 0), (0, padded - kv_len)]
        k, v = jnp.pad(k, widths + [(0, 0)]), jnp.pad(v, widths + [(0, 0)])
        if quantized:
            k_scale, v_scale = jnp.pad(k_scale, widths), jnp.pad(v_scale, widths)
    rows = dm.ROWS if mosaic else max(MIN_ROWS, pl.next_power_of_2(q_len * group))
    # [B, T, K, G, H] -> [B, K, T * G, H]: the query heads of one kv head, all tokens, one tile.
    q_tile = q.reshape(batch, q_len, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q_tile = q_tile.reshape(batch, num_kv_heads, q_len * group, head_dim)
    q_tile = jnp.pad(q_tile, ((0, 0), (0, 0), (0, rows - q_len * group), (0, 0)))
    offsets = jnp.asarray(q_offsets, jnp.int32)
    if mosaic:
        partial_out, lse = dm.mosaic_partials(
            q_tile, k, v, offsets, group=group, q_len=q_len, splits=splits, sm_scale=sm_scale,
            window=sliding_window, layer=layer, block_kv=block_k,
            stages=num_stages or dm.STAGES, interpret=interpret)
    else:
        st = _Static(group=group, q_len=q_len, rows=rows, block_k=block_k,
                     chunk=padded // splits, window=sliding_window, quantized=quantized,
                     sm_scale=sm_scale, num_warps=num_warps or (4 if head_dim <= 128 else 8),
                     num_stages=num_stages or _triton_stages(batch * num_kv_heads * splits),
                     interpret=interpret, layer=layer)
        partial_out, lse = _call(q_tile, k, v, k_scale, v_scale, offsets, st)
    out = _combine(partial_out, lse)[:, :, :q_len * group]  # [B, K, T * G, H]
    out = out.reshape(batch, num_kv_heads, q_len, group, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


def _combine(partial_out, lse):
    """Merge the splits: [B, K, splits, rows, H], [B, K, splits, rows] -> [B, K, rows, H]."""
    peak = jnp.max(lse, axis=2, keepdims=True)
    weights = jnp.exp2(lse - peak)  # a split with no visible key has weight 0
    total = jnp.sum(weights, axis=2)
    return jnp.sum(weights[..., None] * partial_out, axis=2) / total[..., None]


# ----------------------------------------------------------------------------- reference


def decode_attention_reference(q, k, v, q_offsets, *, k_scale=None, v_scale=None,
                               sliding_window: Optional[int] = None,
                               sm_scale: Optional[float] = None):
    """Same rules as `decode_attention`, materializing [B, K, G, T, S] scores in float32."""
    batch, q_len, num_heads, head_dim = q.shape
    _, num_kv_heads, kv_len, _ = k.shape
    sm_scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    if k_scale is not None:
        k, v = k * k_scale[..., None], v * v_scale[..., None]
    q_pos = jnp.asarray(q_offsets)[:, None] + jnp.arange(q_len)[None, :]  # [B, T]
    k_pos = jnp.arange(kv_len)[None, None, :]
    mask = k_pos <= q_pos[:, :, None]  # [B, T, S]
    if sliding_window is not None:
        mask &= q_pos[:, :, None] - k_pos < sliding_window
    qf = q.astype(jnp.float32).reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads,
                                       head_dim)
    scores = jnp.einsum("btkgh,bksh->bkgts", qf, k, precision=lax.Precision.HIGHEST) * sm_scale
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bksh->btkgh", weights, v, precision=lax.Precision.HIGHEST)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
