"""A minimal reproduction, for an upstream report, of the Mosaic GPU limit that blocks a
transposed attention unit in pallas_kernels/stage_chain.py (docs/design.md, "A transposed
unit"): a wgmma result (float32, WGMMA layout) stored into a transposed view of a shared
memory buffer fails layout inference, where the same store into the plain view lowers.

    python tools/repro_mosaic_transposed_store.py            # both stores, one line each
    python tools/repro_mosaic_transposed_store.py --n 64

No GPU needed: the kernel is lowered for CUDA from shapes only, which runs Mosaic GPU's
layout inference. With jax 0.11.2 the plain store lowers and the transposed one raises
"Failed to infer a possible set of layouts". Exit status 0 when the result is that one, 1
when it changed (the transposed store lowers, or the plain one fails): re-run it after a jax
upgrade to see whether the transposed unit has become possible.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

M, K = 64, 64  # one wgmma's rows; the contraction (one 128-byte row of bf16)


def lower(n: int, transposed: bool) -> str | None:
    """None when the kernel (A [64, 64] x B [64, n] -> o [64, n] float32, stored plainly or
    as o^T into a [n, 64] buffer) lowers for CUDA, else the error's first line."""
    swizzle = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    out_shape = (n, M) if transposed else (M, n)

    def body(a_gmem, b_gmem, o_gmem, a_smem, b_smem, o_smem, bars):
        for i, (src, dst) in enumerate(((a_gmem, a_smem), (b_gmem, b_smem))):
            plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
            plgpu.barrier_wait(bars.at[i])

        def product(acc):
            plgpu.wgmma(acc, a_smem, b_smem)
            return acc[...]

        o = pl.run_scoped(product, plgpu.ACC((M, n), jnp.float32))
        target = o_smem.transpose((1, 0)) if transposed else o_smem
        target[...] = o
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem)
        plgpu.wait_smem_to_gmem(0)

    def entry(a, b, o):
        pl.run_scoped(lambda *scratch: body(a, b, o, *scratch),
                      plgpu.SMEM((M, K), jnp.bfloat16, transforms=swizzle),
                      plgpu.SMEM((K, n), jnp.bfloat16),
                      plgpu.SMEM(out_shape, jnp.float32),
                      plgpu.Barrier(num_barriers=2))

    def run(a, b):
        return plgpu.kernel(entry, out_type=jax.ShapeDtypeStruct(out_shape, jnp.float32))(a, b)

    shapes = (jax.ShapeDtypeStruct((M, K), jnp.bfloat16), jax.ShapeDtypeStruct((K, n),
                                                                                jnp.bfloat16))
    try:
        jax.jit(run).trace(*shapes).lower(lowering_platforms=("cuda",))
    except Exception as error:  # (any failure is the finding; its text says which)
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128, choices=(64, 128, 256),
                        help="the wgmma's N (columns of o; default 128). Narrower B tiles "
                             "need another swizzle, which this kernel does not set up")
    args = parser.parse_args(argv)
    results = {}
    for transposed in (False, True):
        results[transposed] = lower(args.n, transposed)
        name = "transposed store" if transposed else "plain store"
        print(f"jax {jax.__version__}, o [{M}, {args.n}] float32, {name}: "
              f"{results[transposed] or 'lowers'}")
    expected = results[False] is None and results[True] is not None
    return 0 if expected else 1


if __name__ == "__main__":
    raise SystemExit(main())
