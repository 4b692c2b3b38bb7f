"""VNNI dot-product tensor intrinsics that compile with the LLVM bundled in TVM 0.27.

TVM 0.27 ships ``dot_16x4_vnni``, but its implementation passes ``<16 x i32>``
operands to ``llvm.x86.avx512.vpdpbusd.512``; the bundled LLVM declares that
intrinsic on ``<64 x i8>`` operands and rejects the call, so every VNNI candidate
MetaSchedule produces fails to build and tuning silently falls back to scalar
code. These are the same computations with the operand types LLVM accepts, plus
an 8-lane (256-bit) variant for models whose channel counts only block by 8.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

VNNI_16X4 = "precsearch_dot_16x4_vnni"
VNNI_8X4 = "precsearch_dot_8x4_vnni"

# Output lanes of the intrinsic → its name; the lanes equal the NCHWc block of the conv output.
VNNI_BY_LANES = {16: VNNI_16X4, 8: VNNI_8X4}


def _description(lanes: int):
    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _implementation(lanes: int):
    llvm_name = {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256"}[lanes]
    bytes_ = lanes * 4

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name),
                C.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(T.broadcast(a_i32, lanes), dtype=f"int8x{bytes_}"),
                B.vload([0, 0], dtype=f"int8x{bytes_}"),
                dtype=f"int32x{lanes}",
            )

    return impl


def _register() -> None:
    for lanes, name in VNNI_BY_LANES.items():
        TensorIntrin.register(name, _description(lanes), _implementation(lanes), override=True)


_register()
