"""tools/sweep_decode_attention.py on CPU: every candidate (both kernel forms, in their
interpreters) checked against the reference, uniform and ragged, and its argument errors.
The timings need the GPU (docs/benchmarks.md, twenty-first session)."""

from __future__ import annotations

import contextlib
import gzip
import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
import sweep_decode_attention as sweep  # noqa: E402


def test_each_candidate_is_checked_uniform_and_ragged(capsys):
    sweep.main(["--shape", "2,8,2,256,64,3", "--splits", "0,2", "--calls", "1", "--repeats", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()[1:]]
    kernels = [r for r in rows if r["impl"] in ("mosaic", "triton")]
    assert [(r["impl"], r["splits"]) for r in kernels] == [
        ("mosaic", None), ("mosaic", 2), ("triton", None), ("triton", 2)]
    for row in kernels:  # bf16 inputs: P and the output rounded to bf16
        assert row["error_over_scale"] < 2e-2 and row["ragged_error_over_scale"] < 2e-2, row
    assert [r["impl"] for r in rows if r not in kernels] == ["xla"]  # (cuDNN: GPU only)


def test_profile_keeps_stdout_json_lines(tmp_path, capsys):
    """--profile traces each candidate; without a GPU the trace has no kernels, so the rows
    carry no kernel times, and stdout stays one JSON object a line."""
    sweep.main(["--shape", "2,8,2,128,64,1", "--backend", "triton", "--calls", "1",
                "--repeats", "1", "--profile", str(tmp_path)])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r.get("impl") for r in rows[1:]] == ["triton", "xla"]
    assert not any("kernel_us" in r for r in rows)
    assert sorted(p.name for p in (tmp_path / "2_8_2_128_64_1").iterdir()) == ["0", "1"]


@pytest.mark.parametrize("argv,message", [
    (["--shape", "2,8,2,256,64"], "B,N,K,S,H,T"),
    (["--shape", "2,8,3,256,64,1"], "K must divide N"),
    (["--backend", "cuda"], "mosaic, triton"),
    (["--block-k", "64,x"], "comma-separated integers"),
    (["--calls", "0"], "at least 1"),
])
def test_bad_arguments_are_refused_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        sweep.main(argv)
    assert message in capsys.readouterr().err


def test_kernel_times_from_a_trace_with_gpu_events(tmp_path, monkeypatch):
    """The GPU side of --profile on a synthetic trace: the GPU process's kernels are read
    (the host's are not), the longest kernel a call is the attention kernel's time."""
    import jax.numpy as jnp

    trace = {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        *[{"ph": "X", "pid": 1, "name": "decode_attention", "dur": 30.0}] * 4,
        *[{"ph": "X", "pid": 1, "name": "loop_fusion", "dur": 2.0}] * 8,
        {"ph": "X", "pid": 2, "name": "host_work", "dur": 999.0}]}
    path = tmp_path / "plugins" / "profile" / "run"
    path.mkdir(parents=True)
    with gzip.open(path / "x.trace.json.gz", "wt") as handle:
        json.dump(trace, handle)
    monkeypatch.setattr(sweep.jax.profiler, "trace", lambda _: contextlib.nullcontext())
    got = sweep.kernel_times(lambda x: x, (jnp.zeros(1),), calls=4, cache_bytes=30_000_000,
                             bandwidth=2e12, out_dir=str(tmp_path))
    assert got == {"kernel": "decode_attention", "kernel_us": 30.0,
                   "kernel_fraction_of_copy": 0.5, "all_kernels_us": 34.0,
                   "launches_per_call": 3.0}
