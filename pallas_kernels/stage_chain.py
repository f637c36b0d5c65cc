"""A decode step's chain of matrix-vector products, with its real shapes, in one persistent
Mosaic GPU kernel: the polling chain of ring_matvec.py generalized from L square layers to
stages of different shapes, as a step's qkv, o-proj, gate/up, down and output layer are.

    plan = ChainPlan(layer=(Stage(2304, 768, 3), Stage(768, 768, 6), ...), tail=(Stage(50304,
                     768, 1),), num_layers=12)          # or chain_plan_for(cfg)
    tiled = tile_chain(plan, layer_ws, tail_ws)   # once at load time
    outs = stage_chain(plan, tiled, x0)           # each stage's output, float32

Stage k multiplies its [rows, cols] bf16 weights with the first `cols` values of the stage
before's output (x0 for the first), after its prologue: none ("sum"), or the model's own
("norm": the residual stream plus the stage before's output, RMS-normalized and scaled;
"swiglu": silu(gate) * up). So the chain has the step's bytes and its dependencies, with or
without the model's elementwise work: it measures what the step's weight stream and its 49
(125m) stage-to-stage dependencies cost together. Attention is not in it (o-proj reads q in
its place). It is a prototype for timing, not used by decoding (docs/design.md, "Decoding").

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

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.grouped_matmul_mosaic import _num_sms
from pallas_kernels.ring_matvec import (B_ROWS, K_STEP, NOT_WRITTEN, WGMMA_M,
                                        _GridBarrier, _launch, _poll_loads, _polling_scratch,
                                        _split_k_products)

MAX_POLLED_VALUES = 64  # float32 values a thread polls for one unit (registers)
INTERPRET_POLLS = 1 << 20  # the interpreted form's polls (its CTAs are threads: slow to come)
SHARED_MEMORY = 220 * 1024


@dataclasses.dataclass(frozen=True)
class Stage:
    """[rows, cols] weights times the first `cols` values of the stage before's output, the
    contraction split over `splits` CTAs."""
    rows: int
    cols: int
    splits: int
    # What the unit does to its input before the product: "sum" (the stage before's partials
    # summed), "norm" (the residual stream: the last norm stage's residual plus the stage
    # before's output, written once; then RMS-normalized and scaled by the stage's norm
    # weights; the first norm stage of layer 0 takes x0 as the residual) or "swiglu"
    # (silu(g) * u, g and u the stage before's first and second `cols` outputs).
    prologue: str = "sum"

    @property
    def part(self) -> int:  # contracted columns a unit
        return self.cols // self.splits

    @property
    def units(self) -> int:
        return self.rows // WGMMA_M * self.splits


@dataclasses.dataclass(frozen=True)
class ChainPlan:
    """`layer`'s stages run num_layers times, then `tail`'s once. k_slot: contracted columns
    a ring slot; ring: ring slots; ctas: resident CTAs (None: one per SM)."""
    layer: tuple
    tail: tuple = ()
    num_layers: int = 1
    k_slot: int = 128
    ring: int = 8
    ctas: int | None = None
    norm_eps: float = 1e-5

    def steps(self):
        """(stage, its index in layer + tail, its layer or None) in the order they run."""
        out = [(st, k, l) for l in range(self.num_layers) for k, st in enumerate(self.layer)]
        return out + [(st, len(self.layer) + t, None) for t, st in enumerate(self.tail)]


def check_plan(plan: ChainPlan, num_ctas: int) -> str | None:
    """None if stage_chain runs this plan on num_ctas CTAs, else the constraint it breaks."""
    if not plan.layer or plan.num_layers < 1:
        return "a plan with no layer stages (needs at least one stage and one layer)"
    if plan.k_slot % K_STEP or not K_STEP <= plan.k_slot <= 256:
        return f"k_slot {plan.k_slot} (a multiple of {K_STEP} up to 256)"
    stages = list(plan.layer) + list(plan.tail)
    for i, st in enumerate(stages):
        name = f"stage {i} ({st.rows} x {st.cols}, {st.splits} splits)"
        if st.rows % WGMMA_M:
            return f"{name}: rows must be a multiple of {WGMMA_M}"
        if st.splits < 1 or st.cols % st.splits or st.part % max(plan.k_slot, 128):
            return (f"{name}: each split ({st.cols} / {st.splits}) must be a multiple of "
                    f"k_slot ({plan.k_slot}) and of 128")
        before = plan.layer[-1] if i == 0 else stages[i - 1]  # (layer 0's first reads x0)
        reads = 2 * st.cols if st.prologue == "swiglu" else st.cols
        if st.prologue not in ("sum", "norm", "swiglu"):
            return f"{name}: prologue {st.prologue!r} (sum, norm or swiglu)"
        if reads > before.rows:
            return f"{name} reads {reads} values; the stage before gives {before.rows}"
        polled = (before.splits * (2 if st.prologue == "swiglu" else 1) * st.part // 128
                  if st.prologue != "norm" else (before.splits + 1))  # (norm: in chunks)
        if polled > MAX_POLLED_VALUES:
            return (f"{name}: a thread would poll {polled} values of {before.splits} partials "
                    f"(at most {MAX_POLLED_VALUES}: use fewer splits before it)")
    norms = [st for st in stages if st.prologue == "norm"]
    if norms and plan.layer[0].prologue != "norm":
        return "norm stages without a norm first stage (the residual starts at x0 there)"
    if len({st.cols for st in norms}) > 1:
        return f"norm stages of different widths {sorted({st.cols for st in norms})} (one residual)"
    smem = (plan.ring * WGMMA_M * plan.k_slot * 2 + B_ROWS * max(s.part for s in stages) * 2
            + 4 * max([st.cols for st in norms], default=0))
    if smem > SHARED_MEMORY:
        return (f"{smem} bytes of ring, x tile and norm staging (over {SHARED_MEMORY} of shared "
                "memory)")
    if num_ctas < 1:
        return f"{num_ctas} CTAs"
    return None


UNIT_COST = 1  # a unit's fixed cost (its store, its products' drain), in weight slots


def choose_splits(rows: int, cols: int, k_slot: int, num_ctas: int) -> int:
    """The split count that gives the busiest CTA the least work: its units' weight slots plus
    UNIT_COST a unit (the fewest splits on a tie: fewer partials for the next stage to
    read)."""
    best = None
    for splits in range(1, cols // 128 + 1):
        part = cols // splits
        if cols % splits or part % max(k_slot, 128):
            continue
        units = rows // WGMMA_M * splits
        work = -(-units // num_ctas) * (part // k_slot + UNIT_COST)
        if best is None or work < best[0]:
            best = (work, splits)
    if best is None:
        raise ValueError(f"no split of {cols} columns into multiples of {max(k_slot, 128)}")
    return best[1]


def chain_plan_for(cfg, *, k_slot: int = 128, ring: int = 8, num_ctas: int | None = None,
                   num_layers: int | None = None, prologues: bool = False) -> ChainPlan:
    """A model config's decode step as a chain: per layer qkv, o-proj, gate/up, down; then the
    output layer. With prologues, qkv, gate/up and the output layer take RMS norms of the
    residual stream and down takes SwiGLU, as in the model; attention is never in it (o-proj
    reads q in its place)."""
    m = getattr(cfg, "model", cfg)
    hd = m.head_dim or m.embed_dim // m.num_heads
    ctas = num_ctas or _num_sms()
    shapes = [((m.num_heads + 2 * m.num_kv_heads) * hd, m.embed_dim, "norm"),
              (m.embed_dim, m.num_heads * hd, "sum"), (2 * m.mlp_dim, m.embed_dim, "norm"),
              (m.embed_dim, m.mlp_dim, "swiglu"), (m.vocab_size, m.embed_dim, "norm")]
    stages = tuple(Stage(r, c, choose_splits(r, c, k_slot, ctas), p if prologues else "sum")
                   for r, c, p in shapes)
    return ChainPlan(layer=stages[:4], tail=stages[4:], num_layers=num_layers or m.num_layers,
                     k_slot=k_slot, ring=ring, ctas=num_ctas, norm_eps=m.norm_eps)


def _tile(w, st: Stage, k_slot: int):
    """[L, rows, cols] -> [L, units, slots, 64, k_slot]: unit r * S + s holds rows
    [64 r, 64 r + 64) over columns [s part, (s + 1) part), each ring slot contiguous."""
    num_layers = w.shape[0]
    slots = st.part // k_slot
    w = w.reshape(num_layers, st.rows // WGMMA_M, WGMMA_M, st.splits, slots, k_slot)
    return w.transpose(0, 1, 3, 4, 2, 5).reshape(num_layers, st.units, slots, WGMMA_M, k_slot)


def tile_chain(plan: ChainPlan, layer_ws, tail_ws=()):
    """layer_ws: per layer stage, [L, rows, cols] bf16; tail_ws: per tail stage, [rows, cols].
    -> the tiled weights stage_chain takes (once, when the weights are loaded)."""
    problem = check_plan(plan, plan.ctas or _num_sms())
    if problem:
        raise ValueError(f"stage_chain does not take {problem}")
    if len(layer_ws) != len(plan.layer) or len(tail_ws) != len(plan.tail):
        raise ValueError(f"{len(layer_ws)} layer and {len(tail_ws)} tail weights for a plan of "
                         f"{len(plan.layer)} and {len(plan.tail)} stages")
    out = []
    for w, st in zip(list(layer_ws) + [w[None] for w in tail_ws], plan.layer + plan.tail):
        want = (plan.num_layers if len(out) < len(plan.layer) else 1, st.rows, st.cols)
        if w.shape != want or w.dtype != jnp.bfloat16:
            raise ValueError(f"weights {w.shape} {w.dtype} for stage {len(out)}: want {want} "
                             "bfloat16 (tail weights without the layer dim)")
        out.append(_tile(w, st, plan.k_slot))
    return tuple(out)


def _dot_f32(w, x):
    return jnp.dot(w.astype(jnp.float32), x, precision=lax.Precision.HIGHEST)


def stage_chain_reference(plan: ChainPlan, layer_ws, tail_ws, x0, norms=None, *, dot=_dot_f32):
    """(per layer stage [L, rows], per tail stage [rows]) float32: the chain in float32.
    norms: per stage (layer then tail), the norm weights of norm stages ([L, D] in layers,
    [D] in the tail), None elsewhere. dot(w, x): the product (float32 by default)."""
    x = x0.astype(jnp.float32)
    residual = None
    stages = plan.layer + plan.tail
    norms = norms or [None] * len(stages)

    def stage(i, st, w, g, x):
        nonlocal residual
        if st.prologue == "norm":
            residual = x[:st.cols] if residual is None else residual + x[:st.cols]
            x = residual * lax.rsqrt(jnp.mean(residual * residual) + plan.norm_eps) * g
        elif st.prologue == "swiglu":
            gate, up = x[:st.cols], x[st.cols:2 * st.cols]
            x = gate * jax.nn.sigmoid(gate) * up
        return dot(w, x[:st.cols])

    outs = [[] for _ in plan.layer]
    for l in range(plan.num_layers):
        for k, (st, w) in enumerate(zip(plan.layer, layer_ws)):
            x = stage(k, st, w[l], None if norms[k] is None else norms[k][l], x)
            outs[k].append(x)
    tails = []
    for t, (st, w) in enumerate(zip(plan.tail, tail_ws)):
        x = stage(len(plan.layer) + t, st, w, norms[len(plan.layer) + t], x)
        tails.append(x)
    return [jnp.stack(o) for o in outs], tails


def _parts_shapes(plan: ChainPlan):
    """Each stage's partial sums: [L (1 for tail stages), splits, rows / 64, 64] float32."""
    return [(plan.num_layers if i < len(plan.layer) else 1, st.splits, st.rows // K_STEP, K_STEP)
            for i, st in enumerate(plan.layer + plan.tail)]


def _residual_shapes(plan: ChainPlan):
    """Each norm stage's residual stream: [L (1 for tail stages), D / 64, 64] float32."""
    return [(plan.num_layers if i < len(plan.layer) else 1, st.cols // K_STEP, K_STEP)
            for i, st in enumerate(plan.layer + plan.tail) if st.prologue == "norm"]


def init_chain_state(plan: ChainPlan) -> dict:
    """The state that lets stage_chain skip its per-call arming (stage_chain(..., state=)):
    two parities of every stage's partial sums and every norm stage's residual, all NaN,
    and the parity the next call uses."""
    return {"parts": tuple(jnp.full((2, *shape), NOT_WRITTEN, jnp.float32)
                           for shape in _parts_shapes(plan)),
            "residuals": tuple(jnp.full((2, *shape), NOT_WRITTEN, jnp.float32)
                               for shape in _residual_shapes(plan)),
            "parity": jnp.int32(0)}


def _norm_chunk(width: int, inputs: int) -> int:
    """Columns a norm prologue polls at once: the most (a multiple of 128 dividing width)
    that keep a thread's polled values within MAX_POLLED_VALUES."""
    return max(c for c in range(128, width + 1, 128)
               if width % c == 0 and inputs * c // 128 <= MAX_POLLED_VALUES)


def _vec(tiles: int) -> int:
    """A thread's vector width in a WG_STRIDED [tiles, 64] float32 array: the widest that fits."""
    return max(v for v in (1, 2, 4) if tiles * K_STEP % (128 * v) == 0)


def _strided(tiles: int):
    return plgpu.Layout.WG_STRIDED((tiles, K_STEP), vec_size=_vec(tiles))


def stage_chain(plan: ChainPlan, tiled, x0, *, norms=None, state=None, profile_dir=None,
                interpret: bool = False):
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
    profile_dir: a Mosaic GPU profiler trace of the consumer's phases ("arm" without state,
    then per polled unit "x" (the poll and prologue), per unit "products" and "store").
    interpret: the form Mosaic GPU's interpreter runs (under plgpu.force_gpu_interpret_mode,
    called eagerly, with a state: it has no global semaphores), for the tests: the CTAs as
    one cluster, polls by plain loads, x written into the B tile's wgmma view. It checks the
    kernel's logic (units, slots, prologues, parities), not the GPU's memory model."""
    num_ctas = plan.ctas or _num_sms()
    problem = check_plan(plan, num_ctas)
    if problem:
        raise ValueError(f"stage_chain does not take {problem}")
    stages = plan.layer + plan.tail
    for i, (t, st) in enumerate(zip(tiled, stages)):
        want = (plan.num_layers if i < len(plan.layer) else 1, st.units, st.part // plan.k_slot,
                WGMMA_M, plan.k_slot)
        if t.shape != want:
            raise ValueError(f"tiled weights {t.shape} for stage {i}: want {want} (tile them "
                             "with tile_chain(plan, ...))")
    first = plan.layer[0]
    if x0.shape != (first.cols,):
        raise ValueError(f"x0 of shape {x0.shape}: the first stage reads [{first.cols}]")
    num_layers, k_slot, ring_slots = plan.num_layers, plan.k_slot, plan.ring
    n_layer = len(plan.layer)
    n = len(stages)
    norm_stages = [i for i, st in enumerate(stages) if st.prologue == "norm"]
    norm_ws = _norm_inputs(plan, norms, norm_stages)
    n_norm = len(norm_stages)
    width = stages[norm_stages[0]].cols if norm_stages else 0  # the residual stream's
    max_part = max(st.part for st in stages)
    dtype = jnp.bfloat16
    persistent = state is not None
    if interpret and not persistent:
        raise ValueError("the interpreted form needs a state (state=init_chain_state(plan)): "
                         "the interpreter has no global semaphores for the arming barrier")

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
        ws_refs, (x0_ref, parity_ref) = refs[:n], refs[n:n + 2]
        g_refs = refs[n + 2:n + 2 + n_norm]
        all_parts = refs[n + 2 + n_norm:2 * n + 2 + n_norm]  # with state: [2, ...] parities
        all_resid = refs[2 * n + 2 + n_norm:2 * n + 2 + 2 * n_norm]
        ring, full, empty, b_views, *staging = refs[2 * n + 2 + 2 * n_norm:]
        b_smem, b_plain = b_views  # [8, max_part] swizzled (wgmma) / [tiles, 8, 64] (stores)
        wg = lax.axis_index("wg")
        cta = lax.axis_index("ctas")
        barrier = None if persistent else _GridBarrier(num_ctas)
        parts, resid = all_parts, all_resid
        if persistent:
            parity = jnp.max(plgpu.load(parity_ref, layout=plgpu.Layout.WG_STRIDED((128,), 1)))
            parts = [p.at[parity] for p in all_parts]
            resid = [r.at[parity] for r in all_resid]

        def arm(buffers, residuals, k, layer, j, unit):
            st = stages[k]
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

        slots = [st.part // k_slot for st in stages]
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

        def poll_sum(refs, col, tiles):
            """The sum of refs' [col, col + tiles) rows of 64, polled."""
            views = [r.at[pl.ds(col, tiles)] for r in refs]
            if interpret:  # (no inline Mosaic GPU code there; its memory is coherent)
                def load(_=None):
                    return tuple(plgpu.load(v, layout=_strided(tiles)) for v in views)

                def again(carry):
                    nan = sum(jnp.sum(jnp.isnan(v).astype(jnp.int32)) for v in carry[0])
                    return (nan > 0) & (carry[1] < INTERPRET_POLLS)

                values, _ = lax.while_loop(again, lambda c: (load(), c[1] + 1),
                                           (load(), jnp.int32(1)))
            else:
                values = _poll_loads(views, (tiles, K_STEP), _vec(tiles))
            x = values[0]
            for v in values[1:]:
                x = x + v
            return x

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

        @pl.when(wg == 0)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            if not persistent:
                with jax.named_scope("arm"):
                    for_each_unit(functools.partial(arm, parts, resid))
                    barrier.arrive()
                    barrier.wait(1)
            if interpret:  # (its RefUnion views do not alias: the wgmma view is written)
                b_smem[...] = jnp.zeros(b_smem.shape, dtype)
            else:
                b_plain[...] = jnp.zeros(b_plain.shape, dtype)

            def unit_step(k, layer, j, unit):
                st = stages[k]
                split, block = lax.rem(unit, st.splits), lax.div(unit, st.splits)
                tiles = st.part // K_STEP
                # Where the CTAs divide by the splits, all of a CTA's units of a stage read the
                # same split of x: its first unit polls it and the others reuse the B tile.
                @pl.when((j == 0) | (num_ctas % st.splits != 0))
                def _x():
                    with jax.named_scope("x"):
                        if st.prologue == "norm":
                            x = x_norm(k, layer, j, unit, split)
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
            if not persistent:
                barrier.reset(cta, 1)

    scratch = _polling_scratch(ring_slots, k_slot, max_part)
    if norm_stages:
        scratch = (*scratch, plgpu.SMEM((width // K_STEP, K_STEP), jnp.float32))
    x0_parts = x0.astype(jnp.float32).reshape(1, first.cols // K_STEP, K_STEP)
    shapes = _parts_shapes(plan) + _residual_shapes(plan)
    if persistent:
        want = [(2, *shape) for shape in shapes]
        got = [tuple(p.shape) for p in (*state["parts"], *state["residuals"])]
        if got != want or jnp.shape(state["parity"]) != ():
            raise ValueError(f"a state of buffers {got} for this plan's {want}: make it with "
                             "init_chain_state(plan)")
        parity = jnp.asarray(state["parity"], jnp.int32)
        refs = [jax.new_ref(p) for p in (*state["parts"], *state["residuals"])]
        _launch(kernel, scratch, (), num_ctas, 2, *tiled, x0_parts,
                jnp.broadcast_to(parity, (128,)), *norm_ws, *refs, profile_dir=profile_dir,
                as_cluster=interpret)
        buffers = [r[...] for r in refs]
        outs = [b[parity] for b in buffers[:n]]
        state = {"parts": tuple(buffers[:n]), "residuals": tuple(buffers[n:]),
                 "parity": 1 - parity}
    else:
        outs = _launch(kernel, scratch, tuple(jax.ShapeDtypeStruct(s, jnp.float32)
                                              for s in shapes),
                       num_ctas, 2, *tiled, x0_parts, jnp.zeros((128,), jnp.int32), *norm_ws,
                       profile_dir=profile_dir)[:n]
    sums = [o.reshape(o.shape[0], o.shape[1], -1).sum(axis=1) for o in outs]
    result = (sums[:n_layer], [s[0] for s in sums[n_layer:]])
    return (result, state) if persistent else result


def _norm_inputs(plan: ChainPlan, norms, norm_stages):
    """The norm stages' weights as the kernel takes them, [L (1 in the tail), D / 64, 64]
    float32, after checking `norms` (per stage, None where there is no norm)."""
    stages = plan.layer + plan.tail
    if not norm_stages:
        if norms is not None and any(g is not None for g in norms):
            raise ValueError("norm weights for a plan without norm stages")
        return []
    if norms is None or len(norms) != len(stages):
        raise ValueError(f"norm stages {norm_stages} need norms: one entry per stage "
                         f"({len(stages)}), the norm weights where the stage has a norm")
    out = []
    for i in norm_stages:
        tail = i >= len(plan.layer)
        want = (stages[i].cols,) if tail else (plan.num_layers, stages[i].cols)
        g = norms[i]
        if g is None or tuple(g.shape) != want:
            raise ValueError(f"norm weights of stage {i}: {None if g is None else g.shape}, "
                             f"want {want}")
        out.append(jnp.asarray(g, jnp.float32).reshape(-1, stages[i].cols // K_STEP, K_STEP))
    return out
