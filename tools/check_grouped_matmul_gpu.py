"""GPU numerics of the grouped matmul's backends: Mosaic GPU (Hopper) and Triton against float32.

    python tools/check_grouped_matmul_gpu.py      # a few seconds on an H100/H200

For each case (empty groups, rows past the last group, transposed weights, dims that are tile
multiples as the Mosaic kernels need), the output of `grouped_matmul` with backend "mosaic_gpu"
and "triton" is compared with `grouped_matmul_reference` in float32 (relative L2 error), the
rows past the last group must be exactly zero, and the gradients (dx from the backend's kernel,
dw from the Triton kernel in both) are compared between the backends. The exit status is 1 if
any check fails. Needs a Hopper GPU for the Mosaic rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention import _on_hopper
from pallas_kernels.grouped_matmul import default_config, grouped_matmul, grouped_matmul_reference

# M, K, N, groups, transpose_rhs, rows in groups
CASES = [(1024, 256, 512, 8, False, 1000), (1024, 256, 512, 8, True, 1024),
         (4096, 512, 768, 16, False, 4000), (4096, 768, 512, 16, True, 3900)]
TOLERANCE = 1e-2  # bf16 outputs; the backends' errors are ~1.7e-3


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def check_case(rng, rows, k_dim, n_dim, groups, transpose_rhs, total) -> bool:
    sizes = rng.multinomial(total, np.ones(groups) / groups)
    sizes[5] += sizes[2] + sizes[6]
    sizes[[2, 6]] = 0  # empty groups
    sizes = jnp.asarray(sizes, jnp.int32)
    w_shape = (groups, n_dim, k_dim) if transpose_rhs else (groups, k_dim, n_dim)
    x = jnp.asarray(rng.standard_normal((rows, k_dim)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal(w_shape) / np.sqrt(k_dim), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((rows, n_dim)), jnp.bfloat16)
    want = grouped_matmul_reference(x.astype(jnp.float32), w.astype(jnp.float32), sizes,
                                    transpose_rhs=transpose_rhs)
    results = {}
    for backend in ("mosaic_gpu", "triton"):
        config = dataclasses.replace(default_config(), backend=backend)
        out, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, sizes, transpose_rhs=transpose_rhs,
                                                       config=config), x, w)
        results[backend] = (out, *vjp(dy))
    ok = True
    line = f"M {rows} K {k_dim} N {n_dim} G {groups} transposed {transpose_rhs} rows {total}:"
    for backend, (out, dx, dw) in results.items():
        error = rel(out, want)
        tail_zero = bool((np.asarray(out[int(sizes.sum()):], np.float32) == 0).all())
        finite = bool(np.isfinite(np.asarray(dx, np.float32)).all())
        ok &= error <= TOLERANCE and tail_zero and finite
        line += f" {backend} {error:.2e} (tail zero {tail_zero});"
    mosaic, triton = results["mosaic_gpu"], results["triton"]
    grads = [rel(a, b) for a, b in zip(mosaic[1:], triton[1:])]
    ok &= all(g <= TOLERANCE for g in grads)
    print(f"{line} mosaic vs triton dx {grads[0]:.2e} dw {grads[1]:.2e}  {'ok' if ok else 'FAIL'}")
    return ok


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    if not _on_hopper():
        sys.exit("needs a Hopper GPU (sm_90): the Mosaic GPU kernels run nowhere else; elsewhere, "
                 "tests/test_grouped_matmul.py checks the Triton kernels (interpret mode)")
    rng = np.random.default_rng(0)
    results = [check_case(rng, *case) for case in CASES]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
