"""ConvertLayout's NHWC permutes as layout transforms, so the rest of the pipeline sees one kind of transform.

ConvertLayout writes a conversion between two plain layouts (NCHW → NHWC, OIHW → HWIO)
as ``relax.permute_dims`` and one into a blocked layout as ``relax.layout_transform``.
Every later step that follows a weight to its parameter, counts the activation
transforms at precision boundaries or names them in the per-layer table looks for
``layout_transform``; this pass rewrites the permutes ConvertLayout added (the ones that
convert to or from a conv's NHWC / HWIO layout) into the equivalent ``layout_transform``
so those steps need no second case.  A model's own Transpose keeps its permute: only
the permutations below are rewritten, and only after ConvertLayout in an NHWC build.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.tirx import IndexMap

PASS_NAME = "precsearch.NHWCTransforms"

# The permutations ConvertLayout writes for an NHWC build: activations NCHW → NHWC and back,
# conv weights OIHW → HWIO.
NCHW_TO_NHWC, NHWC_TO_NCHW, OIHW_TO_HWIO = (0, 2, 3, 1), (0, 3, 1, 2), (2, 3, 1, 0)
_REWRITTEN = (NCHW_TO_NHWC, NHWC_TO_NCHW, OIHW_TO_HWIO)


def permutation_index_map(axes) -> IndexMap:
    """The index map of ``permute_dims(axes)``: output index i reads input axis axes[i]."""
    return IndexMap.from_func(lambda *index: [index[axis] for axis in axes], ndim=len(axes))


def map_permutation(index_map) -> tuple[int, ...] | None:
    """The axes of a pure permutation index map, or None."""
    initial = list(index_map.initial_indices)
    axes = []
    for expr in index_map.final_indices:
        found = [i for i, var in enumerate(initial) if expr.same_as(var)]
        if len(found) != 1:
            return None
        axes.append(found[0])
    return tuple(axes) if sorted(axes) == list(range(len(initial))) else None


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if getattr(call.op, "name", "") != "relax.permute_dims" or call.attrs.axes is None:
            return call
        axes = tuple(int(a) for a in call.attrs.axes)
        if axes not in _REWRITTEN:
            return call
        return relax.op.layout_transform(call.args[0], permutation_index_map(axes))


@tvm.transform.module_pass(opt_level=0, name=PASS_NAME)
class NHWCTransforms:
    """Rewrite the NHWC permutes of ConvertLayout as ``relax.layout_transform`` (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        return rewriter.builder_.get()
