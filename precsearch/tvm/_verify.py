"""Checks that the built graph is the plan, and the per-layer layout table.

Both read the graph rather than trusting the passes that made it: the table is
taken from the IR after ConvertLayout, and the verifier runs after legalization
and constant folding, reading each conv kernel's layer attribute *and* its weight
constant.  Both write what they find into the build's :class:`BuildReport`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from precsearch.errors import CompileError, VerificationError
from precsearch.model.bf16 import round_to_bf16
from . import _onednn
from ._nhwc import NCHW_TO_NHWC, map_permutation
from ._build_report import BuildReport, LayerRow, ReportingPass
from ._importer import ImportedModel
from ._layout import unpack_kernel
from ._naming import conv_kernel_parts, layer_of_func, layer_of_weight

__all__ = ["InspectLayout", "LayerRow", "OperatorLayouts", "VerifyPlan"]

# Ops a tensor may pass through between a conv and the layout transform that
# leaves it, for the table's "transforms out" column.
_ELEMENTWISE = {
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.astype", "relax.round",
    "relax.maximum", "relax.minimum", "relax.nn.relu", "relax.sigmoid", "relax.clip", "relax.tanh",
}


def _layout_name(ndim: int, block: int | None) -> str:
    return "NCHW" if ndim == 4 else f"NCHW{block}c"


def _transform_text(call: relax.Call) -> str:
    src = call.args[0].ty
    dst = call.ty
    if src.ndim == dst.ndim == 4:  # between the plain layouts of an NHWC build (see _nhwc)
        return "NCHW→NHWC" if map_permutation(call.attrs.index_map) == NCHW_TO_NHWC else "NHWC→NCHW"
    src_block = int(src.shape[-1]) if src.ndim == 5 else None
    dst_block = int(dst.shape[-1]) if dst.ndim == 5 else None
    return f"{_layout_name(src.ndim, src_block)}→{_layout_name(dst.ndim, dst_block)}"


def _calls(func):
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding.value, relax.Call):
                yield binding.var, binding.value


@dataclass
class OperatorLayouts:
    """How the non-conv operators of the graph ran: per Relax op, how many blocked and how many fell back.

    An op *fell back* when ConvertLayout had no blocked rule for it and wrapped it
    in layout transforms back to NCHW while a neighbour was blocked.
    """

    blocked: dict[str, int] = field(default_factory=dict)
    fell_back: dict[str, int] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        ops = sorted(set(self.blocked) | set(self.fell_back))
        return [{"op": op, "blocked": self.blocked.get(op, 0), "nchw_fallback": self.fell_back.get(op, 0)}
                for op in ops]


def _activation_layouts(func) -> dict:
    """Each binding's layout, "NCHW" or the convs' (NCHW<b>c, NHWC), followed forward from the inputs.

    A 4-D tensor of an NHWC build is NHWC or NCHW by where it came from, not by its shape.
    """
    layouts: dict = {}
    for var, call in _calls(func):
        op_name = getattr(call.op, "name", "")
        if op_name == "relax.layout_transform":
            if call.ty.ndim == 5:
                layouts[var] = "blocked"
            elif call.ty.ndim == 4 and map_permutation(call.attrs.index_map) == NCHW_TO_NHWC:
                layouts[var] = "NHWC"
            else:
                layouts[var] = "NCHW"
        elif op_name == "relax.nn.conv2d":
            layouts[var] = str(call.attrs.out_layout)
        else:
            known = [layouts[arg] for arg in _tensor_args(call) if isinstance(arg, relax.Var) and arg in layouts]
            layouts[var] = next((layout for layout in known if layout != "NCHW"), "NCHW")
    return layouts


def _operator_layouts(func, var2val) -> OperatorLayouts:
    result = OperatorLayouts()
    layouts = _activation_layouts(func)
    for var, call in _calls(func):
        op_name = getattr(call.op, "name", "")
        if not op_name or op_name in ("relax.layout_transform", "relax.nn.conv2d") or not hasattr(var.ty, "ndim"):
            continue
        short = op_name.removeprefix("relax.")
        if layouts.get(var, "NCHW") != "NCHW":
            result.blocked[short] = result.blocked.get(short, 0) + 1
            continue
        for arg in _tensor_args(call):
            bound = var2val.get(arg) if isinstance(arg, relax.Var) else None
            if (isinstance(bound, relax.Call) and getattr(bound.op, "name", "") == "relax.layout_transform"
                    and layouts.get(bound.args[0], "NCHW") != "NCHW" and not _is_constant_path(arg, var2val)):
                result.fell_back[short] = result.fell_back.get(short, 0) + 1
                break
    return result


def _tensor_args(call):
    for arg in call.args:
        if isinstance(arg, relax.Tuple):
            yield from arg.fields
        else:
            yield arg


@tvm.transform.module_pass(opt_level=0, name="precsearch.InspectLayout")
class InspectLayout(ReportingPass):
    """Record, per conv, its dtype, layout and the activation layout transforms around it.

    Changes nothing; writes ``rows``, ``boundary_transforms`` and
    ``operator_layouts`` of ``report``.
    """

    def __init__(self, layer_ids, decisions, report: BuildReport | None = None):
        super().__init__(report)
        self.layer_ids = tuple(layer_ids)
        self.decisions = decisions

    def run(self, mod: tvm.IRModule) -> tvm.IRModule:
        func = mod["main"]
        var2val = relax.analysis.get_var2val(func)
        users: dict = {}
        for var, call in _calls(func):
            for arg in call.args:
                if isinstance(arg, relax.Var):
                    users.setdefault(arg, []).append((var, call))
        rows = []
        boundary = 0
        for var, call in _calls(func):
            op_name = getattr(call.op, "name", "")
            if op_name == "relax.layout_transform" and not _is_constant_path(call.args[0], var2val):
                boundary += 1
            if op_name != "relax.nn.conv2d":
                continue
            weight = call.args[1]
            source = var2val.get(weight, weight) if isinstance(weight, relax.Var) else weight
            if isinstance(source, relax.Call) and getattr(source.op, "name", "") == "relax.layout_transform":
                source = source.args[0]
            index = layer_of_weight(getattr(source, "name", ""))
            if index is None:
                continue
            data = call.args[0]
            transforms_in = []
            bound = var2val.get(data) if isinstance(data, relax.Var) else None
            if isinstance(bound, relax.Call) and getattr(bound.op, "name", "") == "relax.layout_transform":
                transforms_in.append(_transform_text(bound))
            rows.append(LayerRow(
                index=index, id=self.layer_ids[index],
                dtype="int8" if str(data.ty.dtype) == "uint8" else str(data.ty.dtype),
                layout=str(call.attrs.data_layout), transforms_in=transforms_in,
                transforms_out=_transforms_after(var, users), note=self.decisions[index].reason))
            planned = self.decisions[index].data_layout
            if rows[-1].layout != planned:
                # ConvertLayout silently keeps a layout it cannot apply.
                raise CompileError(f"ConvertLayout left the conv in {rows[-1].layout}, planned {planned}",
                                   pass_name="precsearch.InspectLayout", layer_id=self.layer_ids[index])
        self.report.rows = sorted(rows, key=lambda row: row.index)
        self.report.boundary_transforms = boundary
        self.report.operator_layouts = _operator_layouts(func, var2val).rows()
        return mod


def _is_constant_path(expr, var2val) -> bool:
    for _ in range(8):
        if isinstance(expr, tvm.ir.expr.Constant):
            return True
        if isinstance(expr, relax.Var):
            if expr not in var2val:  # a parameter: a conv weight (ps_w<i>) or a model input, which is not constant
                return layer_of_weight(expr.name) is not None
            expr = var2val[expr]
            # a float conv's bias reaches it as layout_transform(reshape(constant)): a constant, not an activation
            if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") in ("relax.layout_transform",
                                                                                  "relax.reshape"):
                expr = expr.args[0]
                continue
        return False
    return False


def _transforms_after(var, users) -> list[str]:
    found: list[str] = []
    frontier = [var]
    seen = set()
    while frontier:
        current = frontier.pop()
        for user_var, call in users.get(current, []):
            if user_var in seen:
                continue
            seen.add(user_var)
            op_name = getattr(call.op, "name", "")
            if op_name == "relax.layout_transform":
                found.append(_transform_text(call))
            elif op_name in _ELEMENTWISE:
                frontier.append(user_var)
    return sorted(set(found))


@tvm.transform.module_pass(opt_level=0, name="precsearch.VerifyPlan")
class VerifyPlan(ReportingPass):
    """Raise unless the graph holds exactly the plan's int8 convs, each with its own weights.

    Runs after legalization and FoldConstant: each conv kernel is a call_tir to a
    prim func carrying its layer index (``precsearch.layer``), whose data dtype
    says its precision and whose weight argument is a constant.  The constant is
    unpacked and compared with the weights the QDQ model holds for that layer, so
    identity is checked, not assumed.  Writes ``kernel_weights`` of ``report``.
    """

    def __init__(self, imported: ImportedModel, layer_ids, int8_indices, float_indices,
                 report: BuildReport | None = None, bf16_indices=()):
        super().__init__(report)
        self.imported = imported
        self.layer_ids = tuple(layer_ids)
        self.int8_indices = set(int8_indices)
        self.bf16_indices = set(bf16_indices)  # float layers that must run bf16
        self.float_indices = set(float_indices) - self.bf16_indices

    def run(self, mod: tvm.IRModule) -> tvm.IRModule:
        func = mod["main"]
        var2val = relax.analysis.get_var2val(func)
        seen: dict[int, str] = {}
        for _var, call in _calls(func):
            op_name = getattr(call.op, "name", "")
            if op_name == "relax.nn.conv2d":
                raise VerificationError("a conv2d was not legalized", pass_name="precsearch.VerifyPlan")
            if op_name == "relax.call_dps_packed" and str(call.args[0].global_symbol) in _onednn.CONV_FUNCTIONS:
                index = self._check_onednn(call, var2val, seen)
                continue
            if op_name != "relax.call_tir":
                continue
            index = layer_of_func(mod[call.args[0]])
            if index is None:
                continue
            args = call.args[1].fields
            # uint8 activations make an int8 conv, as they did for the legalizer; the other dtypes are checked below.
            precision = "int8" if str(args[0].ty.dtype) == "uint8" else "float"
            # the legalizer names the kernel after its layout (a 4-D tensor is NCHW or NHWC)
            parts = conv_kernel_parts(call.args[0].name_hint)
            layout = parts[2] if parts else _layout_name(args[0].ty.ndim, int(args[0].ty.shape[-1]))
            layer_id = self.layer_ids[index]
            if index in seen:
                raise VerificationError("layer appears twice in the built graph", pass_name="precsearch.VerifyPlan",
                                        layer_id=layer_id)
            seen[index] = precision
            self._check_dtypes(args, call, precision, layer_id)
            built = unpack_kernel(self._weight_constant(args[1], var2val, layer_id), layout)
            reference = (self.imported.int8_weights if precision == "int8" else self.imported.float_weights).get(index)
            if reference is None:
                raise VerificationError(f"built {precision} but the QDQ model has no {precision} weights for it",
                                        pass_name="precsearch.VerifyPlan", layer_id=layer_id)
            if built.shape != reference.shape or not np.array_equal(built, reference):
                raise VerificationError(f"the {precision} kernel built for this layer does not hold its weights",
                                        pass_name="precsearch.VerifyPlan", layer_id=layer_id)
            self.report.kernel_weights[layer_id] = built
        built_as = {label: {i for i, p in seen.items() if p == label} for label in ("int8", "bf16", "float")}
        problems = []
        for label, wanted in (("int8", self.int8_indices), ("bf16", self.bf16_indices), ("float", self.float_indices)):
            got = built_as[label]
            missing = sorted(wanted - got)
            extra = sorted(got - wanted)
            if missing:
                problems.append(f"{label} layers missing: {[self.layer_ids[i] for i in missing]}")
            if extra:
                problems.append(f"unplanned {label} layers: {[self.layer_ids[i] for i in extra]}")
        if problems:
            first = (sorted((self.int8_indices ^ built_as["int8"]) | (self.bf16_indices ^ built_as["bf16"])
                            | (self.float_indices ^ built_as["float"])) or [None])[0]
            raise VerificationError("built graph does not match the plan: " + "; ".join(problems),
                                    pass_name="precsearch.VerifyPlan",
                                    layer_id=self.layer_ids[first] if first is not None else None)
        return mod

    def _check_onednn(self, call, var2val, seen: dict[int, str]) -> int:
        """A oneDNN conv: its config names the layer and its precision; its packed weights must be the layer's own.

        Float weights are unpacked through oneDNN's inverse reorder (bf16 ones must equal the layer's weights
        rounded to bf16); int8 ones carry oneDNN's zero-point compensation, which has no inverse, so the layer's
        int8 weights are packed again and compared byte for byte.
        """
        data, packed, _bias, config, post, *_residual = call.args[1].fields
        values = [self._weight_constant(arg, var2val, None) for arg in (packed, config, post)]
        spec = _onednn.spec_from_config(values[1], values[2])
        layer_id = self.layer_ids[spec.layer]
        if spec.layer in seen:
            raise VerificationError("layer appears twice in the built graph", pass_name="precsearch.VerifyPlan",
                                    layer_id=layer_id)
        precision = "int8" if spec.is_int8 else "bf16" if spec.dtype == "bfloat16" else "float"
        seen[spec.layer] = precision
        expected = "uint8" if spec.is_int8 else "bfloat16" if spec.bf16_src else "float32"
        if str(data.ty.dtype) != expected:
            raise VerificationError(f"oneDNN {precision} conv got {data.ty.dtype} data, expected {expected}",
                                    pass_name="precsearch.VerifyPlan", layer_id=layer_id)
        if spec.is_int8:
            reference = self.imported.int8_weights.get(spec.layer)
            holds = reference is not None and np.array_equal(_onednn.pack_weights(spec, reference), values[0])
            built = reference
        else:
            built = _onednn.unpack_weights(spec, values[0])
            reference = self.imported.float_weights.get(spec.layer)
            if reference is not None and precision == "bf16":
                reference = round_to_bf16(reference)
            holds = reference is not None and built.shape == reference.shape and np.array_equal(built, reference)
        if not holds:
            raise VerificationError(f"the oneDNN {precision} kernel built for this layer does not hold its weights",
                                    pass_name="precsearch.VerifyPlan", layer_id=layer_id)
        self.report.kernel_weights[layer_id] = built
        return spec.layer

    @staticmethod
    def _weight_constant(weight, var2val, layer_id) -> np.ndarray:
        constant = weight
        for _ in range(4):
            if isinstance(constant, relax.Var) and constant in var2val:
                constant = var2val[constant]
        if not isinstance(constant, tvm.ir.expr.Constant):
            raise VerificationError("conv weight was not folded to a constant at build time",
                                    pass_name="precsearch.VerifyPlan", layer_id=layer_id)
        return constant.value.numpy()

    def _check_dtypes(self, args, call, precision, layer_id) -> None:
        data_dtype = str(args[0].ty.dtype)
        weight_dtype = str(args[1].ty.dtype)
        out_dtype = str(call.ty.dtype)
        expected = ("uint8", "int8", "int32") if precision == "int8" else ("float32", "float32", "float32")
        if (data_dtype, weight_dtype, out_dtype) != expected:
            raise VerificationError(f"{precision} conv has dtypes data={data_dtype} weight={weight_dtype} "
                                    f"out={out_dtype}, expected {expected}", pass_name="precsearch.VerifyPlan",
                                    layer_id=layer_id)
