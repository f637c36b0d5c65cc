"""A chain of matrix-vector products in one persistent Mosaic GPU kernel, its weights streamed
through a shared-memory ring that never waits for the chain: the prototype of the
ring-streamed batch-1 decode step proposed in docs/design.md.

    tiled = tile_weights_split_k(ws, blocks)            # ws [L, D, D] bf16, once at load time
    xs = split_k_matvec_chain(tiled, x0, blocks=blocks)  # x0 [D] float32 -> xs [L, D] float32
                                                         # xs[l] = ws[l] @ xs[l - 1], xs[-1] = x0

What it measures: a batch-1 decode step is a chain of matrix-vector products, each needing the
whole output of the one before (a grid-wide dependency). The Triton-lowered step
(fused_decode.py) streams each stage's weights only after the barrier that releases the stage,
so DRAM idles during every barrier and every short stage's ramp. Here the weights, which do not
depend on the chain, stream on their own:

- CTA c = r * S + s (S = k_splits, all CTAs resident) owns rows [64 r, 64 r + 64) of every
  layer over x's split s, columns [s D / S, (s + 1) D / S): the contraction is split over S
  CTAs, each producing partial sums of its 64 rows;
- its producer warpgroup walks the CTA's [64, k_slot] weight tiles of every layer in order and
  copies each with TMA into a ring of `stages` shared-memory slots, waiting only for a slot to
  be released. It never waits for the chain, so it runs up to the ring's size ahead;
- its consumer warpgroup, per layer, gets x's split of the layer before, multiplies it with
  the layer's slots on wgmma (the weight tile as the A operand from the ring, x as an N = 8 B
  operand) and stores its 64 partial sums.

How a layer learns that the one before is done:
- `split_k_matvec_chain`: a grid barrier a layer on a global semaphore (each CTA adds 1 after
  its partials are stored; layer l + 1 waits for C * (l + 1); CTA 0 takes the count back to 0
  at the end, since the semaphore persists across calls). x's S partials, stored in bf16 as
  rows of an [8, D] buffer, come in by one TMA copy and the tensor cores add them (column i
  of the [64, 8] accumulator is the product with partial i). Its flat form runs in Mosaic
  GPU's interpreter (the tests do, with race detection).
- no barrier: partials are float32, armed with NaN; readers poll their values with volatile
  loads (`_poll_loads`) until none is NaN, sum them in registers and write x into the B tile.
  It was the faster chain (sixteenth session): 1.5-1.7 us a layer at D = 1024 against
  2.0-2.3 with barriers, and 87% of the copy bandwidth chained at D = 4096 on an H100 (the
  barrier's cost is its release, which waits for the SM's stores). Its square-layer
  prototype (`poll_matvec_chain`) became pallas_kernels/stage_chain.py, which keeps the
  polling helpers here; git history has the prototype.

The chain can record its consumer's phases with Mosaic GPU's profiler (profile_dir;
`profile_phases` reads the trace). The reference is `ring_matvec_chain_reference` (float32
products of the bf16 weights); the GPU numbers are in docs/benchmarks.md (fourteenth to
sixteenth sessions). An earlier form with x as the A operand, broadcast to 64 rows in
registers and rebuilt for every slot, streamed at 49-66% with 16 rows a CTA and lost to the
polling form at D = 4096; it is gone (git history has it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm, scf, vector
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.grouped_matmul_mosaic import _num_sms

WGMMA_M = 64  # rows (M) of a wgmma tile
K_STEP = 64  # contracted elements per wgmma (128 bytes of bf16: one 128-byte swizzle row)
SWIZZLED = (plgpu.TilingTransform((8, K_STEP)), plgpu.SwizzleTransform(128))  # wgmma operands


def ring_matvec_chain_reference(ws, x0):
    """xs [L, D] float32: the chain in float32 over the bf16 weights."""
    def step(x, w):
        y = jnp.dot(w.astype(jnp.float32), x, precision=lax.Precision.HIGHEST)
        return y, y
    return lax.scan(step, x0.astype(jnp.float32), ws)[1]


def _fence_proxy_async_global():
    """Orders this thread's global-memory accesses between the generic proxy (the semaphore's
    atomics and polls) and the async proxy (TMA copies)."""
    @plgpu.inline_mgpu()
    def fence(ctx):
        del ctx
        mgpu_utils.inline_ptx("fence.proxy.async.global;", has_side_effects=True)

    fence()


class _GridBarrier:
    """A barrier over all `num_ctas` CTAs on a global semaphore (module docstring): `arrive`
    once a CTA's outputs of a generation are in global memory (TMA stores waited for), `wait`
    for every CTA's `generation`-th arrival, and `reset` once per call after the last wait."""

    def __init__(self, num_ctas: int):
        self.num_ctas = num_ctas
        self.count = pl.get_global(plgpu.SemaphoreType.REGULAR)  # arrivals, all generations
        self.done = pl.get_global(plgpu.SemaphoreType.REGULAR)  # CTAs past their last wait

    def arrive(self):
        """This CTA's arrival: a release, so its plain stores before it are visible first
        (TMA stores also need `_fence_proxy_async_global` before it)."""
        plgpu.semaphore_signal(self.count, 1, memory_scope="gpu")

    def wait(self, generation):
        plgpu.semaphore_wait(self.count, self.num_ctas * generation, decrement=False,
                             memory_scope="gpu")
        _fence_proxy_async_global()

    def reset(self, cta, generations: int):
        """The count back to 0 for the next call, once every CTA is past its last wait."""
        plgpu.semaphore_signal(self.done, 1, memory_scope="gpu")

        @pl.when(cta == 0)
        def _last():
            plgpu.semaphore_wait(self.done, self.num_ctas, decrement=True, memory_scope="gpu")
            plgpu.semaphore_signal(self.count, -self.num_ctas * generations, memory_scope="gpu")


def _stream_weights(ws_ref, ring, full, empty, cta, total_slots: int, slots_per_layer: int):
    """The producer warpgroup: every slot of this CTA's weights (ws_ref[layer, cta, k]) in
    order into the ring, waiting only for a slot to be released."""
    stages = ring.shape[0]
    plgpu.set_max_registers(40, action="decrease")

    @pl.loop(0, total_slots)
    def _slot(i):
        slot = lax.rem(i, stages)

        @pl.when(i >= stages)
        def _wait_free():
            plgpu.barrier_wait(empty.at[slot])

        layer, k = lax.div(i, slots_per_layer), lax.rem(i, slots_per_layer)
        plgpu.copy_gmem_to_smem(ws_ref.at[layer, cta, k], ring.at[slot], full.at[slot])

    # Every release observed before the CTA ends (Mosaic GPU's interpreter checks it).
    @pl.loop(max(0, total_slots - stages), total_slots)
    def _drain(i):
        plgpu.barrier_wait(empty.at[lax.rem(i, stages)])


PROFILE_REGIONS = 512


def _launch(kernel, scratch, out_type, num_ctas: int, num_threads: int, *args,
            profile_dir=None, as_cluster: bool = False, approx_math: bool = False):
    """The kernel over num_ctas CTAs of num_threads warpgroups. With profile_dir, Mosaic GPU's
    profiler records each warpgroup's named scopes (the first PROFILE_REGIONS) and writes a
    trace (Chrome trace JSON, times in SM clock cycles) there per call. as_cluster: the CTAs
    as one cluster, for Mosaic GPU's interpreter, which runs a cluster's CTAs concurrently
    but the grid's one after another (CTAs polling each other's outputs need the former).
    approx_math: exp, log and rsqrt by the GPU's approximate instructions (relative error
    about 2**-22, far below bf16's rounding)."""
    def entry(*refs):
        pl.run_scoped(lambda *scratch_refs: kernel(*refs, *scratch_refs), *scratch,
                      collective_axes="wg")

    profile = dict(profile_space=PROFILE_REGIONS, profile_dir=str(profile_dir),
                   profile_bounds_check=True) if profile_dir else {}
    params = plgpu.CompilerParams(approx_math=approx_math, **profile)
    grid = dict(grid=(1,), grid_names=("grid",), cluster=(num_ctas,), cluster_names=("ctas",)
                ) if as_cluster else dict(grid=(num_ctas,), grid_names=("ctas",))
    return plgpu.kernel(entry, out_type=out_type, num_threads=num_threads, thread_name="wg",
                        compiler_params=params, **grid)(*args)


# ----------------------------------------------------------------------------- split-K form


@dataclasses.dataclass(frozen=True)
class SplitKBlocks:
    """The weights as the wgmma A operand: a CTA owns WGMMA_M (64) rows over D / k_splits
    contracted columns; k_slot: columns per ring slot; stages: ring slots."""
    k_splits: int = 4
    k_slot: int = 128
    stages: int = 8
    # How a CTA's partial sums reach global memory (split_k_matvec_chain): "tma" (a bulk copy
    # from shared memory, waited for, then a proxy fence before the arrival) or "generic"
    # (plain stores from registers, ordered by the arrival's release alone).
    store: str = "tma"


B_ROWS = 8  # rows of the B tile (wgmma N): the S partials of x, then zeros


def supports_split_k(ws_shape, dtype, blocks: SplitKBlocks = SplitKBlocks(),
                     num_sms: int = 132):
    """None if `split_k_matvec_chain` takes these weights, else the constraint they break."""
    if len(ws_shape) != 3 or ws_shape[1] != ws_shape[2]:
        return f"weights of shape {ws_shape} (needs [L, D, D])"
    d = ws_shape[1]
    if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
        return f"dtype {jnp.dtype(dtype).name} (needs bfloat16)"
    if d % WGMMA_M or (d // WGMMA_M) * blocks.k_splits > num_sms:
        return (f"D={d} in {WGMMA_M}-row blocks x {blocks.k_splits} splits (D: a multiple of "
                f"{WGMMA_M}; blocks x splits CTAs, at most {num_sms}: every CTA must be resident)")
    if blocks.store not in ("tma", "generic"):
        return f"store {blocks.store!r} (tma or generic)"
    if blocks.k_splits > B_ROWS:
        return f"{blocks.k_splits} splits (at most {B_ROWS}: the partials are the B tile's rows)"
    part = d // blocks.k_splits
    if d % blocks.k_splits or part % blocks.k_slot or blocks.k_slot % K_STEP:
        return (f"D={d} in {blocks.k_splits} splits with k_slot {blocks.k_slot} (each split a "
                f"multiple of k_slot; k_slot a multiple of {K_STEP})")
    # ring, B tile, and the polling form's float32 copy of the S partials of x's split
    smem = blocks.stages * WGMMA_M * blocks.k_slot * 2 + B_ROWS * part * 2 + 4 * d
    if smem > 220 * 1024:
        return f"{smem} bytes of ring, x tile and x's partials (over 220 KB of shared memory)"
    return None


def tile_weights_split_k(ws, blocks: SplitKBlocks = SplitKBlocks()):
    """[L, D, D] -> [L, C, slots, 64, k_slot]: CTA c = row block r * k_splits + split s owns
    rows [64 r, 64 r + 64) over columns [s D / S, (s + 1) D / S), each ring slot contiguous."""
    problem = supports_split_k(ws.shape, ws.dtype, blocks, _num_sms())
    if problem is not None:
        raise ValueError(f"split_k_matvec_chain does not take {problem}")
    num_layers, d, _ = ws.shape
    splits, k_slot = blocks.k_splits, blocks.k_slot
    slots = d // splits // k_slot
    tiled = ws.reshape(num_layers, d // WGMMA_M, WGMMA_M, splits, slots, k_slot)
    return tiled.transpose(0, 1, 3, 4, 2, 5).reshape(
        num_layers, d // WGMMA_M * splits, slots, WGMMA_M, k_slot)


def _split_k_input(tiled, x0, blocks: SplitKBlocks, rows: int, dtype):
    """(D, x0 as `rows` [D] rows of dtype: its partials, then zeros) for weights tiled by
    tile_weights_split_k with these blocks, x0 being [D] or up to S partials [n, D]; else a
    ValueError that says what to do."""
    _, num_ctas, slots, m, k_slot = tiled.shape
    splits = blocks.k_splits
    d = num_ctas // splits * WGMMA_M
    if (m, k_slot) != (WGMMA_M, blocks.k_slot) or num_ctas % splits or slots * k_slot * splits != d:
        raise ValueError(f"weights tiled as {tiled.shape} for blocks {blocks}: tile them with "
                         "tile_weights_split_k(ws, blocks)")
    if x0.shape != (d,) and not (x0.ndim == 2 and x0.shape[0] <= splits and x0.shape[1] == d):
        raise ValueError(f"x0 of shape {x0.shape} for weights of D={d}: it must be [{d}] or "
                         f"up to {splits} partial sums [n, {d}]")
    parts = x0.reshape(-1, d).astype(dtype)
    return d, jnp.zeros((rows, d), dtype).at[:parts.shape[0]].set(parts)


def _split_k_products(ring, full, empty, b_smem, math: bool, first, acc_ref):
    """One unit's products of a split-K consumer: its b_smem.shape[1] / k_slot ring slots, the
    first being the `first`-th this CTA's producer filled, each (waited for) times the B
    tile's matching columns, one wgmma in flight (a slot is released once the next one's
    wgmma is issued and the one before is done). -> the [64, 8] accumulator."""
    stages, _, k_slot = ring.shape
    slots = b_smem.shape[1] // k_slot

    def slot_of(k):
        return lax.rem(first + k, stages)

    @pl.loop(0, slots)
    def _slot(k):
        plgpu.barrier_wait(full.at[slot_of(k)])
        if math:
            plgpu.wgmma(acc_ref, ring.at[slot_of(k)],
                        b_smem.at[:, pl.ds(k * k_slot, k_slot)].transpose((1, 0)))
            plgpu.wgmma_wait(1)  # the slot before is read: release it

            @pl.when(k > 0)
            def _release():
                plgpu.barrier_arrive(empty.at[slot_of(k - 1)])
        else:
            plgpu.barrier_arrive(empty.at[slot_of(k)])

    if math:
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(empty.at[slot_of(slots - 1)])
    return acc_ref[...]


def split_k_matvec_chain(tiled, x0, *, blocks: SplitKBlocks = SplitKBlocks(), chain: bool = True,
                         math: bool = True, profile_dir=None):
    """xs [L, D] float32, xs[l] = ws[l] @ xs[l - 1] from x0, tiled =
    tile_weights_split_k(ws, blocks), with a grid barrier between layers.

    Each k16 wgmma consumes a [64, 16] weight tile (2 KB) as the A operand from the ring, and
    x is an N = 8 B operand that one TMA copy brings in per layer, with no register work.
    - CTA c = r * S + s (S = k_splits) multiplies rows [64 r, 64 r + 64) of each layer's
      weights with x's split s, columns [s D / S, (s + 1) D / S), and stores the partial sums
      of its 64 rows, in bf16, as row s of the layer's output: parts [L, 8, D].
    - After the grid barrier, each CTA copies its split of all 8 rows of the layer before
      ([8, D / S]) into a swizzled shared-memory tile: the wgmma B operand (transposed). Rows
      S.. are zeros (written once per call). Column i of the [64, 8] accumulator is then the
      product with partial i, and the CTA's sums are the accumulator's row sums: the S
      partials are added by the tensor cores, never by a separate pass.
    - The A operand comes from shared memory, so a wgmma stays in flight across slots and a
      slot is released one slot late.
    x enters every layer as S bf16 partials (the sum of their roundings, not the rounding of
    their sum); x0 may be [D] or up to S such partials [n, D]. profile_dir: write a trace of
    the consumer's phases (named scopes: barrier wait, x copy, products, store, the TMA
    form's proxy fence, arrival; `profile_phases` reads it) there per call. Timing only:
    chain=False multiplies x0 in every layer; math=False leaves out the products. The
    wrapper sums the S partials of every layer (xs)."""
    num_layers, num_ctas, slots_per_layer, _, k_slot = tiled.shape
    splits = blocks.k_splits
    d, x0_rows = _split_k_input(tiled, x0, blocks, B_ROWS, tiled.dtype)
    part = d // splits  # columns of a split
    stages = blocks.stages
    total_slots = num_layers * slots_per_layer
    dtype = tiled.dtype
    zero_rows = B_ROWS - splits

    def kernel(ws_ref, x0_ref, parts_ref, ring, full, empty, b_smem, b_barrier, y_smem, z_smem):
        wg = lax.axis_index("wg")
        cta = lax.axis_index("ctas")
        block, split = lax.div(cta, splits), lax.rem(cta, splits)
        row0 = block * WGMMA_M
        barrier = _GridBarrier(num_ctas) if chain else None

        @pl.when(wg == 1)
        def _producer():
            _stream_weights(ws_ref, ring, full, empty, cta, total_slots, slots_per_layer)

        products = functools.partial(_split_k_products, ring, full, empty, b_smem, math)

        @pl.when(wg == 0)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            if chain and zero_rows:
                # Rows S.. of every layer's partials, which the B copies read: zeros, written
                # by split 0 of each row block and waited for before its first arrival (whose
                # proxy fence and release cover them).
                @pl.when(split == 0)
                def _zeros():
                    z_smem[...] = jnp.zeros(z_smem.shape, dtype)
                    plgpu.commit_smem()

                    @pl.loop(0, num_layers)
                    def _layer(layer):
                        plgpu.copy_smem_to_gmem(
                            z_smem, parts_ref.at[layer, pl.ds(splits, zero_rows),
                                                 pl.ds(row0, WGMMA_M)])

                    plgpu.wait_smem_to_gmem(0)
                    _fence_proxy_async_global()  # (TMA stores, ordered before the arrivals)

            @pl.loop(0, num_layers)
            def _layer(layer):
                @pl.when((layer == 0) | (not chain))
                def _first():
                    plgpu.copy_gmem_to_smem(x0_ref.at[:, pl.ds(split * part, part)], b_smem,
                                            b_barrier)

                if chain:
                    @pl.when(layer > 0)
                    def _chained():  # every CTA's partials of layer - 1 stored
                        with jax.named_scope("wait"):
                            barrier.wait(layer)
                        plgpu.copy_gmem_to_smem(
                            parts_ref.at[layer - 1, :, pl.ds(split * part, part)], b_smem,
                            b_barrier)

                with jax.named_scope("x"):
                    plgpu.barrier_wait(b_barrier)
                with jax.named_scope("products"):
                    acc = pl.run_scoped(functools.partial(products, layer * slots_per_layer),
                                        plgpu.ACC((WGMMA_M, B_ROWS), jnp.float32))
                with jax.named_scope("store"):
                    if math:
                        y = acc.sum(axis=1).astype(dtype)  # column i: partial i
                    else:
                        y = plgpu.layout_cast(jnp.zeros((WGMMA_M,), dtype),
                                              plgpu.Layout.WGMMA.reduce(1))
                    destination = parts_ref.at[layer, split, pl.ds(row0, WGMMA_M)]
                    if blocks.store == "generic":
                        destination[...] = y
                    else:
                        y_smem[...] = y
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(y_smem, destination)
                        plgpu.wait_smem_to_gmem(0)
                if chain:
                    if blocks.store == "tma":
                        with jax.named_scope("fence"):
                            _fence_proxy_async_global()
                    with jax.named_scope("arrive"):
                        barrier.arrive()

            if chain:
                barrier.reset(cta, num_layers)

    scratch = (
        plgpu.SMEM((stages, WGMMA_M, k_slot), dtype, transforms=SWIZZLED),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        plgpu.SMEM((B_ROWS, part), dtype, transforms=SWIZZLED),
        plgpu.Barrier(),
        plgpu.SMEM((WGMMA_M,), dtype),
        plgpu.SMEM((max(1, zero_rows), WGMMA_M), dtype),
    )
    out_type = jax.ShapeDtypeStruct((num_layers, B_ROWS, d), dtype)
    parts = _launch(kernel, scratch, out_type, num_ctas, 2, tiled, x0_rows,
                    profile_dir=profile_dir)
    return parts[:, :splits].astype(jnp.float32).sum(axis=1)


# ------------------------------------------------------------------ split-K, polling the data

NOT_WRITTEN = float("nan")  # a partial sum not yet stored in this call
MAX_POLLS = 1 << 16  # copies of x a layer may take before it goes on (with NaN) instead of hanging


def _poll_loads(sources, shape, vec: int | None = None):
    """The float32 refs `sources` (global memory) as WG_STRIDED arrays, each thread reloading
    its own values until none is NaN (at most MAX_POLLS rounds). `shape` and `vec` are each
    source's shape and vector width, or (a list) a (shape, vec) per source: sources of
    different shapes share the rounds, so one poll costs one memory round trip.

    The loads are volatile, so they bypass the SM's L1 (which does not see other SMs' stores)
    and are not merged or hoisted by the compiler; each round issues all of the thread's loads
    before it checks any. No thread waits for another, so there is no cross-thread reduction
    per round; the caller's next warpgroup-wide step (a commit_smem) joins them."""
    specs = list(shape) if isinstance(shape, list) else [(shape, vec)] * len(sources)

    @plgpu.inline_mgpu(
        arg_types=tuple(plgpu.RefType() for _ in sources),
        return_type=tuple(plgpu.ShapeDtypeStruct(sh, jnp.float32,
                                                 layout=plgpu.Layout.WG_STRIDED(sh, vec_size=v))
                          for sh, v in specs))
    def poll(ctx, *refs):
        del ctx
        f32, i32 = ir.F32Type.get(), ir.IntegerType.get_signless(32)
        i64 = ir.IntegerType.get_signless(64)
        pointers, types, updates = [], [], []
        for ref, (_, v) in zip(refs, specs):
            vec_ty = ir.VectorType.get((v,), f32)
            updates.append([])
            for _get, update, transfer_ref, idx in mgpu.FragmentedArray.transfer_strided(
                    ref, v):
                strides, _ = ir.MemRefType(transfer_ref.type).get_strides_and_offset()
                flat = mgpu_utils.dyn_dot(idx, [arith.constant(ir.IndexType.get(), st)
                                                for st in strides])
                index = arith.index_cast(i64, arith.divui(flat, arith.constant(
                    ir.IndexType.get(), v)))
                pointers.append(mgpu_utils.getelementptr(mgpu_utils.memref_ptr(transfer_ref),
                                                         [index], vec_ty))
                types.append(vec_ty)
                updates[-1].append(update)
        n = len(pointers)
        i1 = ir.IntegerType.get_signless(1)
        # A do-while: the before region loads and checks; its condition's operands are the
        # loop's results, so the last round's values come out. (Two rounds in flight, the
        # next issued before the last is checked, were slower on an H100: design.md.)
        loop = scf.WhileOp([i32] + types, [arith.constant(i32, 0)])
        before = loop.before.blocks.append(i32)
        with ir.InsertionPoint(before):
            count = arith.addi(before.arguments[0], arith.constant(i32, 1))
            values = [llvm.load(t, ptr, volatile_=True) for t, ptr in zip(types, pointers)]
            nan = arith.constant(i1, 0)
            for v in values:
                nan = arith.ori(nan, vector.reduction(i1, vector.CombiningKind.OR,
                                                      arith.cmpf(arith.CmpFPredicate.UNO, v, v)))
            again = arith.andi(nan, arith.cmpi(arith.CmpIPredicate.slt, count,
                                               arith.constant(i32, MAX_POLLS)))
            scf.condition(again, [count, *values])
        after = loop.after.blocks.append(i32, *types)
        with ir.InsertionPoint(after):
            scf.yield_([after.arguments[0]])
        results = list(loop.results)[1:1 + n]
        arrays = []
        for group, (sh, v) in zip(updates, specs):
            mgpu_layout = mgpu.WGStridedFragLayout(shape=sh, vec_size=v)
            registers = np.empty(mgpu_layout.registers_shape(sh), dtype=object)
            for update in group:
                update(registers, results.pop(0))
            arrays.append(mgpu.FragmentedArray(_registers=registers, _layout=mgpu_layout,
                                               _is_signed=None))
        return tuple(arrays)

    return poll(*sources)


def _polling_scratch(stages: int, k_slot: int, part: int):
    """A polling consumer's shared memory: the weight ring of `stages` [64, k_slot] bf16
    slots, its full and empty barriers, and the B tile [8, part] bf16 with its unswizzled
    view [part / 64, 8, 64] (row 0 of each 8 x 64 tile is where the swizzle leaves it)."""
    return (
        plgpu.SMEM((stages, WGMMA_M, k_slot), jnp.bfloat16, transforms=SWIZZLED),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        plgpu.RefUnion(plgpu.SMEM((B_ROWS, part), jnp.bfloat16, transforms=SWIZZLED),
                       plgpu.SMEM((part // K_STEP, B_ROWS, K_STEP), jnp.bfloat16)),
    )


def profile_phases(trace: dict) -> dict:
    """{phase: {"cycles": median over CTAs and layers, "count": n}} of a profiled call's
    trace (the JSON the profiler writes): the consumer's named scopes, each from its begin to
    its matching end. Outermost scopes go by their names; a scope directly inside one goes by
    "outer/inner" (one of the outer's own name, a scope inside a conditional, is not counted
    twice). "layer" is the median time from one layer's "x" begin to the next's (the whole
    loop body, gaps included). The profiler's timestamps are SM clock cycles (its "ts" divides
    them by 1e3, as if they were ns)."""
    durations: dict = {}
    starts: dict = {}
    for thread, events in _by_thread(trace["traceEvents"]).items():
        opened: list = []
        for event in events:
            if event["ph"] == "B":
                if not opened and event["name"] == "x":
                    starts.setdefault(thread, []).append(event["ts"])
                opened.append(event)
                continue
            begin = opened.pop()
            names = [e["name"] for e in opened] + [begin["name"]]
            if len(names) > 2 or (len(names) == 2 and names[0] == names[1]):
                continue
            durations.setdefault("/".join(names), []).append(
                round((event["ts"] - begin["ts"]) * 1e3))
    for begins in starts.values():
        durations.setdefault("layer", []).extend(
            round((b - a) * 1e3) for a, b in zip(begins, begins[1:]))
    return {name: {"cycles": float(np.median(values)), "count": len(values)}
            for name, values in durations.items()}


def _by_thread(events) -> dict:
    threads: dict = {}
    for event in events:
        threads.setdefault((event["pid"], event["tid"]), []).append(event)
    return threads
