"""tools/bench_cluster_hop.py on CPU: its float64 reference on cases worked by hand, its
kernel lowered to Mosaic GPU for each way a tile crosses the cluster, and its input checks.
The timing and the kernel's results need the GPU (docs/benchmarks.md, twentieth session)."""

from __future__ import annotations

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
import bench_cluster_hop as hop  # noqa: E402


def test_reference_averages_the_polled_rows_over_clusters_then_over_each_cluster():
    g, c = 3, 2
    p0 = np.zeros((g, c, 64, 8))
    p0[:, 0, :hop.ROWS] = np.arange(g)[:, None, None]  # slice 0: cluster h holds h
    p0[:, 1, :hop.ROWS] = 10.0
    p0[:, :, hop.ROWS:] = 99.0  # never polled
    # One round, no exchange: CTA (any cluster, slice 0) polls the mean over clusters, 1.0;
    # slice 1: 10.0.
    got = hop.reference(p0, rounds=1, exchanges=0)
    assert got.shape == (g, c, hop.ROWS, 8)
    np.testing.assert_array_equal(got[:, 0], 1.0)
    np.testing.assert_array_equal(got[:, 1], 10.0)
    # An exchange averages the cluster's two slices: 5.5 everywhere, and stays there.
    for rounds, exchanges in ((1, 1), (2, 1), (1, 3)):
        np.testing.assert_allclose(hop.reference(p0, rounds, exchanges), 5.5)


@pytest.mark.parametrize("method,rows", [("barrier", 16), ("barrier", 64), ("bulk", 64),
                                         ("st_async", 64)])
def test_each_exchange_lowers_to_mosaic_gpu(method, rows):
    parts0 = jax.ShapeDtypeStruct((4, 4, 64, 8), jnp.float32)
    run = jax.jit(functools.partial(hop.cluster_hops, size=4, rounds=8, exchanges=2,
                                    method=method, rows=rows))
    assert "mosaic_gpu" in run.trace(parts0).lower(lowering_platforms=("cuda",)).as_text()


def test_bad_arguments_are_refused():
    parts0 = jnp.zeros((2, 2, 64, 8), jnp.float32)
    with pytest.raises(ValueError, match="want bulk, barrier or st_async"):
        hop.cluster_hops(parts0, size=2, rounds=8, exchanges=1, method="dsmem")
    with pytest.raises(ValueError, match="rows 16 with method bulk"):
        hop.cluster_hops(parts0, size=2, rounds=8, exchanges=1, method="bulk", rows=16)
    for bad in (["--exchanges", "1,x"], ["--exchanges", "-1"], ["--cluster", "3"]):
        with pytest.raises(SystemExit):
            hop.main(bad)
    if jax.default_backend() != "gpu":
        assert hop.main(["--cluster", "2"]) == 2  # polls need a GPU: a message, no hang
