"""Lower the quantize / dequantize / clip calls left at int8↔float boundaries.

Also un-hides ONNX Clip: Relax's importer emits it as two opaque ``call_tir``
kernels (``maximum``/``minimum`` against a NaN-sanitized bound), which pin every
hard-swish to NCHW; with constant bounds they are plain relax maximum/minimum.

In TVM 0.27 these ops have no layout inference, so ConvertLayout would wrap each
of them in transforms back to NCHW — at every boundary, twice.  Written as
elementwise ops (which do have layout inference) a boundary costs nothing but
the arithmetic.  Semantics follow ONNX: QuantizeLinear is
``saturate(round_half_even(x / scale) + zero_point)``, and TVM's ``round`` lowers
to LLVM ``nearbyint``, which rounds half to even.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax import expr_functor

from precsearch.errors import CompileError
from ._build_report import BuildReport
from ._importer import emit_like

PASS_NAME = "precsearch.LowerQDQ"

_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}


@tvm.transform.module_pass(opt_level=0, name=PASS_NAME)
class LowerQDQ:
    """Replace per-tensor quantize/dequantize and clip with elementwise arithmetic.

    Parameters
    ----------
    params : dict of str to ndarray
        Values of the scale and zero-point parameters.
    report : BuildReport, optional
        Keeps the CompileError this pass raises.
    """

    def __init__(self, params: dict[str, np.ndarray], report: BuildReport | None = None):
        self.params = params
        self.report = report if report is not None else BuildReport()

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with self.report.recording_failure():
            var2val = relax.analysis.get_var2val(mod["main"])
            mod["main"] = _Lowerer(self.params, var2val, self.report, mod).visit_expr(mod["main"])
            return relax.transform.DeadCodeElimination()(mod)


@expr_functor.mutator
class _Lowerer(relax.PyExprMutator):
    def __init__(self, params, var2val, report: BuildReport, mod=None):
        super().__init__(mod)
        self.params = params
        self.var2val = var2val
        self.report = report

    def _value(self, expr, what: str, var_name: str) -> float:
        if isinstance(expr, tvm.ir.expr.Constant):
            array = expr.value.numpy()
        elif getattr(expr, "name", None) in self.params:
            array = np.asarray(self.params[expr.name])
        else:
            raise CompileError(f"{what} of {var_name} is not a constant", pass_name=PASS_NAME)
        if array.size != 1:
            raise CompileError(f"{what} of {var_name} is per-channel ({array.size} values); only weights may be "
                               "quantized per channel", pass_name=PASS_NAME)
        return array.reshape(-1)[0].item()

    def _clip_bound(self, expr):
        """The constant value of an importer clip bound ``where(isnan(c), ±inf, c)``, or None."""
        value = self.var2val.get(expr, expr) if isinstance(expr, relax.Var) else expr
        if isinstance(value, tvm.ir.expr.Constant):
            array = value.value.numpy()
            return array if array.size == 1 else None
        if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.where":
            fallback, bound = value.args[1], value.args[2]
            if isinstance(fallback, tvm.ir.expr.Constant) and isinstance(bound, tvm.ir.expr.Constant):
                array = bound.value.numpy()
                return np.where(np.isnan(array), fallback.value.numpy(), array) if array.size == 1 else None
        return None

    def _opaque_clip(self, value):
        """``relax.op.maximum/minimum`` for an importer ``call_tir(maximum|minimum, (x, bound))``."""
        if getattr(value.op, "name", "") != "relax.call_tir" or len(value.args[1].fields) != 2:
            return None
        callee = value.args[0].name_hint
        op = relax.op.maximum if callee.startswith("maximum") else relax.op.minimum \
            if callee.startswith("minimum") else None
        if op is None:
            return None
        data, bound = value.args[1].fields
        bound_value = self._clip_bound(bound)
        if bound_value is None:
            return None
        dtype = str(data.ty.dtype)
        return op(self.visit_expr(data), relax.const(bound_value.reshape(()).astype(dtype), dtype))

    def visit_var_binding_(self, binding):
        # Called from C++ (the mutator's traversal): keep the error before TVM turns it into text.
        with self.report.recording_failure():
            self._visit_binding(binding)

    def _visit_binding(self, binding):
        value = binding.value
        if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.call_tir":
            replacement = self._opaque_clip(value)
            if replacement is None:
                super().visit_var_binding_(binding)
            else:
                self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, replacement))
            return
        if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)):
            super().visit_var_binding_(binding)
            return
        name = value.op.name
        var_name = binding.var.name
        if name == "relax.quantize":
            data = self.visit_expr(value.args[0])
            scale = self._value(value.args[1], "scale", var_name)
            zero = self._value(value.args[2], "zero point", var_name)
            dtype = str(value.attrs.out_dtype)
            if dtype not in _RANGES:
                raise CompileError(f"cannot quantize {var_name} to {dtype}", pass_name=PASS_NAME)
            low, high = _RANGES[dtype]
            scaled = relax.op.round(relax.op.divide(data, relax.const(np.float32(scale))))
            shifted = relax.op.add(scaled, relax.const(np.float32(zero)))
            clipped = relax.op.minimum(relax.op.maximum(shifted, relax.const(np.float32(low))),
                                       relax.const(np.float32(high)))
            replacement = relax.op.astype(clipped, dtype)
        elif name == "relax.dequantize":
            data = self.visit_expr(value.args[0])
            if isinstance(data, tvm.ir.expr.Constant) or (isinstance(data, relax.Var) and data.name in self.params):
                # A dequantized constant (a weight of a conv the plan keeps int8 but the
                # rewrite did not match) must not silently become a float weight.
                raise CompileError(f"dequantize of constant {getattr(data, 'name', 'constant')} was left for "
                                   "lowering: an int8 conv fell back to float", pass_name=PASS_NAME)
            scale = self._value(value.args[1], "scale", var_name)
            zero = self._value(value.args[2], "zero point", var_name)
            as_float = relax.op.astype(data, "float32")
            replacement = relax.op.multiply(relax.op.subtract(as_float, relax.const(np.float32(zero))),
                                            relax.const(np.float32(scale)))
        elif name == "relax.clip":
            data = self.visit_expr(value.args[0])
            dtype = str(data.ty.dtype)
            low, high = (float(arg.value) for arg in value.args[1:3])
            replacement = relax.op.minimum(relax.op.maximum(data, relax.const(low, dtype)),
                                           relax.const(high, dtype))
        else:
            super().visit_var_binding_(binding)
            return
        new_var = emit_like(self.builder_, binding.var, replacement)
        self.set_var_remap(binding.var, new_var)
