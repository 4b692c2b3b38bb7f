"""The pass that turns ``dequantize → conv2d → quantize`` into an integer conv.

Nothing in Relax does this (its CPU pipeline folds the weight dequantize and runs
a float conv), so precsearch owns it.  The integer form is::

    acc   = conv2d(x_u8, w_s8, out_dtype="int32")          # exact
    acc   = acc + (b_q - zx·S)                             # bias and input zero point
    y_u8  = clip(round(acc · sx·sw[c] / sy) + zy, 0, 255)  # requantize, float64 by default

where ``S[c, y, x]`` is the sum of the weights of channel ``c`` that touch real
(unpadded) input at output position ``(y, x)``.  conv2d pads with a literal 0
while a quantized input means "pad with zx"; folding ``zx·S`` into a constant
keeps the conv an ordinary conv2d whose layout ConvertLayout can change (an
explicit ``nn.pad(pad_value=zx)`` would pin the tensor to NCHW because pad has
no layout inference in TVM 0.27).  Requantization is written with elementwise
ops that do have layout inference, so a whole int8 chain stays blocked.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax import expr_functor
from tvm.relax.dpl import is_op, is_var, wildcard

from precsearch.errors import CompileError
from ._build_report import BuildReport
from ._importer import ImportedModel, emit_like
from ._naming import binding_name, layer_of_weight
from ._requant import (Int8Quantization, bias_scale_matches, channel_scales, integer_bias, requantization,
                       valid_weight_sums)
from ._trace import tvm_error_line

__all__ = ["Int8ConvRewrite", "valid_weight_sums"]

PASS_NAME = "precsearch.Int8ConvRewrite"


def _scalar(params: dict[str, np.ndarray], expr, what: str, layer_id: str) -> np.ndarray:
    if isinstance(expr, tvm.ir.expr.Constant):
        return expr.value.numpy()
    name = getattr(expr, "name", None)
    if name is None or name not in params:
        raise CompileError(f"{what} is not a model constant ({expr!s:.80})", pass_name=PASS_NAME, layer_id=layer_id)
    return np.asarray(params[name])


@tvm.transform.module_pass(opt_level=0, name=PASS_NAME)
class Int8ConvRewrite:
    """Rewrite every quantized conv of ``main`` into an integer conv with requantization.

    Parameters
    ----------
    imported : ImportedModel
        Gives the values of the scale / zero-point / weight parameters, which the
        integer form bakes into constants.
    layer_ids : sequence of str
        Layer id by index, for error messages and names.
    requant_dtype : {"float64", "float32"}
    report : BuildReport, optional
        Gets ``rewritten_int8``, the layers rewritten.
    """

    def __init__(self, imported: ImportedModel, layer_ids, requant_dtype: str = "float64",
                 report: BuildReport | None = None):
        self.imported = imported
        self.requant_dtype = requant_dtype
        self.layer_ids = tuple(layer_ids)
        self.report = report if report is not None else BuildReport()
        self.x_q, self.x_scale, self.x_zero = wildcard(), wildcard(), wildcard()
        self.w_q, self.w_scale, self.w_zero = is_var(), wildcard(), wildcard()
        self.b_q, self.b_scale, self.b_zero = wildcard(), wildcard(), wildcard()
        self.y_scale, self.y_zero = wildcard(), wildcard()
        self.conv = is_op("relax.nn.conv2d")(
            is_op("relax.dequantize")(self.x_q, self.x_scale, self.x_zero),
            is_op("relax.dequantize")(self.w_q, self.w_scale, self.w_zero),
        )
        bias = is_op("relax.reshape")(is_op("relax.dequantize")(self.b_q, self.b_scale, self.b_zero), wildcard())
        self.biased = is_op("relax.add")(self.conv, bias)
        self.quantized = is_op("relax.quantize")(self.biased | self.conv, self.y_scale, self.y_zero)
        # A quantized conv whose output is not re-quantized (a graph output, say).
        self.float_out = self.biased | self.conv

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with self.report.recording_failure():
            var2val = relax.analysis.get_var2val(mod["main"])
            mutator = _Rewriter(self, var2val, mod)
            mod["main"] = mutator.visit_expr(mod["main"])
            mod = relax.transform.DeadCodeElimination()(mod)
            self.report.rewritten_int8 = [self.layer_ids[index] for index in sorted(mutator.rewritten)]
            _check_nothing_left(self, mod)
            return mod

    # The integer chain, emitted through the mutator's builder so bindings get
    # names that carry the layer index (TVM error messages print var names).
    def emit_integer_conv(self, mutator, matched: dict, quantize_out: bool):
        index = layer_of_weight(matched[self.w_q].name)
        try:
            return self._emit_integer_conv(mutator, matched, quantize_out)
        except CompileError:
            raise
        except Exception as exc:  # a shape or broadcast error while emitting: name the layer
            layer_id = self.layer_ids[index] if index is not None else None
            raise CompileError(tvm_error_line(exc), pass_name=PASS_NAME, layer_id=layer_id) from exc

    def _emit_integer_conv(self, mutator, matched: dict, quantize_out: bool):
        params = self.imported.params
        conv = matched[self.conv]
        weight_var = matched[self.w_q]
        index = layer_of_weight(weight_var.name)
        if index is None:
            return None
        layer_id = self.layer_ids[index]
        attrs = conv.attrs
        if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW":
            raise CompileError(f"expected an NCHW/OIHW conv before layout conversion, got "
                               f"{attrs.data_layout}/{attrs.kernel_layout}", pass_name=PASS_NAME, layer_id=layer_id)
        x_q = mutator.visit_expr(mutator.as_var(matched[self.x_q]))
        if x_q.ty.dtype != "uint8":
            raise CompileError(f"activations must be uint8, got {x_q.ty.dtype}", pass_name=PASS_NAME,
                               layer_id=layer_id)
        weight = params[weight_var.name]
        if weight.dtype != np.int8:
            raise CompileError(f"weights must be int8, got {weight.dtype}", pass_name=PASS_NAME, layer_id=layer_id)
        x_scale = float(_scalar(params, matched[self.x_scale], "input scale", layer_id).reshape(-1)[0])
        x_zero = int(_scalar(params, matched[self.x_zero], "input zero point", layer_id).reshape(-1)[0])
        w_scale = _scalar(params, matched[self.w_scale], "weight scale", layer_id).astype(np.float64).reshape(-1)
        w_zero = _scalar(params, matched[self.w_zero], "weight zero point", layer_id).reshape(-1)
        if np.any(w_zero != 0):
            raise CompileError("weights must be symmetric (zero point 0)", pass_name=PASS_NAME, layer_id=layer_id)
        out_channels = weight.shape[0]
        w_scale = channel_scales(w_scale, out_channels)

        in_shape = [int(d) for d in x_q.ty.shape]
        out_shape = [int(d) for d in conv.ty.shape]
        acc = mutator.builder_.emit(
            relax.op.nn.conv2d(x_q, mutator.visit_expr(weight_var), strides=attrs.strides, padding=attrs.padding,
                               dilation=attrs.dilation, groups=attrs.groups, out_dtype="int32"),
            binding_name(index, "acc"))

        b_q = None
        if self.b_q in matched:
            b_q = _scalar(params, matched[self.b_q], "bias", layer_id).reshape(-1)
            b_scale = _scalar(params, matched[self.b_scale], "bias scale", layer_id)
            if not bias_scale_matches(b_scale, x_scale, w_scale):
                raise CompileError("bias scale is not input scale × weight scale", pass_name=PASS_NAME,
                                   layer_id=layer_id)
        sums = None
        if x_zero != 0:
            sums = valid_weight_sums(weight, in_shape[2:], out_shape[2:], attrs.strides, attrs.padding,
                                     attrs.dilation, int(attrs.groups))
        bias_int = integer_bias(out_channels, b_q, x_zero, sums)
        acc = mutator.builder_.emit(relax.op.add(acc, relax.const(bias_int)), binding_name(index, "acc_bias"))
        mutator.rewritten.add(index)
        if not quantize_out:
            self.report.int8_quantization[index] = Int8Quantization(x_scale, x_zero, w_scale, b_q, None)
            scales = requantization(x_scale, w_scale, out_channels)
            acc_f = mutator.builder_.emit(relax.op.astype(acc, "float32"), binding_name(index, "acc_f32"))
            return relax.op.multiply(acc_f, relax.const(scales.accumulator_scale.reshape(1, -1, 1, 1)
                                                        .astype(np.float32)))
        y_scale = _scalar(params, matched[self.y_scale], "output scale", layer_id)
        y_zero_arr = _scalar(params, matched[self.y_zero], "output zero point", layer_id)
        if y_zero_arr.dtype != np.uint8:
            raise CompileError(f"output must be quantized to uint8, got {y_zero_arr.dtype}", pass_name=PASS_NAME,
                               layer_id=layer_id)
        # float64 (the default): acc·M is then exact to ~1e-16, so rounding is the
        # exact rounding of the real value.  In float32 a product like -18.5000011
        # comes out as -18.4999990 and rounds the wrong way (seen on the real
        # MobileNetV3); float32 is offered because untuned it ran 2.3x faster.
        self.report.int8_quantization[index] = Int8Quantization(
            x_scale, x_zero, w_scale, b_q, float(np.asarray(y_scale, dtype=np.float64).reshape(-1)[0]),
            int(y_zero_arr.reshape(-1)[0]))
        dtype = self.requant_dtype
        scales = requantization(x_scale, w_scale, out_channels, y_scale, y_zero_arr, dtype=dtype)
        acc_f = mutator.builder_.emit(relax.op.astype(acc, dtype), binding_name(index, f"acc_{dtype}"))
        multiplier = scales.multiplier.reshape(1, -1, 1, 1)
        scaled = mutator.builder_.emit(relax.op.round(relax.op.multiply(acc_f, relax.const(multiplier, dtype))),
                                       binding_name(index, "scaled"))
        shifted = relax.op.add(scaled, relax.const(float(scales.output_zero_point), dtype))
        clipped = relax.op.minimum(relax.op.maximum(shifted, relax.const(0.0, dtype)), relax.const(255.0, dtype))
        return relax.op.astype(clipped, "uint8")


@expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, rewrite: Int8ConvRewrite, var2val, mod=None):
        super().__init__(mod)
        self.rewrite = rewrite
        self.var2val = var2val
        self.rewritten: set[int] = set()
        # The matcher may hand back a binding's value instead of its var (it jumps
        # through var2val); re-emitting that value would duplicate the producer and
        # keep the float conv it reads alive.
        self._var_of = {value.__chandle__(): var for var, value in var2val.items()}

    def as_var(self, expr):
        """The var bound to ``expr`` when ``expr`` is a bound value, else ``expr``."""
        return self._var_of.get(expr.__chandle__(), expr)

    def visit_var_binding_(self, binding):
        # Called from C++ (the mutator's traversal): keep the error before TVM turns it into text.
        with self.rewrite.report.recording_failure():
            self._visit_binding(binding)

    def _visit_binding(self, binding):
        value = binding.value
        replacement = None
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
            if value.op.name == "relax.quantize":
                matched = self.rewrite.quantized.extract_matched_expr(value, self.var2val)
                if matched is not None:
                    replacement = self.rewrite.emit_integer_conv(self, matched, quantize_out=True)
            elif value.op.name in ("relax.add", "relax.nn.conv2d") and not self._feeds_quantize(binding.var):
                matched = self.rewrite.float_out.extract_matched_expr(value, self.var2val)
                if matched is not None and self.rewrite.conv in matched:
                    replacement = self.rewrite.emit_integer_conv(self, matched, quantize_out=False)
        if replacement is None:
            super().visit_var_binding_(binding)
            return
        new_var = emit_like(self.builder_, binding.var, replacement)
        self.set_var_remap(binding.var, new_var)

    def _feeds_quantize(self, var) -> bool:
        # A conv/add that ends in quantize is rewritten at the quantize; only a
        # chain that ends unquantized is rewritten at its own binding.
        users = self._users().get(var, [])
        if not users:
            return False
        for user in users:
            value = self.var2val.get(user)
            if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)):
                return False
            if value.op.name == "relax.quantize":
                continue
            if value.op.name == "relax.add" and self._feeds_quantize(user):
                continue
            return False
        return True

    def _users(self):
        if not hasattr(self, "_user_map"):
            users: dict = {}
            for var, value in self.var2val.items():
                if isinstance(value, relax.Call):
                    for arg in value.args:
                        if isinstance(arg, relax.Var):
                            users.setdefault(arg, []).append(var)
            self._user_map = users
        return self._user_map


def _check_nothing_left(rewrite: Int8ConvRewrite, mod: tvm.IRModule) -> None:
    """Raise if a quantized conv survived: a silent float fallback is the worst outcome."""
    var2val = relax.analysis.get_var2val(mod["main"])
    for binding in _bindings(mod["main"]):
        value = binding.value
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.nn.conv2d":
            weight = value.args[1]
            source = var2val.get(weight, weight)
            if isinstance(source, relax.Call) and getattr(source.op, "name", "") == "relax.dequantize":
                name = getattr(source.args[0], "name", "?")
                index = layer_of_weight(name)
                layer_id = rewrite.layer_ids[index] if index is not None else name
                raise CompileError("quantized conv was not rewritten to an integer conv (its inputs or output do "
                                   "not follow the QDQ pattern)", pass_name=PASS_NAME, layer_id=layer_id)


def _bindings(func):
    for block in func.body.blocks:
        yield from block.bindings
