"""tools/sweep_decode_attention.py on CPU: every candidate (both kernel forms, in their
interpreters) checked against the reference, uniform and ragged, and its argument errors.
The timings need the GPU (docs/benchmarks.md, twenty-first session)."""

from __future__ import annotations

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
