"""The roofline's bandwidth (tools/bench_decode.py): per-pass timing cancels what a call pays
once, so a loop with a large fixed cost per call still reads the per-pass rate."""

import pathlib
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
import bench_decode  # noqa: E402


class _Done:
    def block_until_ready(self):
        return self


def _fake_loop(fixed_s: float, per_pass_s: float):
    """loop(n): a 'kernel' taking fixed_s + n * per_pass_s per call."""
    def loop(n):
        def run(_):
            time.sleep(fixed_s + n * per_pass_s)
            return _Done()
        return run
    return loop


def test_per_pass_rate_ignores_the_fixed_cost_of_a_call():
    # 1 MB a pass at 1 ms a pass = 1 GB/s; a call also pays 30 ms (more than 8 passes' worth,
    # which dividing 8 passes' bytes by the call time would count: 0.21 GB/s).
    rate = bench_decode.per_pass_rate(_fake_loop(0.030, 0.001), None, 10**6, repeats=3)
    assert rate == pytest.approx(1e9, rel=0.15)


def test_per_pass_rate_refuses_a_loop_that_does_not_grow_with_passes():
    # (noise on a too-small array, here made certain: 40 passes take less time than 8)
    with pytest.raises(RuntimeError, match="use a larger array"):
        bench_decode.per_pass_rate(_fake_loop(0.012, -0.0002), None, 10**6, repeats=2)


def test_copy_and_read_bandwidth_run_on_this_backend():
    """Both measures run (on the CPU here) and give a positive rate."""
    assert bench_decode.copy_bandwidth(64 << 20, repeats=2) > 0
    assert bench_decode.read_bandwidth(64 << 20, repeats=2) > 0
