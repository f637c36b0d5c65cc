"""What the Pallas batch-1 decode step (pallas_kernels/fused_decode.py) compiles to for a Hopper
GPU, on any machine: registers, spills, and counts of the instructions that cost latency.

    uv sync --extra triton        # (or pip install -e '.[triton]'): Triton 3.6 and its ptxas
    python tools/kernel_report.py --config 1b
    python tools/kernel_report.py --config 1b --only attention --module /tmp/variant.py

No GPU needed, and none is used: the step is lowered for CUDA with shapes only (`--plan`
fields as in check_fused_decode.py). Pallas prints the Triton IR it hands to XLA. Triton then
compiles that IR for sm_90 with the kernel's warps and one stage, ptxas assembles it, and
cuobjdump lists the SASS. XLA's own Triton pipeline is close to this but not the same, so
register counts can differ by a few; timings still need a GPU. The figures are useful to
compare two variants of a stage before spending device time on them:
- registers, spills, stack: ptxas;
- SASS instructions, BAR.SYNC (CTA barriers: cross-warp reductions and layout changes go
  through shared memory), SHFL (warp reductions), LDS/STS (shared memory), MUFU
  (transcendentals);
- convert_layout ops in the TTGIR.
`--only STAGE` leaves the other stages out (Plan.skip) so the counts are that stage's.
`--keep DIR` keeps the .ttir/.ttgir/.ptx/.sass files. One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import pathlib
import re
import subprocess
import sys
import tempfile

SASS_COUNTS = {"bar_sync": r"\bBAR\.SYNC", "shfl": r"\bSHFL\.", "lds": r"\bLDS\b",
               "sts": r"\bSTS\b", "mufu": r"\bMUFU\.", "ldg": r"\bLDG\.", "stg": r"\bSTG\.",
               "atom": r"\b(?:ATOM|RED)G?\."}
OUTPUT_PARTS = ("qkv", "attention", "o_proj", "gate_up", "down", "head")


def triton_module(printed: str) -> str:
    """The Triton module in Pallas' debug print, as plain MLIR Triton can parse: the text from
    `module @...` to its closing brace, with the printed source locations taken out (the
    pretty form `[unknown]`, `"name:"(#locN)`, `#locN` and the `#loc...` definitions)."""
    start = printed.find("\nmodule @")
    if start < 0:
        raise ValueError("no Triton module in the output (was the pallas_call lowered with "
                         "debug=True?)")
    end = re.compile(r"^}[^\n]*$", re.M).search(printed, start)
    if end is None:
        raise ValueError("the Triton module has no closing brace")
    text = printed[start + 1:end.start()] + "}\n"
    text = re.sub(r' "[^"\n]*"\(#loc\d+\)', "", text)
    text = re.sub(r" \[unknown\]", "", text)
    return re.sub(r" #loc\d*", "", text)


def sass_counts(sass: str) -> dict:
    """Counts of instructions (lines of cuobjdump's listing) and of SASS_COUNTS' kinds."""
    lines = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s", line)]
    counts = {"instructions": len(lines)}
    for name, pattern in SASS_COUNTS.items():
        counts[name] = sum(1 for line in lines if re.search(pattern, line))
    return counts


def ptxas_info(text: str) -> dict:
    """Registers, spill bytes and stack bytes from `ptxas -v`."""
    def number(pattern):
        found = re.search(pattern, text)
        return int(found.group(1)) if found else None
    return {"registers": number(r"Used (\d+) registers"),
            "spill_store_bytes": number(r"(\d+) bytes spill stores"),
            "spill_load_bytes": number(r"(\d+) bytes spill loads"),
            "stack_bytes": number(r"(\d+) bytes stack frame")}


def lowered_triton_ir(config: str, plan_options: dict, module_file: str | None) -> tuple:
    """(Triton IR text, num_warps) of the one-launch step for `config` (bf16), lowered for CUDA
    with a Hopper GPU assumed (no device needed)."""
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import gpu_info, pallas_call_registration

    from jaxlm import kv_cache, model
    from jaxlm.config import load_config

    if module_file:
        from bench_fused_decode_ab import load_version  # tools/, next to this script
        fused_decode = load_version(module_file, "variant")
    else:
        from pallas_kernels import fused_decode
    hopper = gpu_info.GpuInfo(gpu_version=gpu_info.GpuVersion.H100, arch_name="9.0",
                              compute_capability=90)
    pallas_call_registration.gpu_info_lib.get_gpu_info = lambda: hopper
    cfg = dataclasses.replace(load_config(config).model, param_dtype="bfloat16",
                              compute_dtype="bfloat16")
    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    cache = jax.eval_shape(lambda: kv_cache.init_cache(cfg, 1, 640))
    reason = fused_decode.unsupported(cfg, cache, 1)
    if reason:
        raise SystemExit(f"{config}: the fused decode step does not run this model: {reason}")
    plan = fused_decode.make_plan(cfg, cache, programs=132, **plan_options)
    weights = jax.eval_shape(lambda p: fused_decode.prepare(cfg, p), params)
    original = fused_decode.pl.pallas_call
    fused_decode.pl.pallas_call = functools.partial(original, debug=True)
    printed = io.StringIO()
    try:
        step = jax.jit(lambda w, t, c: fused_decode.step_state(cfg, w, t, c, plan=plan,
                                                               one_launch=True))
        with contextlib.redirect_stdout(printed):
            step.trace(weights, jax.ShapeDtypeStruct((1,), jnp.int32), cache).lower(
                lowering_platforms=("cuda",))
    finally:
        fused_decode.pl.pallas_call = original
    return triton_module(printed.getvalue()), plan.num_warps


def compile_report(ttir: str, num_warps: int, keep: pathlib.Path | None) -> dict:
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError:
        raise SystemExit("kernel_report needs Triton: uv sync --extra triton "
                         "(or pip install -e '.[triton]')")
    tools = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as scratch:
        folder = keep or pathlib.Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "step.ttir").write_text(ttir)
        kernel = triton.compile(str(folder / "step.ttir"), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": num_warps, "num_stages": 1})
        (folder / "step.ttgir").write_text(kernel.asm["ttgir"])
        (folder / "step.ptx").write_text(kernel.asm["ptx"])
        assembled = subprocess.run(
            [str(tools / "ptxas"), "-arch=sm_90a", "-v", str(folder / "step.ptx"), "-o",
             str(folder / "step.cubin")], capture_output=True, text=True, check=True)
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(folder / "step.cubin")],
                              capture_output=True, text=True, check=True).stdout
        (folder / "step.sass").write_text(sass)
    return {**ptxas_info(assembled.stdout + assembled.stderr), **sass_counts(sass),
            "convert_layout": kernel.asm["ttgir"].count("convert_layout")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="125m", help="preset (default 125m)")
    parser.add_argument("--plan", action="append", default=[], metavar="FIELD=VALUE",
                        help="a fused_decode.Plan field, e.g. lookahead=true")
    parser.add_argument("--only", choices=OUTPUT_PARTS,
                        help="compile this stage alone (the others skipped)")
    parser.add_argument("--module", help="another fused_decode.py to compile instead")
    parser.add_argument("--keep", type=pathlib.Path, help="keep the IR, PTX and SASS here")
    args = parser.parse_args()
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from check_fused_decode import parse_field  # tools/, next to this script

    plan_options = dict(parse_field(item) for item in args.plan)
    if args.only:
        plan_options["skip"] = tuple(p for p in OUTPUT_PARTS if p != args.only)
    ttir, num_warps = lowered_triton_ir(args.config, plan_options, args.module)
    report = compile_report(ttir, num_warps, args.keep)
    print(json.dumps({"config": args.config, "only": args.only, "module": args.module,
                      **{k: v for k, v in plan_options.items() if k != "skip"}, **report}))


if __name__ == "__main__":
    main()
