"""The fused decode step's kernel (pallas_kernels/fused_decode.py has the step, its plan and
its launch): the stages as one program's code (`_Kernel`), the grid barrier (`_arrive`,
`_wait`), the timer behind Plan.trace, and `_kernel`, which runs one stage or, in one launch,
all of them with a barrier or a data poll between stages. The kernel's operands are the
WEIGHTS, then the STATE buffers (aliased as its outputs), in these orders.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

if TYPE_CHECKING:
    from pallas_kernels.fused_decode import Plan

MASK_VALUE = -1e30
TILE_ELEMENTS = 16384  # weight elements a program holds in registers per row block (32 KB bf16)
MAX_CHUNK = 512  # widest column chunk of a weight row block
BLOCK_KEYS = 64  # keys per attention block: at 125m/1b's splits, one block per unit
# Per-layer activation buffers start as NOT_WRITTEN (a NaN payload no arithmetic makes): a
# stage that waits on its data polls until none is left. A poll that never ends (a bug) stops
# after MAX_POLLS loads, leaving NaN in the result instead of a hang.
NOT_WRITTEN = 0x7FE5A5A5
MAX_POLLS = 1 << 18
TILED = ("wqkv", "wo", "gate", "down", "head")  # weights streamed in row blocks (stage_tiles)
WAITABLE = ("attention", "o_proj", "down")  # stages whose input is a fresh per-layer buffer
STAGES = ("qkv", "attention", "o_proj", "gate_up", "down")
ATTENTION_PARTS = 4  # Plan.trace's stamps inside an attention unit (_Kernel.stamp_attention)
WEIGHTS = ("attn_norm", "mlp_norm", "final_norm", "wqkv", "wo", "gate", "up", "down", "head")
STATE = ("x", "qkv", "part_o", "part_m", "part_l", "attn", "arrivals", "hidden", "logits", "k",
         "v", "counter", "polls", "trace")


def _chunking(width: int) -> tuple[int, int]:
    """(chunk, count): the widest power-of-2 chunk <= MAX_CHUNK that divides `width`."""
    chunk = min(MAX_CHUNK, width & -width)
    return chunk, width // chunk


def _row_block(rows: int, width: int, programs: int, tile: int = TILE_ELEMENTS) -> int:
    """Rows per block: enough for one block per program where registers allow."""
    want = pl.next_power_of_2(-(-rows // programs))
    fit = max(1, 1 << int(math.log2(max(1, tile // width))))
    return max(1, min(want, fit))


def _i(value: int) -> jax.Array:
    """A static index as an int32 scalar (Pallas' masked loads and atomics take no Python ints
    among array indices)."""
    return jnp.int32(value)


def _arrive(counter_ref, plan: Plan):
    """This program has reached the next barrier: one atomic add to the arrival counter (a
    scalar atomic: performed once per program), after a CTA barrier so all the program's
    stores come first (the atomic has release semantics). _wait knows how many to expect."""
    if not plan.interpret:
        plgpu.debug_barrier()
    return plgpu.atomic_add(counter_ref, (_i(0),), jnp.int32(1))


def _timer(anchor) -> jax.Array:
    """The GPU's global nanosecond timer (low 32 bits), an int32 scalar, read after the kernel
    code before it (Plan.trace). Inline assembly with side effects, so the compiler keeps it in
    place: plgpu.elementwise_inline_asm is pure, and a pure timer read drifts to its use."""
    if _timer_p is None:
        raise NotImplementedError("Plan.trace needs jax's Pallas Triton internals "
                                  "(jax._src.pallas.triton.lowering), not found in this jax")
    return _timer_p.bind(jnp.asarray(anchor, jnp.int32))


def _register_timer():
    try:
        from jax._src import core as jax_core
        from jax._src.lib.mlir import ir
        from jax._src.lib.triton import dialect as tt_dialect
        from jax._src.pallas.triton import lowering as triton_lowering
    except ImportError:
        return None
    primitive = jax_core.Primitive("fused_decode_timer")
    primitive.def_abstract_eval(lambda anchor: jax_core.ShapedArray((), jnp.int32))

    @triton_lowering.register_lowering(primitive)
    def _lower(ctx, anchor):
        out = tt_dialect.elementwise_inline_asm(
            [ir.IntegerType.get_signless(32)], "mov.u32 $0, %globaltimer_lo;",
            constraints="=r,r", pure=False, packed_element=1,
            args=[triton_lowering._ensure_ir_value(anchor, ctx.avals_in[0])])
        return out[0] if isinstance(out, (list, tuple)) else out

    return primitive


_timer_p = _register_timer()


def _wait(counter_ref, epoch, plan: Plan):
    """Poll the counter (volatile loads) until every program has arrived at barrier `epoch`.
    Programs never outnumber the SMs, so all are resident and the spin cannot deadlock.
    Returns the poll count."""
    target = jnp.asarray(epoch, jnp.int32) * plan.programs

    def poll(carry):
        # NOTE: the loop also counts its polls, and the caller must use the count. With the
        # polled value as its only carry (a body that ignores its input) the loop did not wait
        # on an H200 with jax 0.11.2 (docs/benchmarks.md, "A Pallas decode step").
        _, polls = carry
        return jnp.max(plgpu.load(counter_ref.at[pl.ds(0, 1)], volatile=True)), polls + 1

    _, polls = lax.while_loop(lambda carry: carry[0] < target, poll, (target - 1, jnp.int32(0)))
    if not plan.interpret:
        plgpu.debug_barrier()
    return polls


class _Kernel:
    """The stages, closed over one program's refs. Each stage: `prefetch(layer)` issues the
    loads that do not depend on other programs; `run(layer, prefetched)` does the rest."""

    def __init__(self, plan: Plan, scalars, freq, w: dict, s: dict):
        self.p, self.w, self.s, self.freq = plan, w, s, freq
        self.pid = pl.program_id(0)
        self.pos = scalars[1]

    # -- helpers

    def slot(self, layer):
        """Which copy of the q/k/v, attention-output and hidden buffers a layer uses: its own
        with data waits (a wait needs a buffer nobody wrote before in this step), else one."""
        return layer if self.p.data_waits else 0

    def stamp(self, column, anchor):
        """trace[program, column] = the timer, read once `anchor` exists (Plan.trace)."""
        plgpu.store(self.s["trace"].at[self.pid, pl.ds(column, 1)],
                    jnp.full((1,), _timer(anchor), jnp.int32))

    def stamp_attention(self, layer, part, anchor):
        """With Plan.trace: the timer at `part` (0-3) of this program's attention unit, once
        `anchor` is computed (its last unit's, if it has several)."""
        if self.p.trace:
            value = jnp.max(lax.bitcast_convert_type(jnp.asarray(anchor, jnp.float32), jnp.int32))
            self.stamp(3 * barriers(self.p) + 1 + ATTENTION_PARTS * layer + part, value)

    def rnd(self, x):
        return x.astype(jnp.bfloat16).astype(jnp.float32) if self.p.round_bf16 else x

    def load_act(self, ref, mask=None, other=None):
        """Activations written by other programs: volatile loads (from L2), never a stale L1
        line. (`cache_modifier=".cg"` would say it better; this JAX's lowering rejects it.)"""
        return plgpu.load(ref, mask=mask, other=other, volatile=True)

    def my_rows(self, total: int):
        n = self.p.programs
        return self.pid * total // n, (self.pid + 1) * total // n

    def load_rows(self, ref, index, r0, hi, rows: int, width: int):
        """Rows [r0, r0 + rows) (those < hi) of ref[index] [.., width], as column chunks."""
        chunk, count = _chunking(width)
        ok = (r0 + jnp.arange(rows) < hi)[:, None]
        return [plgpu.load(ref.at[(*index, pl.ds(r0, rows), pl.ds(c * chunk, chunk))],
                           mask=jnp.broadcast_to(ok, (rows, chunk)), other=0.0)
                for c in range(count)]

    def vector(self, ref, width: int, base=0, wait: bool = False):
        """ref[base : base + width] as column chunks; with `wait`, once all of it is written."""
        chunk, count = _chunking(width)
        return self.wait_for(lambda: [self.load_act(ref.at[pl.ds(base + c * chunk, chunk)])
                                      for c in range(count)], wait)

    def wait_for(self, load, wait: bool):
        """`load()` (volatile loads of values other programs write); with `wait`, again until
        no value is NOT_WRITTEN (at most MAX_POLLS loads, counted in state["polls"])."""
        if not wait:
            return load()

        def unwritten(values):
            return sum(jnp.sum((lax.bitcast_convert_type(v, jnp.int32) == NOT_WRITTEN)
                               .astype(jnp.int32)) for v in values) > 0

        values, polls = lax.while_loop(
            lambda carry: unwritten(carry[0]) & (carry[1] < MAX_POLLS),
            lambda carry: (load(), carry[1] + 1), (load(), jnp.int32(1)))
        # (the count is stored: a spin loop whose result is unused may be deleted)
        self.s["polls"][self.pid] += polls
        return values

    def norm_scale(self, scale_ref, index):
        """A norm's scale as column chunks (a weight: loaded before the barrier)."""
        chunk, count = _chunking(self.p.embed)
        return [scale_ref[(*index, pl.ds(c * chunk, chunk))] for c in range(count)]

    def normed(self, scales):
        """rms_norm(x) as column chunks (every program computes it whole: D floats from L2)."""
        xs = self.vector(self.s["x"], self.p.embed)
        mean_square = sum(jnp.sum(x * x) for x in xs) / self.p.embed
        inv = lax.rsqrt(mean_square + self.p.eps)
        return [self.rnd(x * inv * scale) for x, scale in zip(xs, scales)]

    @staticmethod
    def matvec(tiles, xs):
        """Row sums of the column chunks' products: summed elementwise over the chunks first,
        so a row block pays one cross-thread reduction, not one per chunk (1b's down
        projection has 16 chunks: it ran at 36% of the copy bandwidth that way)."""
        return jnp.sum(sum(t.astype(jnp.float32) * x[None, :] for t, x in zip(tiles, xs)), axis=1)

    def row_loop(self, total: int, rows: int, load, compute, first):
        """This program's rows of `total`, `rows` at a time; each block's loads are issued before
        the previous block is computed (first = the prefetched first block)."""
        lo, hi = self.my_rows(total)

        def body(i, tiles):
            upcoming = load(lo + (i + 1) * rows, hi)
            compute(lo + i * rows, hi, tiles)
            return upcoming

        lax.fori_loop(0, lax.div(hi - lo + rows - 1, rows), body, first)

    def store_rows(self, ref, r0, hi, values, base=0):
        idx = r0 + jnp.arange(values.shape[0])
        plgpu.store(ref.at[pl.ds(base + r0, values.shape[0])], values, mask=idx < hi)

    # -- matrix stages: (rows of the output, rows per block, weight names, input width)

    def _matrix_stage(self, names, width, total):
        tile = dict(self.p.stage_tiles).get(names[0], self.p.tile_elements)
        rows = _row_block(total, width * len(names), self.p.programs, tile)
        lo, hi = self.my_rows(total)

        def load(layer, r0, hi_):
            index = () if layer is None else (layer,)
            return [self.load_rows(self.w[n], index, r0, hi_, rows, width) for n in names]

        return rows, lo, hi, load

    def prefetch_matrix(self, layer, names, width, total, active=True):
        """The first row block's loads (none where `active` is false)."""
        _, lo, hi, load = self._matrix_stage(names, width, total)
        return load(layer, lo, jnp.where(active, hi, lo))

    def run_matrix(self, layer, names, width, total, xs, epilogue, first):
        rows, _, _, load = self._matrix_stage(names, width, total)
        self.row_loop(total, rows, lambda r0, hi: load(layer, r0, hi),
                      lambda r0, hi, tiles: epilogue(r0, hi, [self.matvec(t, xs) for t in tiles]),
                      first)

    def run_residual(self, layer, name, width, xs, first):
        """x += xs @ W (W [D, width]) for this program's rows of x, in place. With more than one
        block a program, each block's rows of x load with its weight tile, a block ahead, so
        the add waits for no load: loading them in the epilogue cost a round trip to L2 per
        block (1b: 1,050 -> 1,013 us, docs/benchmarks.md). Only this program reads or writes
        these rows during the stage; the first block's rows load here, after the barrier that
        follows the stage that last wrote them."""
        rows, lo, hi, load = self._matrix_stage((name,), width, self.p.embed)
        if -(-self.p.embed // self.p.programs) <= rows:
            # One block a program: x loads in the epilogue (125m ran 3% slower the other way).
            self.run_matrix(layer, (name,), width, self.p.embed, xs,
                            lambda r0, hi_, ys: self.add_to_residual(r0, hi_, ys[0]), first)
            return

        def load_x(r0, hi_):
            ok = r0 + jnp.arange(rows) < hi_
            return self.load_act(self.s["x"].at[pl.ds(r0, rows)], mask=ok, other=0.0)

        def compute(r0, hi_, loaded):
            (tile,), x = loaded
            self.add_to_residual(r0, hi_, self.matvec(tile, xs), x)

        self.row_loop(self.p.embed, rows, lambda r0, hi_: (load(layer, r0, hi_), load_x(r0, hi_)),
                      compute, (first, load_x(lo, hi)))

    # -- stage 1: q, k, v

    def prefetch_qkv(self, layer, active=True):
        """(Also for the layer after the last one, inactive: clamped, nothing loaded.)"""
        layer = jnp.minimum(layer, self.p.layers - 1)
        return (self.prefetch_matrix(layer, ("wqkv",), self.p.embed, self.p.qkv_rows, active),
                self.norm_scale(self.w["attn_norm"], (layer,)))

    def run_qkv(self, layer, prefetched):
        first, scales = prefetched
        xs = self.normed(scales)
        self.run_matrix(layer, ("wqkv",), self.p.embed, self.p.qkv_rows, xs,
                        lambda r0, hi, ys: self.store_rows(self.s["qkv"], r0, hi,
                                                           self.rnd(ys[0]),
                                                           self.slot(layer) * self.p.qkv_rows),
                        first)

    # -- stage 2: attention, split-K over the cache

    def _unit_range(self, split):
        """Keys [start, end) of split `split`: [0, pos] (pos = the new token) cut in splits."""
        p = self.p
        total = self.pos + 1
        per = lax.div(lax.div(total + p.splits - 1, p.splits) + BLOCK_KEYS - 1,
                      BLOCK_KEYS) * BLOCK_KEYS
        start = split * per
        return start, jnp.minimum(start + per, total)

    def _load_keys(self, layer, kv_head, k0, old_end):
        """A block of cached keys and values from k0 (slots < old_end), as halves of head_dim."""
        half = self.p.head_dim // 2
        ok = jnp.broadcast_to((k0 + jnp.arange(BLOCK_KEYS) < old_end)[:, None], (BLOCK_KEYS, half))
        out = []
        for name in ("k", "v"):
            for h0 in (0, half):
                ref = self.s[name].at[layer, _i(0), kv_head, pl.ds(k0, BLOCK_KEYS), pl.ds(h0, half)]
                out.append(plgpu.load(ref, mask=ok, other=0.0))
        return out

    def prefetch_attention(self, layer):
        p = self.p
        unit = jnp.minimum(self.pid, p.kv_heads * p.splits - 1)
        start, end = self._unit_range(unit % p.splits)
        return self._load_keys(layer, unit // p.splits, start, jnp.minimum(end, self.pos))

    def _rope(self, a, b):
        """Rotate halves a, b [..., H/2] by pos * frequency (layers.apply_rope)."""
        angles = self.pos.astype(jnp.float32) * self.freq[...]
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        return self.rnd(a * cos - b * sin), self.rnd(b * cos + a * sin)

    def _head_vector(self, layer, head, count):
        """Halves of `count` consecutive heads' rows of the layer's qkv: 2 x [count, H/2]."""
        H, half = self.p.head_dim, self.p.head_dim // 2
        base = (self.slot(layer) * self.p.qkv_rows + (head + jnp.arange(count))[:, None] * H
                + jnp.arange(half)[None, :])
        return [self.load_act(self.s["qkv"].at[base + h0]) for h0 in (0, half)]

    def run_attention(self, layer, first):
        p = self.p
        G, H, half = p.group, p.head_dim, p.head_dim // 2
        scale = H ** -0.5
        units = p.kv_heads * p.splits

        def unit_body(i, prefetched):
            unit = self.pid + i * p.programs
            kv_head, split = unit // p.splits, unit % p.splits
            start, end = self._unit_range(split)
            old_end = jnp.minimum(end, self.pos)
            # This step's q, k, v of the kv head: all loads issued at once, before any math.
            q_a, q_b, k_a, k_b, v1, v2 = self.wait_for(lambda: [
                *self._head_vector(layer, kv_head * G, G),  # halves, [G, H/2] each
                *self._head_vector(layer, p.heads + kv_head, 1),
                *self._head_vector(layer, p.heads + p.kv_heads + kv_head, 1)],
                "attention" in p.data_waits)
            q_raw, k_raw = (q_a, q_b), (k_a, k_b)
            q1, q2 = self._rope(*q_raw)
            q1, q2 = q1 * scale, q2 * scale
            self.stamp_attention(layer, 0, q1)  # (Plan.trace: q/k/v loaded, RoPE done)

            def scores(k1, k2):  # [G, n]
                return (jnp.sum(q1[:, None, :] * k1[None].astype(jnp.float32), axis=2)
                        + jnp.sum(q2[:, None, :] * k2[None].astype(jnp.float32), axis=2))

            def block(j, carry):
                tiles, m, l, o1, o2 = carry
                k0 = start + j * BLOCK_KEYS
                upcoming = self._load_keys(layer, kv_head, k0 + BLOCK_KEYS, old_end)
                k1, k2, v1, v2 = tiles
                s = scores(k1, k2)
                valid = jnp.broadcast_to((k0 + jnp.arange(BLOCK_KEYS) < old_end)[None, :], s.shape)
                s = jnp.where(valid, s, MASK_VALUE)
                m_new = jnp.maximum(m, jnp.max(s, axis=1))
                prob = jnp.where(valid, jnp.exp(s - m_new[:, None]), 0.0)
                alpha = jnp.exp(m - m_new)
                weighted = [jnp.sum(prob[:, :, None] * v[None].astype(jnp.float32), axis=1)
                            for v in (v1, v2)]
                o1 = o1 * alpha[:, None] + weighted[0]
                o2 = o2 * alpha[:, None] + weighted[1]
                return upcoming, m_new, l * alpha + jnp.sum(prob, axis=1), o1, o2

            blocks = lax.div(jnp.maximum(old_end - start, 0) + BLOCK_KEYS - 1, BLOCK_KEYS)
            carry = (prefetched, jnp.full((G,), MASK_VALUE, jnp.float32),
                     jnp.zeros((G,), jnp.float32), jnp.zeros((G, half), jnp.float32),
                     jnp.zeros((G, half), jnp.float32))
            _, m, l, o1, o2 = lax.fori_loop(0, blocks, block, carry)
            self.stamp_attention(layer, 1, l)  # the key blocks done

            # The new token (slot pos) belongs to the unit whose range holds it: that unit rotates
            # its key, writes k and v to the cache and adds it to its softmax.
            owner = (start <= self.pos) & (self.pos < end)
            k1, k2 = self._rope(*k_raw)
            for name, a, b in (("k", k1, k2), ("v", v1, v2)):
                ref = self.s[name]
                for h0, part in ((0, a), (half, b)):
                    plgpu.store(ref.at[layer, _i(0), kv_head, pl.ds(self.pos, 1), pl.ds(h0, half)],
                                part.astype(ref.dtype), mask=jnp.broadcast_to(owner, (1, half)))
            s_new = jnp.where(owner, jnp.sum(scores(k1, k2), axis=1), MASK_VALUE)  # [G]
            m_new = jnp.maximum(m, s_new)
            alpha, beta = jnp.exp(m - m_new), jnp.where(owner, jnp.exp(s_new - m_new), 0.0)
            o1 = o1 * alpha[:, None] + beta[:, None] * v1
            o2 = o2 * alpha[:, None] + beta[:, None] * v2
            l = l * alpha + beta
            m = m_new

            for ref, value in ((self.s["part_o"].at[kv_head, split, :, pl.ds(0, half)], o1),
                               (self.s["part_o"].at[kv_head, split, :, pl.ds(half, half)], o2),
                               (self.s["part_m"].at[kv_head, split, :], m),
                               (self.s["part_l"].at[kv_head, split, :], l)):
                plgpu.store(ref, value)
            self.stamp_attention(layer, 2, o1)  # partials stored
            self.merge_if_last(layer, kv_head)
            self.stamp_attention(layer, 3, kv_head)  # counted (and merged, if last)
            nxt = self.pid + (i + 1) * p.programs
            nxt_unit = jnp.minimum(nxt, units - 1)
            n_start, n_end = self._unit_range(nxt_unit % p.splits)
            return self._load_keys(layer, nxt_unit // p.splits, n_start,
                                   jnp.where(nxt < units, jnp.minimum(n_end, self.pos), n_start))

        count = lax.div(jnp.maximum(units - self.pid, 0) + p.programs - 1, p.programs)
        lax.fori_loop(0, count, unit_body, first)

    def merge_if_last(self, layer, kv_head):
        """The last unit of a kv head to finish merges its splits into the attention output.

        Each unit counts itself in arrivals[kv_head] (an atomic with release semantics, after a
        CTA barrier: its partials are stored first); the one that brings the count to
        splits x (layer + 1) loads all the head's partials (masked for the others, so no
        traffic) and writes the attention output of the kv head's G query heads, rounded like
        the model's."""
        p = self.p
        if not p.interpret:
            plgpu.debug_barrier()
        # (a traced 1: interpret mode's atomic rule turns a constant operand into a jaxpr
        # constant, which the while loop around this (a dynamic unit count) cannot discharge)
        one = jnp.minimum(self.pos, 0) + 1
        before = plgpu.atomic_add(self.s["arrivals"], (kv_head,), one)
        last = before == p.splits * (layer + 1) - 1
        splits = pl.next_power_of_2(p.splits)  # the partials are padded with empty splits
        ok = jnp.broadcast_to(last, (splits,))
        for g in range(p.group):  # query head kv_head * G + g
            g = _i(g)
            m = self.load_act(self.s["part_m"].at[kv_head, :, g], mask=ok, other=MASK_VALUE)
            l = self.load_act(self.s["part_l"].at[kv_head, :, g], mask=ok, other=0.0)
            o = self.load_act(self.s["part_o"].at[kv_head, :, g, :],
                              mask=jnp.broadcast_to(last, (splits, p.head_dim)), other=0.0)
            weight = jnp.exp(m - jnp.max(m))  # empty splits: l = 0, o = 0
            total = jnp.sum(weight * l)
            total = jnp.where(total > 0.0, total, 1.0)  # (the other units: nothing loaded)
            merged = self.rnd(jnp.sum(weight[:, None] * o, axis=0) / total)
            head = kv_head * p.group + g
            plgpu.store(self.s["attn"].at[pl.ds((self.slot(layer) * p.heads + head) * p.head_dim,
                                                p.head_dim)], merged,
                        mask=jnp.broadcast_to(last, (p.head_dim,)))

    # -- stage 3: x += attn @ Wo

    def prefetch_o_proj(self, layer):
        return self.prefetch_matrix(layer, ("wo",), self.p.heads * self.p.head_dim, self.p.embed)

    def run_o_proj(self, layer, first):
        width = self.p.heads * self.p.head_dim
        xs = self.vector(self.s["attn"], width, self.slot(layer) * width,
                         "o_proj" in self.p.data_waits)
        self.run_residual(layer, "wo", width, xs, first)

    def add_to_residual(self, r0, hi, y, x=None):
        """x[r0 : r0 + len(y)] += y (rows < hi), with those rows of x loaded here unless given."""
        idx = r0 + jnp.arange(y.shape[0])
        ref = self.s["x"].at[pl.ds(r0, y.shape[0])]
        if x is None:
            x = self.load_act(ref, mask=idx < hi, other=0.0)
        plgpu.store(ref, self.rnd(x + self.rnd(y)), mask=idx < hi)

    # -- stage 4: gate/up; stage 5: down

    def prefetch_gate_up(self, layer):
        return (self.prefetch_matrix(layer, ("gate", "up"), self.p.embed, self.p.mlp),
                self.norm_scale(self.w["mlp_norm"], (layer,)))

    def run_gate_up(self, layer, prefetched):
        first, scales = prefetched
        xs = self.normed(scales)

        def epilogue(r0, hi, ys):
            gate, up = (self.rnd(y) for y in ys)
            self.store_rows(self.s["hidden"], r0, hi,
                            self.rnd(self.rnd(gate * jax.nn.sigmoid(gate)) * up),
                            self.slot(layer) * self.p.mlp)

        self.run_matrix(layer, ("gate", "up"), self.p.embed, self.p.mlp, xs, epilogue, first)

    def prefetch_down(self, layer):
        return self.prefetch_matrix(layer, ("down",), self.p.mlp, self.p.embed)

    def run_down(self, layer, first):
        xs = self.vector(self.s["hidden"], self.p.mlp, self.slot(layer) * self.p.mlp,
                         "down" in self.p.data_waits)
        self.run_residual(layer, "down", self.p.mlp, xs, first)

    # -- output layer

    def prefetch_head(self):
        return (self.prefetch_matrix(None, ("head",), self.p.embed, self.p.vocab),
                self.norm_scale(self.w["final_norm"], ()))

    def run_head(self, prefetched):
        first, scales = prefetched
        xs = self.normed(scales)
        self.run_matrix(None, ("head",), self.p.embed, self.p.vocab, xs,
                        lambda r0, hi, ys: self.store_rows(self.s["logits"], r0, hi,
                                                           self.rnd(ys[0])), first)


def _kernel(*refs, plan: Plan, stage: Optional[str]):
    scalars, freq = refs[0], refs[1]
    w = dict(zip(WEIGHTS, refs[2:2 + len(WEIGHTS)]))
    s = dict(zip(STATE, refs[2 + len(WEIGHTS) + len(STATE):]))  # the outputs (aliased inputs)
    k = _Kernel(plan, scalars, freq, w, s)
    if stage == "head":
        k.run_head(k.prefetch_head())
        return
    if stage is not None:
        layer = scalars[2]
        getattr(k, f"run_{stage}")(layer, getattr(k, f"prefetch_{stage}")(layer))
        return

    def prefetch(layer, name, active=True):
        if name in plan.skip:
            return None
        if name == "qkv":
            return k.prefetch_qkv(layer, active)
        return getattr(k, f"prefetch_{name}")(layer)

    def barrier(epoch, prefetch):
        """Barrier `epoch`, with `prefetch` (weight loads) issued after the arrival: the arrival's
        release semantics would otherwise hold it back until the loads are done.
        -> (prefetched, polls)."""
        if "barrier" in plan.skip:
            return prefetch(), jnp.int32(0)
        column = 3 * (jnp.asarray(epoch, jnp.int32) - 1)
        if plan.trace:  # this program's stage is done
            k.stamp(column, epoch)
        before = _arrive(s["counter"], plan)
        first = prefetch()
        if plan.trace:  # the counter answered
            k.stamp(column + 1, before)
        polls = _wait(s["counter"], epoch, plan)
        if plan.trace:  # released
            k.stamp(column + 2, polls)
        return first, polls

    early = set(plan.lookahead)
    synced = synced_stages(plan)

    def layer_body(layer, carry):
        polls, pending = carry  # pending: this stage's tile, when loaded early
        for i, name in enumerate(STAGES):
            if i + 1 < len(STAGES):
                nxt = functools.partial(prefetch, layer, STAGES[i + 1])
            else:
                nxt = functools.partial(prefetch, layer + 1, "qkv", layer + 1 < plan.layers)
            nxt_early = STAGES[(i + 1) % len(STAGES)] in early

            def loads(name=name, nxt=nxt, nxt_early=nxt_early):
                # this stage's own tile unless it came early; the next stage's if it goes early
                own = None if name in early else prefetch(layer, name)
                return own, (nxt() if nxt_early else None)

            if name in synced:
                epoch = layer * len(synced) + synced.index(name) + 1
                (own, upcoming), count = barrier(epoch, loads)
                polls += count
            else:  # the stage polls its input (wait_for)
                own, upcoming = loads()
            if name not in plan.skip:
                getattr(k, f"run_{name}")(layer, pending if name in early else own)
            pending = upcoming
        return polls, pending

    pending = prefetch(0, "qkv") if "qkv" in early else None
    polls, _ = lax.fori_loop(0, plan.layers, layer_body, (jnp.int32(0), pending))
    # The poll counts are stored: a while loop whose count is never used loses it to dead-code
    # elimination, and that form (a loop body ignoring its carry) did not wait on an H200.
    if "head" in plan.skip:
        s["polls"][k.pid] += polls
        return
    epoch = plan.layers * len(synced) + 1
    first, count = barrier(epoch, k.prefetch_head)
    s["polls"][k.pid] += polls + count
    k.run_head(first)
    if plan.trace:  # the end: once this program's last logit is readable
        _, hi = k.my_rows(plan.vocab)
        last = k.load_act(s["logits"].at[pl.ds(hi - 1, 1)])
        k.stamp(3 * epoch, jnp.max(lax.bitcast_convert_type(last, jnp.int32)))


def synced_stages(plan: Plan) -> list:
    """The stages of a layer that start after a grid barrier (those that do not wait on data),
    in order: barrier `layer * len(...) + i + 1` precedes the i-th of them."""
    return [name for name in STAGES if name not in plan.data_waits]


def barriers(plan: Plan) -> int:
    """Grid barriers of a one-launch step: one per synced stage, and one before the output
    layer."""
    return plan.layers * len(synced_stages(plan)) + 1
