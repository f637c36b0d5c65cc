"""What a hop between CTAs costs on the GPU through a cluster's shared memory, against one
through global memory: the numbers that decide whether a batch-1 decode step with fewer
global hops a layer (tensor-parallel style, docs/design.md) could reach the roofline at 125m.

    python tools/bench_cluster_hop.py                     # GPU only (the CTAs poll each other)
    python tools/bench_cluster_hop.py --cluster 8 --exchanges 0,1,2,3

One persistent kernel of G clusters of C CTAs (G = the SMs // C) runs `--rounds` rounds. A
round is one global hop, then E cluster exchanges:
- global hop: CTA c of every cluster polls (volatile loads until none is NaN, as the chain's
  pollers do) rows [0, ROWS) of slice c of all G clusters' partials of the round before
  ([G, C, 64, 8] float32 per round, armed with NaN), and averages them: the fan-in a layer's
  residual update would have, each CTA taking a 1 / C share of the columns;
- exchange (an all-gather inside the cluster): every CTA sends a [rows, 8] float32 tile to
  each of the C CTAs of its cluster (itself included), waits for all C tiles and averages
  them. `--method` says how: "barrier" (the default: plain `st.shared::cluster` stores from
  registers, then the hardware cluster barrier), "bulk" (thread 0 expects the bytes on its
  own mbarrier and sends one bulk copy to each peer, completing on the peer's mbarrier) or
  "st_async" (Pallas' `async_store_smem`: every thread stores and arrives on every peer's
  barrier, so C x 128 remote arrivals per barrier);
- then it writes its slice of the cluster's partial for the next round.

Each configuration is timed as the median of 5 jitted calls ("call_us", launch and arming
included) at `--rounds` rounds; "round_us" is the difference from a call of `--rounds` / 4
rounds per round between (noisy: a few tenths of a us). After the last E of a method and
cluster size, a summary line gives "exchange_us", the least-squares slope of call_us over E
divided by the rounds: one exchange. The last round's values are checked against the same
rounds in float64 numpy (any NaN means a poll gave up: not all clusters were resident). One
JSON object per line.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm, vector
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from bench_attention import time_it  # tools/
from pallas_kernels.grouped_matmul_mosaic import _num_sms
from pallas_kernels.ring_matvec import _poll_loads

ROWS = 16  # rows of a [64, 8] slice a CTA polls per partial: 128 floats, as 125m's 768 / 8 ~ 96
TILE = (64, 8)
SWIZZLE = (plgpu.TilingTransform((8, 8)), plgpu.SwizzleTransform(32))  # 8 float32 = 32 bytes
# The hardware cluster barrier, every thread of the CTA: a release of this thread's stores
# (into peers' shared memory too), then an acquire of the cluster's.
CLUSTER_BARRIER = "barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;"


def _smem_address(ref):
    """A shared-memory ref's address as PTX's 32-bit shared::cta address."""
    return llvm.ptrtoint(ir.IntegerType.get_signless(32), mgpu_utils.memref_ptr(ref))


def _thread0():
    i32 = ir.IntegerType.get_signless(32)
    return arith.cmpi(arith.CmpIPredicate.eq, mgpu_utils.thread_idx(),
                      arith.constant(i32, 0))


def _init_bulk_barriers(bars):
    """bars [n, 2] int32 (one 8-byte mbarrier a row) initialized for one arrival each, then
    the cluster synchronized, so that no peer's copy can reach a barrier before its init."""
    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
    def init(ctx, ref):
        del ctx
        base = _smem_address(ref)
        i32 = ir.IntegerType.get_signless(32)
        with mgpu_utils.when(_thread0()):
            for i in range(ir.MemRefType(ref.type).shape[0]):
                addr = arith.addi(base, arith.constant(i32, 8 * i))
                mgpu_utils.inline_ptx("mbarrier.init.shared::cta.b64 [$0], 1;", addr,
                                      has_side_effects=True)
            mgpu_utils.inline_ptx("fence.mbarrier_init.release.cluster;",
                                  has_side_effects=True)
        mgpu_utils.inline_ptx(CLUSTER_BARRIER, has_side_effects=True)

    init(bars)


def _bulk_all_gather(src, dst, bar, size: int):
    """Thread 0 expects size x src's bytes on its own `bar`, copies `src` (this CTA's tile,
    committed to the async proxy) into `dst` (its slot) of every CTA of the cluster by one
    bulk copy each, completing on their `bar`, and waits; then the warpgroup syncs. One
    arrival and `size` copies a CTA, where async_store_smem has every thread arrive on every
    peer's barrier."""
    nbytes = int(np.prod(src.shape)) * 4

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType()))
    def gather(ctx, src_ref, dst_ref, bar_ref):
        del ctx
        copies = "".join(
            f"mov.b32 rpeer, {p};\n"
            "mapa.shared::cluster.u32 rdst, $1, rpeer;\n"
            "mapa.shared::cluster.u32 rbar, $2, rpeer;\n"
            "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes "
            f"[rdst], [$0], {nbytes}, [rbar];\n" for p in range(size))
        with mgpu_utils.when(_thread0()):
            mgpu_utils.inline_ptx(
                "{\n.reg .b64 state;\n.reg .b32 rdst, rbar, rpeer;\n.reg .pred done;\n"
                f"mbarrier.arrive.expect_tx.shared::cta.b64 state, [$2], {nbytes * size};\n"
                + copies +
                "WAIT:\n"  # (a label inside braces is local to them)
                "mbarrier.try_wait.shared::cta.b64 done, [$2], state;\n"
                "@!done bra WAIT;\n}",
                _smem_address(src_ref), _smem_address(dst_ref), _smem_address(bar_ref),
                has_side_effects=True)
        mgpu_utils.warpgroup_barrier()

    gather(src, dst, bar)


def _strided(rows: int):
    """[rows, 8] float32 over a warpgroup: thread t holds elements [v t, v t + v), v = rows / 16."""
    return plgpu.Layout.WG_STRIDED((rows, 8), rows // 16)


def _store_to_cluster(value, slot, size: int):
    """value (a [rows, 8] float32 array, _strided(rows)) stored into `slot` of every CTA of
    the cluster by plain shared::cluster stores (rows / 4 bytes a thread a peer)."""
    rows = value.shape[0]
    vec = rows // 16

    @plgpu.inline_mgpu(arg_types=(_strided(rows), plgpu.RefType()))
    def store(ctx, x, ref):
        del ctx
        i32 = ir.IntegerType.get_signless(32)
        lane = arith.remui(mgpu_utils.thread_idx(), arith.constant(i32, 128))
        addr = arith.addi(_smem_address(ref), arith.muli(lane, arith.constant(i32, 4 * vec)))
        [reg] = list(x.registers.flat)
        values = [vector.extract(reg, [], [i]) for i in range(vec)]
        operands = ", ".join(f"${i + 1}" for i in range(vec))
        what = f"v{vec}.f32 [raddr], {{{operands}}}" if vec > 1 else "f32 [raddr], $1"
        for p in range(size):
            mgpu_utils.inline_ptx(
                "{\n.reg .b32 rpeer, raddr;\n"
                f"mov.b32 rpeer, {p};\n"
                "mapa.shared::cluster.u32 raddr, $0, rpeer;\n"
                f"st.shared::cluster.{what};\n}}",
                addr, *values, has_side_effects=True)

    store(value, slot)


def _cluster_sync():
    """CLUSTER_BARRIER."""
    @plgpu.inline_mgpu()
    def sync(ctx):
        del ctx
        mgpu_utils.inline_ptx(CLUSTER_BARRIER, has_side_effects=True)

    sync()


def _body(parts, out, slots, tmp, bars, src, *, clusters, size, rounds, exchanges, method,
          rows):
    """parts [rounds + 1, G, C, 64, 8] float32 (round 0 given, the rest NaN); out
    [G, C, ROWS, 8]: rows [0, ROWS) of the last round's partials."""
    g, c = lax.axis_index("clusters"), lax.axis_index("cl")
    layout = _strided(rows) if method == "barrier" else plgpu.Layout.WGMMA
    tmp[...] = jnp.zeros(TILE, jnp.float32)
    if method == "bulk":
        _init_bulk_barriers(bars)

    def one_round(r, carry):
        views = [parts.at[r, h, c, :ROWS] for h in range(clusters)]
        polled = _poll_loads(views, (ROWS, 8), 1)
        x = sum(polled[1:], polled[0]) * (1.0 / clusters)  # (a mean: values stay near 1)
        tmp.at[:ROWS][...] = x
        plgpu.commit_smem()
        value = plgpu.load(tmp.at[:rows], layout=layout)
        for e in range(exchanges):
            k = (r * exchanges + e) % 2
            if method == "barrier":
                _store_to_cluster(value, slots.at[k, c], size)
                _cluster_sync()
            elif method == "bulk":
                src.at[k][...] = value
                plgpu.commit_smem()  # (the plain stores before the async proxy's copies)
                _bulk_all_gather(src.at[k], slots.at[k, c], bars.at[k], size)
            else:
                for peer in range(size):
                    plgpu.async_store_smem(value, slots.at[k, c], bars.at[k], cluster_idx=peer,
                                           cluster_dim="cl")
                plgpu.barrier_wait(bars.at[k])
            value = sum(plgpu.load(slots.at[k, p], layout=layout)
                        for p in range(size)) * (1.0 / size)
        parts.at[r + 1, g, c, :rows][...] = value
        return carry

    lax.fori_loop(0, rounds, one_round, 0)
    last = plgpu.Layout.WG_STRIDED((ROWS, 8), 1)
    out.at[g, c][...] = plgpu.load(parts.at[rounds, g, c, :ROWS], layout=last)


def cluster_hops(parts0, *, size: int, rounds: int, exchanges: int, method: str = "barrier",
                 rows: int = 64):
    """[G, C, ROWS, 8] float32 after `rounds` rounds from parts0 ([G, C, 64, 8]): rows
    [0, ROWS) of the last round's partials.

    method: how a tile crosses the cluster: "barrier" (plain stores into the peers' shared
    memory, then the hardware cluster barrier), "bulk" (one bulk copy a peer, one arrival a
    CTA) or "st_async" (Pallas' async_store_smem: st.async from every thread, each arriving
    on the peer's barrier). rows: of the [64, 8] tile a CTA sends (16, 32 or 64; "barrier"
    only)."""
    clusters = parts0.shape[0]
    if rows not in (16, 32, 64) or (rows != 64 and method != "barrier"):
        raise ValueError(f"rows {rows} with method {method}: want 16, 32 or 64 (barrier), 64")
    nan = jnp.full((rounds, *parts0.shape), jnp.nan, jnp.float32)
    parts = jax.new_ref(jnp.concatenate([parts0[None], nan]))
    if method in ("bulk", "barrier"):
        scratch = (plgpu.SMEM((2, size, rows, 8), jnp.float32), plgpu.SMEM(TILE, jnp.float32),
                   plgpu.SMEM((2, 2), jnp.int32), plgpu.SMEM((2, *TILE), jnp.float32))
    elif method == "st_async":
        scratch = (plgpu.SMEM((2, size, *TILE), jnp.float32, transforms=SWIZZLE),
                   plgpu.SMEM(TILE, jnp.float32),
                   plgpu.Barrier(num_arrivals=size, num_barriers=2),  # (a warpgroup each)
                   plgpu.SMEM((1, 8), jnp.float32))  # (unused)
    else:
        raise ValueError(f"method {method!r}: want bulk, barrier or st_async")
    kernel = plgpu.kernel(
        functools.partial(_body, clusters=clusters, size=size, rounds=rounds,
                          exchanges=exchanges, method=method, rows=rows),
        out_type=jax.ShapeDtypeStruct((*parts0.shape[:2], ROWS, 8), jnp.float32),
        grid=(clusters,), grid_names=("clusters",), cluster=(size,), cluster_names=("cl",),
        scratch_types=scratch)
    return kernel(parts)


def reference(parts0, rounds: int, exchanges: int):
    """The same rounds in float64: a round averages rows [0, ROWS) of every cluster's slice c
    into rows [0, ROWS) of CTA c (the other rows 0), then each exchange averages the
    cluster's C tiles."""
    p = np.asarray(parts0, np.float64)
    for _ in range(rounds):
        x = np.zeros_like(p)
        x[:, :, :ROWS] = p[:, :, :ROWS].mean(axis=0, keepdims=True)
        for _ in range(exchanges):
            x = np.broadcast_to(x.mean(axis=1, keepdims=True), x.shape).copy()
        p = x
    return p[:, :, :ROWS]


def run(size: int, exchanges: int, rounds: int, clusters: int, method: str,
        rows: int = 64) -> dict:
    rng = np.random.default_rng(0)
    parts0 = jnp.asarray(rng.uniform(-1, 1, (clusters, size, *TILE)), jnp.float32)
    row = {"cluster": size, "clusters": clusters, "ctas": size * clusters,
           "exchanges": exchanges, "method": method, "rows": rows, "rounds": rounds}
    fns = {n: jax.jit(functools.partial(cluster_hops, size=size, rounds=n, exchanges=exchanges,
                                        method=method, rows=rows))
           for n in (rounds // 4, rounds)}
    for n in (rounds // 4, rounds):  # the short call first: a NaN there skips the long one
        got = np.asarray(fns[n](parts0), np.float64)
        want = reference(parts0, n, exchanges)
        row["nan"] = bool(np.isnan(got).any())
        row["error"] = float(np.nanmax(np.abs(got - want), initial=0.0)
                             / max(np.abs(want).max(), 1e-30))
        if row["nan"]:
            return row
    t = {n: time_it(f, (parts0,), warmup=1, repeats=5) for n, f in fns.items()}
    row["round_us"] = round((t[rounds] - t[rounds // 4]) / (rounds - rounds // 4) * 1e6, 3)
    row["call_us"] = round(t[rounds] * 1e6, 1)
    return row


def _counts(text: str) -> list[int]:
    """--exchanges: comma-separated counts >= 0."""
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: want counts >= 0, comma-separated, "
                                         "e.g. 0,1,2,3")
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__)
    parser.add_argument("--cluster", type=int, action="append", choices=[1, 2, 4, 8],
                        help="CTAs a cluster (repeatable; default 2, 4 and 8; 8 is the "
                             "largest portable cluster)")
    parser.add_argument("--exchanges", default=[0, 1, 2, 3], type=_counts,
                        help="cluster exchanges a round, comma-separated (default 0,1,2,3)")
    parser.add_argument("--method", action="append", choices=["barrier", "bulk", "st_async"],
                        help="how a tile crosses the cluster (repeatable; default barrier)")
    parser.add_argument("--rows", type=int, default=64, choices=[16, 32, 64],
                        help="rows of the [64, 8] float32 tile each exchange sends a peer "
                             "(barrier only; default 64)")
    parser.add_argument("--rounds", type=int, default=256, help="rounds a call (default 256)")
    parser.add_argument("--clusters", type=int, default=None,
                        help="clusters (default: the SMs // the cluster size)")
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("bench_cluster_hop.py needs a GPU: its CTAs poll each other", file=sys.stderr)
        return 2
    if args.rounds < 8:
        parser.error("--rounds must be at least 8")
    device = jax.devices()[0].device_kind
    exchanges = args.exchanges
    for method in args.method or ["barrier"]:
        rows = args.rows if method == "barrier" else 64
        for size in args.cluster or [2, 4, 8]:
            clusters = args.clusters or _num_sms() // size
            calls = {}
            for e in exchanges:
                row = run(size, e, args.rounds, clusters, method, rows)
                print(json.dumps({"device": device, **row}), flush=True)
                if "call_us" in row:
                    calls[e] = row["call_us"]
            if len(calls) > 1:
                slope = np.polyfit(list(calls), list(calls.values()), 1)[0]
                print(json.dumps({"device": device, "method": method, "cluster": size,
                                  "rows": rows, "exchange_us": round(slope / args.rounds, 3)}),
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
