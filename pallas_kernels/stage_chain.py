"""A decode step's chain of matrix-vector products, with its real shapes, in one persistent
Mosaic GPU kernel: the polling chain of ring_matvec.py generalized from L square layers to
stages of different shapes, as a step's qkv, o-proj, gate/up, down and output layer are.

    plan = ChainPlan(layer=(Stage(2304, 768, 3), Stage(768, 768, 6), ...), tail=(Stage(50304,
                     768, 1),), num_layers=12)          # or chain_plan_for(cfg)
    tiled = tile_chain(plan, layer_ws, tail_ws)   # once at load time
    outs = stage_chain(plan, tiled, x0)           # each stage's output, float32

(The plan, its checks, the tiling and the float references are in chain_plan.py, the
carried state and the norm weights' layout in chain_state.py; this module imports them, so
it is the one to import.)

Stage k multiplies its [rows, cols] bf16 weights with the first `cols` values of the stage
before's output (x0 for the first), after its prologue: none ("sum"), or the model's own
("norm": the residual stream plus the stage before's output, RMS-normalized and scaled;
"swiglu": silu(gate) * up). So the chain has the step's bytes and its dependencies, with or
without the model's elementwise work. With an attention stage (chain_plan_for(cfg,
prologues=True, max_len=)) it is the whole decode step but the embedding lookup and the
sampling: attention over a bf16 cache it extends, RoPE, and the merge of attention's
partials as o-proj's prologue (stage_chain's docstring). pallas_kernels/chain_step.py runs
a model's step on it (decode.generate(pallas_step="chain")); docs/design.md, "Decoding",
has the decisions and docs/benchmarks.md the measurements.

How it runs (the polling form of ring_matvec.py, generalized):
- A stage's work is split into units of 64 output rows times one of `splits` column splits
  (the contraction split over CTAs); unit u = r * splits + s. Units go round robin over the
  resident CTAs (u = c + j * C), so a big stage (the output layer: 786 row blocks at 125m)
  gives each CTA several, and a small one leaves some CTAs without.
- Each CTA's producer warpgroup streams the [64, k_slot] weight slots of all its units, in
  the order the consumer takes them, through a ring of shared-memory slots, never waiting for
  the chain.
- Its consumer warpgroup, per unit: polls its column split of all the partial sums of the
  stage before (float32, armed with NaN once per call; each thread reloads its own values
  with volatile loads until none is NaN), sums them into x, writes x in bf16 into row 0 of an
  N = 8 wgmma B tile, multiplies its slots (the weights as the A operand) and stores its 64
  partial sums. Where the CTA count divides by a stage's splits, a CTA's units of that stage
  share one split of x, polled once.
- Splits are chosen per stage (`choose_splits`) so the busiest CTA streams the fewest slots.
The tests run the kernel's logic in Mosaic GPU's interpreter (`interpret=True`: the CTAs as
one cluster, whose CTAs it runs concurrently; polls by plain loads; x written into the B
tile's wgmma view, since the interpreter does not alias RefUnion views) against the float32
reference, plain and with prologues, over both parities of the state. What the interpreter
does not model (volatile loads, the unswizzled view, the GPU's memory ordering, timing) is
checked on the GPU by tools/bench_stage_chain.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# The plan, its tiling and the references (chain_plan.py), imported for the kernel and so that
# this module is the one its users import (__all__).
from pallas_kernels.chain_plan import (CHUNK, HEAD_DIM, MAX_POLLED_VALUES, OUT_ROWS,
                                       SHARED_MEMORY, SHARED_STAGING_BELOW, UNIT_COST, ChainPlan,
                                       Stage, _qkv_order, attention_reference, attention_stage,
                                       chain_plan_for, check_plan, choose_splits,
                                       dot_like_kernel, rope_tables, rotate_half_rope,
                                       shared_memory, stage_chain_reference, swizzle_rows,
                                       tile_chain)
from pallas_kernels.chain_state import (_norm_inputs, _parts_shapes, _residual_shapes,
                                        init_chain_state, merge_attention_partials)
from pallas_kernels.grouped_matmul_mosaic import _num_sms
from pallas_kernels.ring_matvec import (B_ROWS, K_STEP, NOT_WRITTEN, SWIZZLED, WGMMA_M,
                                        _GridBarrier, _launch, _poll_loads, _polling_scratch,
                                        _split_k_products)

__all__ = ["CHUNK", "HEAD_DIM", "MAX_POLLED_VALUES", "OUT_ROWS", "SHARED_MEMORY",
           "SHARED_STAGING_BELOW", "UNIT_COST", "ChainPlan", "Stage", "attention_reference",
           "attention_stage", "chain_plan_for", "check_plan", "choose_splits", "dot_like_kernel",
           "init_chain_state", "merge_attention_partials", "rope_tables", "rotate_half_rope",
           "shared_memory", "stage_chain", "stage_chain_reference", "swizzle_rows", "tile_chain"]

INTERPRET_POLLS = 1 << 20  # the interpreted form's polls (its CTAs are threads: slow to come)


def _norm_chunk(width: int, inputs: int) -> int:
    """Columns a norm prologue polls at once: the most (a multiple of 128 dividing width)
    that keep a thread's polled values within MAX_POLLED_VALUES."""
    return max(c for c in range(128, width + 1, 128)
               if width % c == 0 and inputs * c // 128 <= MAX_POLLED_VALUES)


def _vec(size: int) -> int:
    """A thread's vector width in a WG_STRIDED float32 array of `size` values: the widest
    that fits."""
    return max(v for v in (1, 2, 4) if size % (128 * v) == 0)


def _strided_shape(shape):
    """WG_STRIDED for a float32 array of `shape`, the widest vectors that fit."""
    return plgpu.Layout.WG_STRIDED(shape, vec_size=_vec(shape[0] * shape[1]))


def _strided(tiles: int):
    return _strided_shape((tiles, K_STEP))


def stage_chain(plan: ChainPlan, tiled, x0, *, norms=None, state=None, pos=None, rope=None,
                profile_dir=None, interpret: bool = False):
    """The chain on the GPU: (per layer stage [L, rows], per tail stage [rows]) float32, as
    stage_chain_reference. tiled = tile_chain(plan, ...); x0 [plan.layer[0].cols] float32;
    norms as stage_chain_reference's (needed where the plan has norm stages).

    Without `state`, each call first arms its partial sums with NaN and waits at a grid
    barrier until every CTA has (measured 6-12 us a call in ring_matvec's polling chain).
    With state = init_chain_state(plan) (then the state each call returns), it returns
    (outputs, new state) and needs no arming pass and no barrier: the call writes the
    parity the state names, which the call before armed, and its producer warpgroups, idle
    once their weights are issued, arm the other parity for the next call. Pass the state
    functionally (a fori_loop carry, or donated): each call's returned state is the only
    one whose parity is armed for the next.

    Prologues (Stage.prologue): a norm unit polls the residual and the stage before's output
    over the whole width, in chunks, adds them into a float32 staging tile and sums their
    squares; unit 0 of the stage writes the new residual; the unit's split is then scaled by
    the RMS and the norm weights. A swiglu unit polls its split of both halves.

    Attention (a plan from chain_plan_for(..., max_len=)): needs a state (which holds the
    cache), pos (the new token's position; the cache holds the positions before it) and
    rope = rope_tables(plan, inv_freq). Unit (kv head h, chunk c) polls the q of h's G query
    heads from the qkv stage, applies RoPE (the row doubled in shared memory, read 32 columns
    on: rotate-half as one load), writes it into rows 0..G-1 of a [64, 64] q tile (plain
    stores of the swizzle-ordered rows; swizzle_rows), scores the chunk's CHUNK cached keys
    (TMA-loaded before the poll) with one wgmma, masks positions >= pos, and multiplies the
    softmax's exponentials with the values (a second wgmma, the probabilities as the A
    operand from registers); it stores its G rows of normalized output and log-sum-exp by
    TMA. Chunk `chunks` is the new token: its k (after RoPE) and v go into row 0 of the tiles
    and, by TMA, into the cache at pos. The merge stage's units poll all chunks' partials of
    their heads (the new token's first, in groups of at most plan.merge_values a thread) and
    merge them by their log-sum-exps.

    profile_dir: a Mosaic GPU profiler trace of the consumer's phases ("arm" without state,
    then per polled unit "x" (the poll and prologue), per unit "products" and "store";
    attention units: "att_q" (the poll of q, then "rope"), or for the new token's unit
    "att_new" (q, k and v polled together, RoPE, k and v into the cache), then "att_math"
    ("kv_wait", "qk", "softmax", "pv", "out": the output staging) and "att_store"; an inner
    scope reports as "outer/inner" in ring_matvec.profile_phases).
    interpret: the form Mosaic GPU's interpreter runs (under plgpu.force_gpu_interpret_mode,
    called eagerly, with a state: it has no global semaphores), for the tests: the CTAs as
    one cluster, polls by plain loads, x written into the B tile's wgmma view. It checks the
    kernel's logic (units, slots, prologues, parities), not the GPU's memory model."""
    num_ctas = plan.ctas or _num_sms()
    problem = check_plan(plan, num_ctas)
    if problem:
        raise ValueError(f"stage_chain does not take {problem}")
    stages = plan.layer + plan.tail
    if len(tiled) != len(stages):
        raise ValueError(f"{len(tiled)} tiled weights for {len(stages)} stages (tile them with "
                         "tile_chain(plan, ...))")
    for i, (t, st) in enumerate(zip(tiled, stages)):
        want = (plan.num_layers if i < len(plan.layer) else 1, st.units, st.part // plan.k_slot,
                WGMMA_M, plan.k_slot) if st.weighted else None
        if (t is None and want is not None) or (t is not None and t.shape != want):
            raise ValueError(f"tiled weights {None if t is None else t.shape} for stage {i}: "
                             f"want {want} (tile them with tile_chain(plan, ...))")
    first = plan.layer[0]
    if x0.shape != (first.cols,):
        raise ValueError(f"x0 of shape {x0.shape}: the first stage reads [{first.cols}]")
    num_layers, k_slot, ring_slots = plan.num_layers, plan.k_slot, plan.ring
    n_layer = len(plan.layer)
    n = len(stages)
    weighted = [i for i, st in enumerate(stages) if st.weighted]
    n_w = len(weighted)
    norm_stages = [i for i, st in enumerate(stages) if st.prologue == "norm"]
    norm_ws = _norm_inputs(plan, norms, norm_stages)
    n_norm = len(norm_stages)
    width = stages[norm_stages[0]].cols if norm_stages else 0  # the residual stream's
    max_part = max(st.part for st in stages if st.weighted)
    dtype = jnp.bfloat16
    persistent = state is not None
    if interpret and not persistent:
        raise ValueError("the interpreted form needs a state (state=init_chain_state(plan)): "
                         "the interpreter has no global semaphores for the arming barrier")
    att_k = plan.attention
    if att_k is not None:
        att = plan.layer[att_k]
        if not persistent or "cache" not in state:
            raise ValueError("a plan with attention needs a state with the cache "
                             "(state=init_chain_state(plan, cache))")
        if pos is None or rope is None:
            raise ValueError("a plan with attention needs pos (the new token's position) and "
                             "rope=rope_tables(plan, inv_freq)")
        tables = (att.chunks * CHUNK, 8, HEAD_DIM)
        if len(rope) != 2 or any(tuple(t.shape) != tables for t in rope):
            raise ValueError(f"rope tables {[t.shape for t in rope]}: want (cos, sin), each "
                             f"{tables} (rope_tables(plan, inv_freq))")
        if interpret == plan.swizzle_q and att.group > 1:
            raise ValueError("swizzle_q must be off in the interpreted form (its views do not "
                             "alias) and on on the GPU (plan.swizzle_q)")
        if isinstance(pos, int) and not 0 <= pos < att.chunks * CHUNK:
            raise ValueError(f"pos {pos} outside the cache's {att.chunks * CHUNK} positions")
    n_att = int(att_k is not None)

    def prev_norm(i, layer):
        """(the position in norm_stages and the layer of the norm stage instance before stage
        i's at `layer`, whose residual i adds to; layer -1 for layer 0's first: x0 there)."""
        pos = norm_stages.index(i)
        last_in_layer = max(q for q, k in enumerate(norm_stages) if k < n_layer)
        if i < n_layer:
            return (pos - 1, layer) if pos > 0 else (last_in_layer, layer - 1)
        if norm_stages[pos - 1] >= n_layer:  # (pos > 0: stage 0 is a norm stage)
            return pos - 1, 0
        return last_in_layer, num_layers - 1

    def kernel(*refs):
        refs = list(refs)

        def take(count):
            out = refs[:count]
            del refs[:count]
            return out

        w_refs = take(n_w)
        ws_refs = {k: w_refs[weighted.index(k)] for k in weighted}
        x0_ref, parity_ref, pos_ref = take(3)
        g_refs = take(n_norm)
        cos_ref, sin_ref = take(2) if n_att else (None, None)
        all_parts = take(n)  # with state: [2, ...] parities
        all_resid = take(n_norm)
        cache_k, cache_v = take(2) if n_att else (None, None)
        ring, full, empty, b_views = take(4)
        staging = take(1) if norm_stages else []
        if n_att:
            q_views, k_views, v_views, rope_stage, o_stage = take(5)
            lse_stage = None if plan.shared_staging else take(1)[0]
            kv_bar = take(1)[0]
            p_stage = take(1) if interpret else None
        b_smem, b_plain = b_views  # [8, max_part] swizzled (wgmma) / [tiles, 8, 64] (stores)
        wg = lax.axis_index("wg")
        cta = lax.axis_index("ctas")
        barrier = None if persistent else _GridBarrier(num_ctas)
        parts, resid = all_parts, all_resid
        strided128 = plgpu.Layout.WG_STRIDED((128,), 1)
        if persistent:
            parity = jnp.max(plgpu.load(parity_ref, layout=strided128))
            parts = [p.at[parity] for p in all_parts]
            resid = [r.at[parity] for r in all_resid]
        position = jnp.max(plgpu.load(pos_ref, layout=strided128)) if n_att else None

        def attention_unit_of(st, unit):
            """(kv head, chunk) of an attention unit; chunk st.chunks is the new token. The
            kv heads' new-token units come first: they are the longest (the poll of q, k and
            v, the cache write) and every merge waits for them, so they go to CTAs as their
            first attention unit. (Head-major, 1b at 4,096 positions ran the new-token units
            of heads h and h + 4 one after the other on one CTA: 33 units a head, 132 CTAs.)"""
            cached = jnp.maximum(unit - st.kv_heads, 0)
            return (jnp.where(unit < st.kv_heads, unit, lax.div(cached, st.chunks)),
                    jnp.where(unit < st.kv_heads, st.chunks, lax.rem(cached, st.chunks)))

        def attention_geometry(st, unit):
            """(kv head, chunk, whether the unit is the new token's, its first position,
            positions it scores, whether it loads K and V from the cache)."""
            h, c = attention_unit_of(st, unit)
            new = c == st.chunks
            t0 = c * CHUNK
            valid = jnp.where(new, 1, jnp.clip(position - t0, 0, CHUNK))
            return h, c, new, t0, valid, jnp.logical_and(jnp.logical_not(new), valid > 0)

        def load_kv(layer, h, t0):
            plgpu.copy_gmem_to_smem(cache_k.at[layer, h, pl.ds(t0, CHUNK)], k_views[0],
                                    kv_bar.at[0])
            plgpu.copy_gmem_to_smem(cache_v.at[layer, h, pl.ds(t0, CHUNK)], v_views[0],
                                    kv_bar.at[1])

        def arm(buffers, residuals, k, layer, j, unit):
            st = stages[k]
            if st.prologue == "attention":  # its G rows (a window of at least 2: the layout)
                h, c = attention_unit_of(st, unit)
                rows = max(st.group, 2)
                start = jnp.minimum(h * st.group, st.rows // HEAD_DIM - rows)
                buffers[k].at[layer, c, pl.ds(start, rows)][...] = plgpu.layout_cast(
                    jnp.full((rows, 2 * HEAD_DIM), NOT_WRITTEN, jnp.float32),
                    _strided_shape((rows, 2 * HEAD_DIM)))
                return
            buffers[k].at[layer, lax.rem(unit, st.splits), lax.div(unit, st.splits)][...] = (
                plgpu.layout_cast(jnp.full((WGMMA_M,), NOT_WRITTEN, jnp.float32),
                                  plgpu.Layout.WGMMA.reduce(1)))
            if st.prologue == "norm":  # unit 0 writes the residual
                @pl.when(unit == 0)
                def _residual():
                    tiles = width // K_STEP
                    residuals[norm_stages.index(k)].at[layer][...] = plgpu.layout_cast(
                        jnp.full((tiles, K_STEP), NOT_WRITTEN, jnp.float32), _strided(tiles))

        def count(st):  # this CTA's units of a stage (round robin)
            return lax.div(st.units - cta + num_ctas - 1, num_ctas)

        slots = [st.part // k_slot if st.weighted else 0 for st in stages]
        counts = [count(st) for st in stages]
        per_layer = sum(counts[k] * slots[k] for k in range(n_layer))

        def first_slot(k, layer, j=0):
            """How many slots this CTA's producer filled before unit j of stage k (k = n: all
            of them)."""
            if k < n_layer:
                return layer * per_layer + sum(counts[i] * slots[i] for i in range(k)) + (
                    j * slots[k])
            before = num_layers * per_layer + sum(counts[i] * slots[i] for i in range(n_layer, k))
            return before + (j * slots[k] if k < n else 0)

        def for_each_unit(body):
            """body(k, layer, j, unit) for this CTA's units, in the chain's order."""
            @pl.loop(0, num_layers)
            def _layer(layer):
                for k in range(n_layer):
                    @pl.loop(0, counts[k])
                    def _unit(j, k=k):
                        body(k, layer, j, cta + j * num_ctas)

            for k in range(n_layer, n):
                @pl.loop(0, counts[k])
                def _unit(j, k=k):
                    body(k, 0, j, cta + j * num_ctas)

        @pl.when(wg == 1)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            def stream(k, layer, j, unit):
                if not slots[k]:
                    return
                base = first_slot(k, layer, j)

                @pl.loop(0, slots[k])
                def _slot(q):
                    i = base + q
                    slot = lax.rem(i, ring_slots)

                    @pl.when(i >= ring_slots)
                    def _wait_free():
                        plgpu.barrier_wait(empty.at[slot])

                    plgpu.copy_gmem_to_smem(ws_refs[k].at[layer, unit, q], ring.at[slot],
                                            full.at[slot])

            for_each_unit(stream)
            if persistent:  # the next call's parity, read by no one in this call
                for_each_unit(functools.partial(arm, [p.at[1 - parity] for p in all_parts],
                                                [r.at[1 - parity] for r in all_resid]))
            total = first_slot(n, 0)

            @pl.loop(jnp.maximum(total - ring_slots, 0), total)
            def _drain(i):  # every release observed before the CTA ends
                plgpu.barrier_wait(empty.at[lax.rem(i, ring_slots)])

        def source_of(k, layer):
            """(the partials ref a stage reads, [S, rows / 64, 64], and S)."""
            if k == 0:
                return parts[n_layer - 1].at[jnp.maximum(layer - 1, 0)], plan.layer[-1].splits
            if k == n_layer:
                return parts[n_layer - 1].at[num_layers - 1], plan.layer[-1].splits
            return parts[k - 1].at[layer if k < n_layer else 0], stages[k - 1].splits

        def poll(views, tiles):
            """views' [tiles, 64] values (tiles: one count, or a list of one a view), polled
            together until none is NaN."""
            counts = tiles if isinstance(tiles, list) else [tiles] * len(views)
            if interpret:  # (no inline Mosaic GPU code there; its memory is coherent)
                def load(_=None):
                    return tuple(plgpu.load(v, layout=_strided(t))
                                 for v, t in zip(views, counts))

                def again(carry):
                    nan = sum(jnp.sum(jnp.isnan(v).astype(jnp.int32)) for v in carry[0])
                    return (nan > 0) & (carry[1] < INTERPRET_POLLS)

                values, _ = lax.while_loop(again, lambda c: (load(), c[1] + 1),
                                           (load(), jnp.int32(1)))
                return list(values)
            return list(_poll_loads(views, [((t, K_STEP), _vec(t * K_STEP)) for t in counts]))

        def poll_sums(refs, blocks):
            """For each (col, tiles) of blocks, the sum of refs' [col, col + tiles) rows of
            64: all polled together (one memory round trip when they are there)."""
            views = [r.at[pl.ds(col, tiles)] for col, tiles in blocks for r in refs]
            values = poll(views, [tiles for _, tiles in blocks for _ in refs])
            sums = []
            for i in range(len(blocks)):
                group = values[i * len(refs):(i + 1) * len(refs)]
                sums.append(sum(group[1:], group[0]))
            return sums

        def poll_sum(refs, col, tiles):
            """The sum of refs' [col, col + tiles) rows of 64, polled."""
            return poll_sums(refs, [(col, tiles)])[0]

        def partials(source, count):
            return [source.at[i] for i in range(count)]

        def x_sum(k, layer, split):
            st = stages[k]
            tiles = st.part // K_STEP
            source, count = source_of(k, layer)
            if st.prologue == "swiglu":
                gate = poll_sum(partials(source, count), split * tiles, tiles)
                up = poll_sum(partials(source, count), st.cols // K_STEP + split * tiles, tiles)
                return gate / (1.0 + jnp.exp(-gate)) * up
            if k == 0:
                return lax.cond(layer == 0,
                                lambda: poll_sum([x0_ref.at[0]], split * tiles, tiles),
                                lambda: poll_sum(partials(source, count), split * tiles, tiles))
            return poll_sum(partials(source, count), split * tiles, tiles)

        def x_merge(k, layer, split):
            """The merge prologue: this unit's heads' attention outputs from all chunks'
            partials (the new token's first, so the running max is finite from the start)."""
            st, at = stages[k], stages[k - 1]
            heads = st.part // HEAD_DIM
            source = parts[k - 1].at[layer]  # [chunks + 1, heads, 128]
            order = [at.chunks] + list(range(at.chunks))
            group = plan.merge_values // heads  # partials a poll (check_plan: at least 1)
            top = total = acc = None
            for g0 in range(0, len(order), group):
                chunk_ids = order[g0:g0 + group]
                rows = [source.at[c, pl.ds(split * heads, heads)] for c in chunk_ids]
                values = poll([r.at[:, pl.ds(0, HEAD_DIM)] for r in rows]
                              + [r.at[:, pl.ds(HEAD_DIM, HEAD_DIM)] for r in rows], heads)
                outs, lses = values[:len(rows)], values[len(rows):]
                # The running max over all groups so far: a group of chunks past the cache's
                # positions (log-sum-exps -inf) then weighs 0, not exp(-inf + inf) = NaN, and
                # the rescale of what came before is at most 1.
                new_top = lses[0] if top is None else jnp.maximum(top, lses[0])
                for lse in lses[1:]:
                    new_top = jnp.maximum(new_top, lse)
                weights = [jnp.exp(lse - new_top) for lse in lses]
                part_total = sum(weights[1:], weights[0])
                part_acc = sum((w * o for w, o in zip(weights[1:], outs[1:])),
                               weights[0] * outs[0])
                if top is None:
                    total, acc = part_total, part_acc
                else:
                    rescale = jnp.exp(top - new_top)
                    total, acc = total * rescale + part_total, acc * rescale + part_acc
                top = new_top
            return acc / total

        def x_norm(k, layer, j, unit, split):
            """The norm prologue (docstring) -> this unit's split of the normalized x."""
            st = stages[k]
            tiles = st.part // K_STEP
            source, count = source_of(k, layer)
            pos = norm_stages.index(k)
            chunk = _norm_chunk(width, count + 1) // K_STEP
            out_layer = layer if k < n_layer else 0
            before_pos, before_layer = prev_norm(k, layer)
            inputs = partials(source, count) + [resid[before_pos].at[
                jnp.maximum(before_layer, 0)]]  # (layer 0's first: x0 instead, below)
            total = jnp.float32(0.0)
            for c in range(0, width // K_STEP, chunk):
                if k == 0:
                    h = lax.cond(layer == 0, lambda c=c: poll_sum([x0_ref.at[0]], c, chunk),
                                 lambda c=c: poll_sum(inputs, c, chunk))
                else:
                    h = poll_sum(inputs, c, chunk)
                staging[0].at[pl.ds(c, chunk)][...] = h
                total = total + jnp.sum(h * h)

                @pl.when(unit == 0)
                def _write_residual(h=h, c=c):
                    resid[pos].at[out_layer, pl.ds(c, chunk)][...] = h

            plgpu.commit_smem()  # the staging stores before other threads load them
            scale = lax.rsqrt(total / width + plan.norm_eps)
            layout = _strided(tiles)
            x = plgpu.load(staging[0].at[pl.ds(split * tiles, tiles)], layout=layout)
            g = plgpu.load(g_refs[pos].at[out_layer, pl.ds(split * tiles, tiles)], layout=layout)
            return x * scale * g

        # The RoPE tables' rows at the new position, loaded by the consumer once a call (a
        # global load in each unit waited behind the producers' weight stream: up to 2,400
        # cycles at 1b), by row count.
        rope_rows = {}

        def rotated(x, rows, first_row):
            """RoPE of x [rows, 64] (rows of the q tile's order) at the new position: the rows
            doubled in shared memory, so rotate_half(x) is one load 32 columns on (signed by
            the sin table)."""
            here = rope_stage.at[pl.ds(first_row, rows)]
            here.at[:, pl.ds(0, HEAD_DIM)][...] = x
            here.at[:, pl.ds(HEAD_DIM, HEAD_DIM)][...] = x
            plgpu.commit_smem()
            layout = _strided(rows)
            shifted = plgpu.load(here.at[:, pl.ds(HEAD_DIM // 2, HEAD_DIM)], layout=layout)
            cos, sin = rope_rows[rows]
            return x * cos + shifted * sin

        def tile_rows(views, rows, x, first=0):
            """x [rows, 64] into rows first..first+rows-1 of a swizzled tile (its plain view on
            the GPU, where the rows arrive in swizzle order; its wgmma view in the
            interpreter). The swizzle depends on the row modulo 8: first 0 or 8 alike."""
            tile, plain = views
            (tile if interpret else plain).at[pl.ds(first, rows)][...] = x.astype(dtype)

        def attention_unit(k, layer, unit):
            st = stages[k]
            group, rows = st.group, max(st.group, 2)
            heads, kv = st.rows // HEAD_DIM, st.kv_heads
            h, c, new, t0, valid, cached = attention_geometry(st, unit)
            k_tile, v_tile = k_views[0], v_views[0]
            # where the outputs and the log-sum-exps are staged ([>= 8, 64] each)
            outputs = ((o_stage.at[pl.ds(0, OUT_ROWS)], o_stage.at[pl.ds(OUT_ROWS, OUT_ROWS)])
                       if plan.shared_staging else (o_stage, lse_stage))

            @pl.when(cached)
            def _load():  # (before the poll: its latency hides behind the wait)
                load_kv(layer, h, t0)

            @pl.when(valid > 0)
            def _attend():
                source, count = source_of(k, layer)
                srcs = partials(source, count)

                def q_tile(q):  # (shared_staging: rows 8.. repeat rows 0..; see "out")
                    with jax.named_scope("rope"):
                        q = rotated(q, rows, 0) * (1.0 / HEAD_DIM ** 0.5)
                        for first in (0, OUT_ROWS) if plan.shared_staging else (0,):
                            tile_rows(q_views, rows, q, first)

                @pl.when(jnp.logical_not(new))
                def _cached():
                    with jax.named_scope("att_q"):  # (the poll of q included)
                        q_tile(poll_sum(srcs, h * group, rows))

                @pl.when(new)
                def _new_token():  # q, and k and v into the tiles' row 0, polled together
                    with jax.named_scope("att_new"):
                        q, k_new, v_new = poll_sums(srcs, [(h * group, rows), (heads + h, 2),
                                                           (heads + kv + h, 2)])
                        q_tile(q)
                        tile_rows(k_views, 2, rotated(k_new, 2, 8))
                        tile_rows(v_views, 2, v_new)
                        plgpu.commit_smem()
                        view = 0 if interpret else 1
                        plgpu.copy_smem_to_gmem(k_views[view].at[pl.ds(0, 1)],
                                                cache_k.at[layer, h, pl.ds(position, 1)])
                        plgpu.copy_smem_to_gmem(v_views[view].at[pl.ds(0, 1)],
                                                cache_v.at[layer, h, pl.ds(position, 1)])

                with jax.named_scope("att_math"):
                    @pl.when(cached)
                    def _wait():
                        with jax.named_scope("kv_wait"):
                            plgpu.barrier_wait(kv_bar.at[0])
                            plgpu.barrier_wait(kv_bar.at[1])

                    plgpu.commit_smem()  # the q tile's plain stores before the wgmmas read it

                    def scores_of(acc_ref):
                        plgpu.wgmma(acc_ref, q_views[0], k_tile.transpose((1, 0)))
                        return acc_ref[...]

                    with jax.named_scope("qk"):
                        s = pl.run_scoped(scores_of, plgpu.ACC((WGMMA_M, CHUNK), jnp.float32))
                    with jax.named_scope("softmax"):
                        col = plgpu.broadcasted_iota(jnp.int32, (WGMMA_M, CHUNK), 1,
                                                     layout=plgpu.Layout.WGMMA)
                        s = jnp.where(col < valid, s, -jnp.inf)
                        top = s.max(axis=1)
                        p = jnp.exp(s - lax.broadcast_in_dim(top, s.shape, [0]))
                        total = p.sum(axis=1)

                    def outputs_of(acc_ref):
                        if interpret:  # (its wgmma takes operands from shared memory only)
                            p_stage[0][...] = p.astype(dtype)
                            plgpu.commit_smem()
                            plgpu.wgmma(acc_ref, p_stage[0], v_tile)
                        else:
                            plgpu.wgmma(acc_ref, p.astype(dtype), v_tile)
                        return acc_ref[...]

                    with jax.named_scope("pv"):
                        o = pl.run_scoped(outputs_of,
                                          plgpu.ACC((WGMMA_M, HEAD_DIM), jnp.float32))
                    with jax.named_scope("out"):
                        o = o * lax.broadcast_in_dim(1.0 / total, o.shape, [0])
                        lse = lax.broadcast_in_dim(top + jnp.log(total), o.shape, [0])
                        if plan.shared_staging:  # rows 0..7: o; rows 8..15 (the same query
                            # heads again): their log-sum-exp
                            row = plgpu.broadcasted_iota(jnp.int32, o.shape, 0,
                                                         layout=plgpu.Layout.WGMMA)
                            o_stage[...] = jnp.where(row < OUT_ROWS, o, lse)
                        else:
                            o_stage[...] = o
                            lse_stage[...] = lse

            @pl.when(valid == 0)
            def _empty():  # a chunk past the cache's positions: weight 0 in the merge
                for ref, value in ((outputs[0], 0.0), (outputs[1], -jnp.inf)):
                    ref[...] = plgpu.layout_cast(jnp.full(ref.shape, value, jnp.float32),
                                                 _strided_shape(ref.shape))

            with jax.named_scope("att_store"):
                plgpu.commit_smem()
                out = parts[k].at[layer, c, pl.ds(h * group, group)]
                plgpu.copy_smem_to_gmem(outputs[0].at[pl.ds(0, group)],
                                        out.at[:, pl.ds(0, HEAD_DIM)])
                plgpu.copy_smem_to_gmem(outputs[1].at[pl.ds(0, group)],
                                        out.at[:, pl.ds(HEAD_DIM, HEAD_DIM)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # before the next unit's writes

        @pl.when(wg == 0)
        def _consumer():
            plgpu.set_max_registers(plan.registers, action="increase")
            if not persistent:
                with jax.named_scope("arm"):
                    for_each_unit(functools.partial(arm, parts, resid))
                    barrier.arrive()
                    barrier.wait(1)
            if interpret:  # (its RefUnion views do not alias: the wgmma view is written)
                b_smem[...] = jnp.zeros(b_smem.shape, dtype)
            else:
                b_plain[...] = jnp.zeros(b_plain.shape, dtype)
            if n_att:  # rows the units never write must be finite (they meet zero weights)
                for views in (q_views, k_views, v_views):
                    target = views[0] if interpret else views[1]
                    target[...] = jnp.zeros(target.shape, dtype)
                for rows in {2} | {max(st.group, 2) for st in stages
                                   if st.prologue == "attention"}:
                    layout = _strided(rows)
                    rope_rows[rows] = tuple(plgpu.load(t.at[position, pl.ds(0, rows)],
                                                       layout=layout) for t in (cos_ref, sin_ref))

            def unit_step(k, layer, j, unit):
                st = stages[k]
                if st.prologue == "attention":  # (its phases: att_q, att_new, att_math,
                    attention_unit(k, layer, unit)  # att_store)
                    return
                split, block = lax.rem(unit, st.splits), lax.div(unit, st.splits)
                tiles = st.part // K_STEP
                # Where the CTAs divide by the splits, all of a CTA's units of a stage read the
                # same split of x: its first unit polls it and the others reuse the B tile.
                @pl.when((j == 0) | (num_ctas % st.splits != 0))
                def _x():
                    with jax.named_scope("x"):
                        if st.prologue == "norm":
                            x = x_norm(k, layer, j, unit, split)
                        elif st.prologue == "merge":
                            x = x_merge(k, layer, split)
                        else:
                            x = x_sum(k, layer, split)
                        if interpret:
                            b_smem.at[0, pl.ds(0, st.part)][...] = x.reshape(-1).astype(dtype)
                        else:
                            b_plain.at[pl.ds(0, tiles), 0, :][...] = x.astype(dtype)
                        plgpu.commit_smem()  # the plain stores before the wgmmas' async reads
                with jax.named_scope("products"):
                    acc = pl.run_scoped(
                        functools.partial(_split_k_products, ring, full, empty,
                                          b_smem.at[:, pl.ds(0, st.part)], True,
                                          first_slot(k, layer, j)),
                        plgpu.ACC((WGMMA_M, B_ROWS), jnp.float32))
                with jax.named_scope("store"):
                    parts[k].at[layer, split, block][...] = acc.sum(axis=1)

            for_each_unit(unit_step)
            if n_att:
                plgpu.wait_smem_to_gmem(0)  # the cache rows and partials written
            if not persistent:
                barrier.reset(cta, 1)

    scratch = _polling_scratch(ring_slots, k_slot, max_part)
    if norm_stages:
        scratch = (*scratch, plgpu.SMEM((width // K_STEP, K_STEP), jnp.float32))
    if n_att:
        def tile(rows):
            return plgpu.RefUnion(plgpu.SMEM((rows, HEAD_DIM), dtype, transforms=SWIZZLED),
                                  plgpu.SMEM((rows, HEAD_DIM), dtype))
        scratch = (*scratch, tile(WGMMA_M), tile(CHUNK), tile(CHUNK),
                   plgpu.SMEM((16, 2 * HEAD_DIM), jnp.float32),
                   *[plgpu.SMEM((WGMMA_M, HEAD_DIM), jnp.float32)] * (
                       1 if plan.shared_staging else 2),
                   plgpu.Barrier(num_barriers=2))
        if interpret:
            scratch = (*scratch, plgpu.SMEM((WGMMA_M, CHUNK), dtype, transforms=SWIZZLED))
    x0_parts = x0.astype(jnp.float32).reshape(1, first.cols // K_STEP, K_STEP)
    shapes = _parts_shapes(plan) + _residual_shapes(plan)
    ws = [t for t in tiled if t is not None]
    position = jnp.broadcast_to(jnp.asarray(0 if pos is None else pos, jnp.int32), (128,))
    tables = list(rope) if n_att else []
    if persistent:
        want = [(2, *shape) for shape in shapes]
        got = [tuple(p.shape) for p in (*state["parts"], *state["residuals"])]
        if got != want or jnp.shape(state["parity"]) != ():
            raise ValueError(f"a state of buffers {got} for this plan's {want}: make it with "
                             "init_chain_state(plan)")
        parity = jnp.asarray(state["parity"], jnp.int32)
        cache = list(state["cache"]) if n_att else []
        refs = [jax.new_ref(p) for p in (*state["parts"], *state["residuals"], *cache)]
        _launch(kernel, scratch, (), num_ctas, 2, *ws, x0_parts,
                jnp.broadcast_to(parity, (128,)), position, *norm_ws, *tables, *refs,
                profile_dir=profile_dir, as_cluster=interpret, approx_math=True)
        buffers = [r[...] for r in refs]
        outs = [b[parity] for b in buffers[:n]]
        state = {"parts": tuple(buffers[:n]), "residuals": tuple(buffers[n:n + n_norm]),
                 "parity": 1 - parity}
        if n_att:
            state["cache"] = tuple(buffers[n + n_norm:])
    else:
        outs = _launch(kernel, scratch, tuple(jax.ShapeDtypeStruct(s, jnp.float32)
                                              for s in shapes),
                       num_ctas, 2, *ws, x0_parts, jnp.zeros((128,), jnp.int32), position,
                       *norm_ws, profile_dir=profile_dir, approx_math=True)[:n]
    sums = []
    for i, (o, st) in enumerate(zip(outs, stages)):
        if st.prologue == "attention":
            sums.append(merge_attention_partials(o))
            continue
        o = o[:, :, :st.rows // K_STEP]  # (the padding block after qkv)
        total = o.reshape(o.shape[0], o.shape[1], -1).sum(axis=1)
        order = _qkv_order(plan, i)
        sums.append(total if order is None else total[:, order])  # (its own inverse)
    result = (sums[:n_layer], [s[0] for s in sums[n_layer:]])
    return (result, state) if persistent else result
