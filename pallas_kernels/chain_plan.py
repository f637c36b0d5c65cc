"""What pallas_kernels/stage_chain.py's kernel computes, apart from the kernel: the plan (a
decode step's stages and their column splits, `chain_plan_for(cfg)`), its checks, the
weights tiled as the kernel streams them (`tile_chain`), RoPE tables, and the references in
float32 (`stage_chain_reference`, `attention_reference`; with like_kernel=True rounded to
bf16 where the kernel rounds). stage_chain.py imports all of it, so users import that module
alone; the kernel's way of running a plan is described there.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.grouped_matmul_mosaic import _num_sms
from pallas_kernels.ring_matvec import B_ROWS, K_STEP, WGMMA_M

MAX_POLLED_VALUES = 64  # float32 values a thread polls for one unit (registers)
CHUNK = 128  # cache positions an attention unit scores
SHARED_STAGING_BELOW = 6  # ring slots under which chain_plan_for shares the attention staging
HEAD_DIM = K_STEP  # the attention stage's head size (one 128-byte row of bf16)
# With ChainPlan.shared_staging, an attention unit's query heads (at most 8) sit in rows 0..7
# of its q tile and again in rows 8..15, so one [64, 64] staging holds the outputs in rows
# 0..7 and the log-sum-exps in rows 8..15.
OUT_ROWS = 8
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
    # Two more kinds come as a pair (attention_stage()): "attention", a stage with no weights
    # that attends the stage before's q to the cache (its rows: the heads' outputs), and
    # "merge", the stage after it, whose units first merge attention's partials.
    prologue: str = "sum"
    kv_heads: int = 0  # attention only
    chunks: int = 0  # attention only: the cache holds chunks * CHUNK positions

    @property
    def part(self) -> int:  # contracted columns a unit
        return self.cols // self.splits

    @property
    def units(self) -> int:
        if self.prologue == "attention":  # (kv head, chunk), chunk `chunks` the new position
            return self.kv_heads * (self.chunks + 1)
        return self.rows // WGMMA_M * self.splits

    @property
    def weighted(self) -> bool:
        return self.prologue != "attention"

    @property
    def group(self) -> int:  # attention: query heads a kv head
        return self.rows // HEAD_DIM // self.kv_heads


def attention_stage(heads: int, kv_heads: int, max_len: int) -> Stage:
    """The attention stage of `heads` query heads over `kv_heads` (head size 64) and a cache
    of max_len positions (rounded up to CHUNK)."""
    return Stage(heads * HEAD_DIM, (heads + 2 * kv_heads) * HEAD_DIM, 1, "attention",
                 kv_heads=kv_heads, chunks=-(-max_len // CHUNK))


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
    # The qkv stage's q rows come out in the order the 128-byte swizzle of attention's q tile
    # wants (tile_chain permutes them, so plain stores land where wgmma reads); off for the
    # interpreter, whose views do not alias.
    swizzle_q: bool = True
    # Attention's outputs and log-sum-exps in one [64, 64] staging buffer (rows 0..7 and
    # 8..15; q written twice), not two: one store instead of two, and 16 KB of shared memory
    # more for the ring (1b: 6 slots, not 5). Interpreter-checked; off until timed on a GPU.
    shared_staging: bool = False
    # The consumer warpgroup's registers a thread (setmaxnreg: a multiple of 8, at most 256;
    # the producer keeps 40). At 232 ptxas spilled 232 bytes of the 1b plan's consumer.
    registers: int = 232
    # Values a thread polls at once in o-proj's merge: a split of h query heads takes h a
    # chunk partial (outputs and log-sum-exps), so a poll takes merge_values // h partials.
    # Each poll is a dependent round trip; at 1b with 4,096 positions the 33 partials take 5
    # polls at 64 (about 6.5 us a layer from the last partial to the merged x, against 1.7
    # with one poll at 768 positions; H200 profile, twenty-second session), 3 at 128, at
    # the price of registers. 64 until timed on a GPU.
    merge_values: int = MAX_POLLED_VALUES

    @property
    def attention(self) -> int | None:
        """The attention stage's index in `layer`, or None."""
        kinds = [st.prologue for st in self.layer]
        return kinds.index("attention") if "attention" in kinds else None

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
    if plan.registers % 8 or not 232 <= plan.registers <= 256:
        return f"registers {plan.registers} (a multiple of 8 from 232 to 256)"
    if not 8 <= plan.merge_values <= 192:
        return f"merge_values {plan.merge_values} (from 8 to 192: registers)"
    stages = list(plan.layer) + list(plan.tail)
    problem = _check_attention(plan)
    if problem:
        return problem
    for i, st in enumerate(stages):
        name = f"stage {i} ({st.rows} x {st.cols}, {st.splits} splits)"
        if st.prologue == "attention":
            continue  # (_check_attention)
        if st.rows % WGMMA_M:
            return f"{name}: rows must be a multiple of {WGMMA_M}"
        if st.splits < 1 or st.cols % st.splits or st.part % max(plan.k_slot, 128):
            return (f"{name}: each split ({st.cols} / {st.splits}) must be a multiple of "
                    f"k_slot ({plan.k_slot}) and of 128")
        before = plan.layer[-1] if i == 0 else stages[i - 1]  # (layer 0's first reads x0)
        reads = 2 * st.cols if st.prologue == "swiglu" else st.cols
        if st.prologue not in ("sum", "norm", "swiglu", "merge"):
            return f"{name}: prologue {st.prologue!r} (sum, norm, swiglu or merge)"
        if reads > before.rows:
            return f"{name} reads {reads} values; the stage before gives {before.rows}"
        polled = (before.splits * (2 if st.prologue == "swiglu" else 1) * st.part // 128
                  if st.prologue in ("sum", "swiglu") else  # (norm, merge: in chunks)
                  before.splits + 1 if st.prologue == "norm" else st.part // 128)
        if polled > MAX_POLLED_VALUES:
            return (f"{name}: a thread would poll {polled} values of {before.splits} partials "
                    f"(at most {MAX_POLLED_VALUES}: use fewer splits before it)")
    norms = [st for st in stages if st.prologue == "norm"]
    if norms and plan.layer[0].prologue != "norm":
        return "norm stages without a norm first stage (the residual starts at x0 there)"
    if len({st.cols for st in norms}) > 1:
        return f"norm stages of different widths {sorted({st.cols for st in norms})} (one residual)"
    smem = shared_memory(plan)
    if smem > SHARED_MEMORY:
        return (f"{smem} bytes of ring, x tile, norm staging and attention tiles (over "
                f"{SHARED_MEMORY} of shared memory: use fewer ring slots)")
    if num_ctas < 1:
        return f"{num_ctas} CTAs"
    return None


def _check_attention(plan: ChainPlan) -> str | None:
    stages = list(plan.layer) + list(plan.tail)
    kinds = [st.prologue for st in stages]
    if kinds.count("attention") > 1 or kinds.count("attention") != kinds.count("merge"):
        return "a plan with other than one attention stage followed by one merge stage"
    if plan.attention is None:
        return None
    i = plan.attention
    st = stages[i]
    name = f"attention stage {i}"
    if i == 0 or i + 1 >= len(plan.layer) or plan.layer[i + 1].prologue != "merge":
        return f"{name}: it needs its qkv stage before it and a merge stage after it in the layer"
    if st.kv_heads < 1 or st.rows % (HEAD_DIM * st.kv_heads) or st.chunks < 1:
        return (f"{name}: {st.rows // HEAD_DIM} heads over {st.kv_heads} kv heads, "
                f"{st.chunks} chunks")
    group = st.group
    if group not in (1, 2, 4, 6, 8):
        return f"{name}: {group} query heads a kv head (1, 2, 4, 6 or 8)"
    if st.cols != st.rows + 2 * st.kv_heads * HEAD_DIM or stages[i - 1].rows != st.cols:
        return f"{name}: the stage before must give q, k and v ({st.cols} rows)"
    if stages[i - 1].splits * max(group, 2) * HEAD_DIM // 128 > MAX_POLLED_VALUES:
        return f"{name}: the qkv stage's splits ({stages[i - 1].splits}) poll too many values"
    merge = stages[i + 1]
    if merge.cols != st.rows or merge.part % 128:
        return f"merge stage {i + 1}: it reads the {st.rows} attention outputs in splits of 128s"
    if merge.part // HEAD_DIM > plan.merge_values:
        return (f"merge stage {i + 1}: one chunk's partial is {merge.part // HEAD_DIM} values a "
                f"thread, over merge_values {plan.merge_values}")
    return None


def shared_memory(plan: ChainPlan) -> int:
    """Bytes of shared memory stage_chain allocates for the plan."""
    stages = list(plan.layer) + list(plan.tail)
    norm_width = max([st.cols for st in stages if st.prologue == "norm"], default=0)
    smem = (plan.ring * WGMMA_M * plan.k_slot * 2 + B_ROWS * max(s.part for s in stages) * 2
            + 4 * norm_width)
    if plan.attention is not None:  # q, k and v tiles, RoPE and output staging
        smem += (WGMMA_M + 2 * CHUNK) * HEAD_DIM * 2 + 16 * 2 * HEAD_DIM * 4 + (
            (1 if plan.shared_staging else 2) * WGMMA_M * HEAD_DIM * 4)
    return smem


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
                   num_layers: int | None = None, prologues: bool = False,
                   max_len: int | None = None, shared_staging: bool | None = None) -> ChainPlan:
    """A model config's decode step as a chain: per layer qkv, o-proj, gate/up, down; then the
    output layer. With prologues, qkv, gate/up and the output layer take RMS norms of the
    residual stream and down takes SwiGLU, as in the model. With max_len (the cache's
    positions; needs prologues), attention runs between qkv and o-proj, whose prologue merges
    its partials: the whole decode step. Without it o-proj reads q in attention's place. The
    ring gets fewer slots where the attention tiles need the shared memory (shared_staging:
    ChainPlan's, which leaves it one more). By default the staging is shared only where the
    separate one leaves fewer than SHARED_STAGING_BELOW slots: on an H200 it took 1b's step
    (ring 5 -> 6) from 836 to 820 us, and 125m's (6 -> 7, latency-bound) from 188 to 193."""
    m = getattr(cfg, "model", cfg)
    hd = m.head_dim or m.embed_dim // m.num_heads
    ctas = num_ctas or _num_sms()
    if max_len is not None and not prologues:
        raise ValueError("a plan with attention (max_len) needs prologues=True")
    o_proj = "merge" if max_len is not None else "sum"
    shapes = [((m.num_heads + 2 * m.num_kv_heads) * hd, m.embed_dim, "norm"),
              (m.embed_dim, m.num_heads * hd, o_proj), (2 * m.mlp_dim, m.embed_dim, "norm"),
              (m.embed_dim, m.mlp_dim, "swiglu"), (m.vocab_size, m.embed_dim, "norm")]
    stages = [Stage(r, c, choose_splits(r, c, k_slot, ctas), p if prologues else "sum")
              for r, c, p in shapes]
    if max_len is not None:
        if hd != HEAD_DIM:
            raise ValueError(f"head_dim {hd}: the attention stage takes {HEAD_DIM}")
        stages.insert(1, attention_stage(m.num_heads, m.num_kv_heads, max_len))
    plan = ChainPlan(layer=tuple(stages[:-1]), tail=tuple(stages[-1:]),
                     num_layers=num_layers or m.num_layers, k_slot=k_slot, ring=ring,
                     ctas=num_ctas, norm_eps=m.norm_eps, shared_staging=bool(shared_staging))
    while plan.ring > 2 and shared_memory(plan) > SHARED_MEMORY:
        plan = dataclasses.replace(plan, ring=plan.ring - 1)
    if shared_staging is None and max_len is not None and plan.ring < SHARED_STAGING_BELOW:
        return chain_plan_for(cfg, k_slot=k_slot, ring=ring, num_ctas=num_ctas,
                              num_layers=num_layers, prologues=prologues, max_len=max_len,
                              shared_staging=True)
    return plan


def swizzle_rows(rows: int, group: int) -> jnp.ndarray:
    """The order of a [rows = heads * 64] q projection's outputs that attention's q tile wants:
    within query head q, element i goes to position ((i // 8) ^ (q % group)) * 8 + i % 8.
    Row r < 8 of a 128-byte-swizzled bf16 tile keeps its 16-byte chunk c at chunk c ^ r, so
    the G rows of a kv head's query heads, each stored plainly in this order, are where the
    swizzled tile's reader expects them. Its own inverse."""
    i = jnp.arange(rows)
    head, within = i // HEAD_DIM, i % HEAD_DIM
    chunk = (within // 8) ^ (head % group)
    return head * HEAD_DIM + chunk * 8 + within % 8


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
        if not st.weighted:
            if w is not None:
                raise ValueError(f"weights for stage {len(out)} (attention: pass None)")
            out.append(None)
            continue
        want = (plan.num_layers if len(out) < len(plan.layer) else 1, st.rows, st.cols)
        if w is None or w.shape != want or w.dtype != jnp.bfloat16:
            raise ValueError(f"weights {None if w is None else (w.shape, w.dtype)} for stage "
                             f"{len(out)}: want {want} bfloat16 (tail weights without the "
                             "layer dim)")
        order = _qkv_order(plan, len(out))
        out.append(_tile(w if order is None else w[:, order], st, plan.k_slot))
    return tuple(out)


def _qkv_order(plan: ChainPlan, i: int):
    """The row order of stage i's outputs (the qkv stage's q rows in swizzle_rows' order,
    when the plan swizzles them; its own inverse), or None where stage i keeps the model's."""
    if plan.attention is None or i != plan.attention - 1 or not plan.swizzle_q:
        return None
    att, rows = plan.layer[plan.attention], plan.layer[i].rows
    return jnp.concatenate([swizzle_rows(att.rows, att.group), jnp.arange(att.rows, rows)])


def rope_tables(plan: ChainPlan, inv_freq):
    """(cos, sin) [chunks * CHUNK, 8, 64] float32 for the attention stage: at each position,
    row r in the element order of q tile row r (swizzle_rows; natural without
    plan.swizzle_q), sin signed for rotate-half (rotate_half(x) = sign * x shifted by 32)."""
    att = plan.layer[plan.attention]
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    if inv_freq.shape != (HEAD_DIM // 2,):
        raise ValueError(f"inv_freq of shape {inv_freq.shape}: want ({HEAD_DIM // 2},)")
    rows = jnp.stack([swizzle_rows(8 * HEAD_DIM, 8)[r * HEAD_DIM:(r + 1) * HEAD_DIM] - r * HEAD_DIM
                      if plan.swizzle_q else jnp.arange(HEAD_DIM) for r in range(8)])
    angle = jnp.arange(att.chunks * CHUNK, dtype=jnp.float32)[:, None, None] * inv_freq[
        rows % (HEAD_DIM // 2)]
    sign = jnp.where(rows < HEAD_DIM // 2, -1.0, 1.0)
    return jnp.cos(angle), jnp.sin(angle) * sign


def _dot_f32(w, x):
    return jnp.dot(w.astype(jnp.float32), x, precision=lax.Precision.HIGHEST)


def rotate_half_rope(x, pos, inv_freq):
    """RoPE (rotate-half, as the model) of x [..., 64] at position pos, in float32."""
    angle = pos * jnp.asarray(inv_freq, jnp.float32)
    cos, sin = jnp.tile(jnp.cos(angle), 2), jnp.tile(jnp.sin(angle), 2)
    half = x.shape[-1] // 2
    return x * cos + jnp.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def _bf16(x):
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def attention_reference(st: Stage, qkv, cache_k, cache_v, pos, inv_freq,
                        like_kernel: bool = False):
    """One layer's attention of the new position: qkv [cols] float32 (q, k, v), the layer's
    cache [K, S, 64] holding positions < pos -> (o [rows], k_new [K, 64] after RoPE, v_new).
    like_kernel: round where the kernel does (the scaled q, the new k and v, and the softmax's
    exponentials to bf16, as wgmma operands)."""
    heads, kv = st.rows // HEAD_DIM, st.kv_heads
    r = _bf16 if like_kernel else (lambda x: x)
    q = r(rotate_half_rope(qkv[:st.rows].reshape(heads, HEAD_DIM), pos, inv_freq)
          / HEAD_DIM ** 0.5)
    k_new = r(rotate_half_rope(qkv[st.rows:st.rows + kv * HEAD_DIM].reshape(kv, HEAD_DIM), pos,
                               inv_freq))
    v_new = r(qkv[st.rows + kv * HEAD_DIM:].reshape(kv, HEAD_DIM))
    keys = jnp.concatenate([cache_k[:, :pos].astype(jnp.float32), k_new[:, None]], 1)
    values = jnp.concatenate([cache_v[:, :pos].astype(jnp.float32), v_new[:, None]], 1)
    q = q.reshape(kv, st.group, HEAD_DIM)
    scores = jnp.einsum("kgd,ksd->kgs", q, keys, precision=lax.Precision.HIGHEST)
    e = jnp.exp(scores - scores.max(-1, keepdims=True))
    o = jnp.einsum("kgs,ksd->kgd", r(e), values, precision=lax.Precision.HIGHEST)
    return (o / e.sum(-1, keepdims=True)).reshape(-1), k_new, v_new


def dot_like_kernel(w, x):
    """A product as the kernel does it: x rounded to bf16 (the B tile), float32 sums."""
    return jnp.dot(w.astype(jnp.float32), _bf16(x), precision=lax.Precision.HIGHEST)


def stage_chain_reference(plan: ChainPlan, layer_ws, tail_ws, x0, norms=None, *, cache=None,
                          pos=None, inv_freq=None, dot=_dot_f32, like_kernel: bool = False):
    """(per layer stage [L, rows], per tail stage [rows]) float32: the chain in float32.
    norms: per stage (layer then tail), the norm weights of norm stages ([L, D] in layers,
    [D] in the tail), None elsewhere. dot(w, x): the product (float32 by default). With an
    attention stage: cache (k, v) [L, K, S, 64] holding positions < pos (an int), and RoPE's
    inv_freq [32]; the attention stage's output is the heads' outputs. like_kernel: round
    to bf16 where the kernel does (products' x, attention's operands), so the kernel should
    agree to float32 summation order."""
    if like_kernel:
        dot = dot_like_kernel
    x = x0.astype(jnp.float32)
    residual = None
    stages = plan.layer + plan.tail
    norms = norms or [None] * len(stages)
    layer_now = 0

    def stage(i, st, w, g, x):
        nonlocal residual
        if st.prologue == "attention":
            return attention_reference(st, x, cache[0][layer_now], cache[1][layer_now], pos,
                                       inv_freq, like_kernel)[0]
        if st.prologue == "norm":
            residual = x[:st.cols] if residual is None else residual + x[:st.cols]
            x = residual * lax.rsqrt(jnp.mean(residual * residual) + plan.norm_eps) * g
        elif st.prologue == "swiglu":
            gate, up = x[:st.cols], x[st.cols:2 * st.cols]
            x = gate * jax.nn.sigmoid(gate) * up
        return dot(w, x[:st.cols])

    outs = [[] for _ in plan.layer]
    for l in range(plan.num_layers):
        layer_now = l
        for k, (st, w) in enumerate(zip(plan.layer, layer_ws)):
            x = stage(k, st, None if w is None else w[l], None if norms[k] is None else
                      norms[k][l], x)
            outs[k].append(x)
    tails = []
    for t, (st, w) in enumerate(zip(plan.tail, tail_ws)):
        x = stage(len(plan.layer) + t, st, w, norms[len(plan.layer) + t], x)
        tails.append(x)
    return [jnp.stack(o) for o in outs], tails
