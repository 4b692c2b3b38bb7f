"""The pass that lets a gather along one axis fuse with the ops around it.

AnnotateTIROpPattern calls a legalized ``relax.take`` opaque, because its
loads go through an index buffer, so FuseOps never fuses it: on YOLOX's Focus
stem (space-to-depth as reshape → transpose → reshape, a ``take`` that orders
the 12 channels as the model's Concat did, then the transform to the convs'
layout) that is three passes over the input image where one would do
(0.95 ms per inference on the dense detector).  A gather is injective, each
output element one input element, which is how Relay classified ``take``;
marked so, FuseOps fuses it with its injective neighbours and FuseTIR inlines
it, the index buffer becoming one more input of the fused kernel.
"""

from __future__ import annotations

import tvm
from tvm import tirx

PASS_NAME = "precsearch.InjectiveTake"
_OPAQUE, _INJECTIVE = 8, 2


def _is_take(func: tirx.PrimFunc) -> bool:
    """One block named T_take (what LegalizeOps writes for ``relax.take``), marked opaque."""
    if func.attrs is None or int(func.attrs.get("op_pattern", -1)) != _OPAQUE:
        return False
    sch = tvm.s_tir.Schedule(func)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # no root block: not a legalized op
        return False
    return [sch.get(block).name_hint for block in blocks] == ["T_take"]


@tvm.transform.module_pass(opt_level=0, name=PASS_NAME)
class InjectiveTake:
    """Mark every legalized ``take`` kernel injective (op_pattern 2), after AnnotateTIROpPattern."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {gv: func.with_attr("op_pattern", _INJECTIVE) for gv, func in mod.functions_items()
                   if isinstance(func, tirx.PrimFunc) and _is_take(func)}
        for gv, func in updates.items():
            mod[gv] = func
        return mod
