"""The pass that hands a classifier's dense layer to oneDNN: ``matmul(x, W) [+ bias]`` → one packed call.

A dense layer with constant weights is a 1×1 conv on a 1×1 image, so it runs as
the oneDNN bridge's conv primitive (``x`` is [N, K], which has the memory of
[N, K, 1, 1]).  Why not leave it to TIR: the matmul's reduction is its innermost
loop, which the fallback schedule cannot vectorize, so an untuned build spent
about 1.2 ms in EfficientNet-Lite0's 1280×1000 classifier (a tuned one still
175 µs), and every plan the search measures before the first tuning round is an
untuned build.  The weights are packed at build time, as for the convs.  Dense
layers are not plan layers (they always run float32): VerifyPlan does not see
them, and the profile reports them as ``onednn_dense_<K>x<M>``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant

from . import _onednn
from ._build_report import ReportingPass
from ._importer import emit_like
from ._onednn_offload import _Graph, _op

PASS_NAME = "precsearch.OffloadDenseOneDNN"

# Below this many multiply-adds a oneDNN call (a few µs of dispatch) costs more than the TIR loop
# (PP-LCNet's 1280×4 and MobileNetV3's small heads stay TIR).
MIN_DENSE_MACS = 1 << 18


def _constant_weights(graph: _Graph, expr) -> np.ndarray | None:
    """The [K, M] matrix ``expr`` is, when it is a constant (maybe through ``permute_dims``), else None."""
    transposed = False
    for _ in range(4):
        if isinstance(expr, Constant):
            value = expr.value.numpy()
            return value.T if transposed else value
        if isinstance(expr, relax.Var) and expr in graph.value:
            expr = graph.value[expr]
        elif _op(expr) == "relax.permute_dims" and len(expr.args[0].ty.shape) == 2:
            axes = expr.attrs.axes
            if axes is not None and [int(a) for a in axes] == [0, 1]:
                expr = expr.args[0]
                continue
            transposed = not transposed
            expr = expr.args[0]
        else:
            return None
    return None


def _dense_spec(rows: int, depth: int, columns: int, threads: int) -> _onednn.ConvSpec:
    return _onednn.ConvSpec((rows, depth, 1, 1), (rows, columns, 1, 1), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1,
                            0, 0, threads=threads)


@tvm.transform.module_pass(opt_level=0, name=PASS_NAME)
class OffloadDenseOneDNN(ReportingPass):
    """Replace each float32 ``matmul([N, K], constant [K, M])`` (and a constant bias added to it) by a oneDNN call."""

    def __init__(self, threads: int, report=None, min_macs: int | None = None):
        super().__init__(report)
        self.threads = threads
        self.min_macs = MIN_DENSE_MACS if min_macs is None else min_macs

    def run(self, mod: tvm.IRModule) -> tvm.IRModule:
        func = mod["main"]
        graph = _Graph(func)
        dense = {}  # the binding that ends the dense layer → (matmul var, data, weights [M, K], bias, spec)
        for var, value in graph.value.items():
            if _op(value) != "relax.matmul" or str(value.ty.dtype) != "float32":
                continue
            data, weight_expr = value.args
            if len(data.ty.shape) != 2 or str(data.ty.dtype) != "float32":
                continue
            weights = _constant_weights(graph, weight_expr)
            if weights is None or weights.ndim != 2 or weights.dtype != np.float32:
                continue
            rows, depth = (int(d) for d in data.ty.shape)
            columns = weights.shape[1]
            if rows * depth * columns < self.min_macs:
                continue
            spec = _dense_spec(rows, depth, columns, self.threads)
            kernel = _onednn.implementation(spec)
            if kernel.startswith("ref"):
                continue
            end, bias = var, np.zeros(columns, dtype="float32")
            user = graph.only_user(var)
            if user is not None and _op(graph.value[user]) == "relax.add":
                other = [arg for arg in graph.value[user].args if not arg.same_as(var)]
                if len(other) == 1 and isinstance(other[0], Constant):
                    constant = other[0].value.numpy()
                    if constant.size == columns and constant.shape[-1] == columns:
                        end, bias = user, constant.reshape(columns).astype("float32")
            dense[end] = (var, data, np.ascontiguousarray(weights.T), bias, spec)
            self.report.onednn_dense[f"{depth}x{columns}"] = kernel
        if not dense:
            return mod
        absorbed = {matmul for end, (matmul, *_rest) in dense.items() if end is not matmul}
        mutator = _DenseOffloader(mod, dense, absorbed)
        mutator.builder_.update_func(mod.get_global_var("main"), mutator.visit_expr(func))
        return mutator.builder_.get()


@relax.expr_functor.mutator
class _DenseOffloader(relax.PyExprMutator):
    def __init__(self, mod, dense, absorbed):
        super().__init__(mod)
        self.dense = dense
        self.absorbed = absorbed

    def visit_var_binding_(self, binding):
        if binding.var in self.absorbed:
            return None
        entry = self.dense.get(binding.var)
        if entry is None:
            return super().visit_var_binding_(binding)
        _matmul, data, weights_mk, bias, spec = entry
        packed = _onednn.pack_weights(spec, weights_mk.reshape(*weights_mk.shape, 1, 1))
        call = relax.op.call_dps_packed(
            _onednn.DENSE_FUNCTION,
            relax.Tuple([self.visit_expr(data), relax.const(packed, "uint8"), relax.const(bias, "float32"),
                         relax.const(spec.config(), "int64"), relax.const(spec.post(), "float32")]),
            out_ty=binding.var.ty)
        self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, call))
