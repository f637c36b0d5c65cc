"""tools/kernel_report.py's text handling: the Triton module out of Pallas' debug print, and the
counts read off ptxas and cuobjdump (the compile itself needs the `triton` extra)."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
import kernel_report  # noqa: E402

PRINTED = '''The kernel jaxpr for pallas_call step at kernel.py:10:
{ lambda ; a:Ref{int32[1]}. let  in () }

The Triton module for pallas_call step at kernel.py:10:
module @step {
  tt.func public @step(%arg0: !tt.ptr<i32> {tt.divisibility = 32 : i32} [unknown]) {
    %0 = tt.get_program_id x : i32 [unknown]
    %c0_i32 = arith.constant 0 : i32 "get:"(#loc93)
    tt.store %arg0, %0 : !tt.ptr<i32> #loc7
    tt.return [unknown]
  } [unknown]
} [unknown]
#loc7 = loc("kernel.py":12:4)
#loc93 = "get:"(#loc7)
'''

CLEAN = '''module @step {
  tt.func public @step(%arg0: !tt.ptr<i32> {tt.divisibility = 32 : i32}) {
    %0 = tt.get_program_id x : i32
    %c0_i32 = arith.constant 0 : i32
    tt.store %arg0, %0 : !tt.ptr<i32>
    tt.return
  }
}
'''


def test_the_module_comes_out_without_locations():
    assert kernel_report.triton_module(PRINTED) == CLEAN
    with pytest.raises(ValueError, match="no Triton module"):
        kernel_report.triton_module("The kernel jaxpr ...\n")


def test_sass_and_ptxas_counts():
    sass = """
        code for sm_90a
        Function : step
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0020*/                   SHFL.BFLY PT, R3, R2, 0x10, 0x1f ;
        /*0030*/                   LDS.U.128 R4, [R5] ;
        /*0040*/                   STS [R5], R6 ;
        /*0050*/                   MUFU.EX2 R7, R8 ;
        /*0060*/                   LDG.E.EL.128 R8, desc[UR4][R2.64] ;
        /*0070*/                   RED.E.ADD.STRONG.GPU PT, desc[UR4][R2.64], R9 ;
        /*10000*/                  BAR.SYNC.DEFER_BLOCKING 0x0 ;
                                   .L_x_1:
    """
    assert kernel_report.sass_counts(sass) == {
        "instructions": 9, "bar_sync": 2, "shfl": 1, "lds": 1, "sts": 1, "mufu": 1, "ldg": 1,
        "stg": 0, "atom": 1}
    info = ("ptxas info    : Function properties for step\n"
            "    40 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
            "ptxas info    : Used 255 registers, used 1 barriers, 40 bytes cumulative stack size\n")
    assert kernel_report.ptxas_info(info) == {"registers": 255, "spill_store_bytes": 8,
                                              "spill_load_bytes": 12, "stack_bytes": 40}
