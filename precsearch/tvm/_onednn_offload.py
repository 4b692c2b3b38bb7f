"""The pass that hands convs to oneDNN: ``conv2d [+ bias] [+ activation]`` → one packed call.

It runs after ConvertLayout, so each conv already sits in its planned layout
(NCHW, NHWC or NCHW<b>c, which are oneDNN's nchw / nhwc / nChw<b>c: no transform is added).
For a float conv the bias add and a following relu / clip / swish / hard-swish
become oneDNN post-ops of the same primitive.  For an int8 conv the whole integer
chain Int8ConvRewrite emitted (int32 conv, integer bias, requantization to u8, or
the dequantizing multiply) becomes one u8 × s8 primitive with the layer's scales
and zero points, which rounds half to even in float32 as MLAS does.  A plan's
bf16 convs are float convs whose primitive reads its input and weights rounded
to bf16 (the variant timed fastest at build time).  The weights
are packed into oneDNN's own format here, at build time, and bound as a constant,
so a call does no reorder of them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant

from precsearch.errors import CompileError
from . import _onednn
from ._build_report import ReportingPass
from ._importer import emit_like
from ._layout import NHWC, LayerLayout
from ._naming import layer_of_weight, WEIGHT_PREFIX
from ._requant import Int8Quantization

PASS_NAME = "precsearch.OffloadOneDNN"


# ConvSpec's src_block / dst_block code for NHWC (0 is NCHW, 8 / 16 NCHW<b>c).
NHWC_BLOCK = -1


def _block(layout: str) -> int | None:
    if layout == "NCHW":
        return 0
    if layout == NHWC:
        return NHWC_BLOCK
    if layout.startswith("NCHW") and layout.endswith("c"):
        return int(layout[4:-1])
    return None


def _nchw_shape(shape, layout: str) -> list[int]:
    """A conv tensor's (N, C, H, W) in the given layout (NCHW, NHWC or NCHW<b>c)."""
    dims = [int(d) for d in shape]
    if layout == NHWC:
        return [dims[0], dims[3], dims[1], dims[2]]
    if len(dims) == 5:
        return [dims[0], dims[1] * dims[4], dims[2], dims[3]]
    return dims


def _op(expr) -> str:
    return getattr(getattr(expr, "op", None), "name", "") if isinstance(expr, tvm.ir.expr.Call) else ""


def _scalar(expr) -> float | None:
    if isinstance(expr, Constant) and expr.value.numpy().size == 1:
        return float(expr.value.numpy().reshape(-1)[0])
    value = getattr(expr, "value", None)  # a PrimValue (clip bounds)
    if value is not None and hasattr(value, "value"):
        return float(value.value)
    return None


class _Graph:
    """Bindings and users of ``main``'s dataflow block(s)."""

    def __init__(self, func: relax.Function):
        self.value = relax.analysis.get_var2val(func)
        self.users: dict = {}
        for block in func.body.blocks:
            if isinstance(block, relax.DataflowBlock):
                for var, users in relax.analysis.udchain(block).items():
                    self.users[var] = list(users)
        self.outputs = set()
        self.order = []  # every binding's var, in binding order
        for block in func.body.blocks:
            for binding in block.bindings:
                self.order.append(binding.var)
                if not isinstance(binding.var, relax.DataflowVar):
                    self.outputs.add(binding.var)

    def only_user(self, var):
        """The single binding that uses ``var``, or None (several users, or ``var`` leaves the block)."""
        users = self.users.get(var, [])
        if len(users) != 1 or var in self.outputs:
            return None
        return users[0]

    def trace(self, expr, params: dict):
        """A constant's value through reshape / layout_transform / expand_dims, or None."""
        for _ in range(8):
            if isinstance(expr, Constant):
                return expr.value.numpy()
            if isinstance(expr, relax.Var):
                if expr.name in params and not isinstance(expr, relax.DataflowVar):
                    return np.asarray(params[expr.name])
                if expr not in self.value:
                    return None
                expr = self.value[expr]
            elif _op(expr) in ("relax.reshape", "relax.layout_transform", "relax.expand_dims"):
                expr = expr.args[0]
            else:
                return None
        return None

    def weight_name(self, expr) -> str | None:
        for _ in range(8):
            if isinstance(expr, relax.Var):
                if expr.name.startswith(WEIGHT_PREFIX) and layer_of_weight(expr.name) is not None:
                    return expr.name
                if expr not in self.value:
                    return None
                expr = self.value[expr]
            elif _op(expr) == "relax.layout_transform":
                expr = expr.args[0]
            else:
                return None
        return None


class _Fusion:
    """One conv and what it absorbs: the binding it ends at, bias, post-op (int8: its quantization)."""

    def __init__(self, conv_var, conv, index: int):
        self.conv_var, self.conv, self.index = conv_var, conv, index
        self.end = conv_var
        self.bias = None
        self.post_op, self.alpha, self.beta = "none", 0.0, 0.0
        self.weight_name = ""
        self.quantization: Int8Quantization | None = None
        # int8 conv → Q → DQ → activation → (Q): the activated value's quantization, and whether there is one
        self.activated_scale: float | None = None
        self.activated_zero: int = 0
        self.activated_float = False
        # a float32 tensor added after the activation (a residual connection), absorbed as a binary post-op
        self.residual = None


# Int8ConvRewrite's chain after the int32 conv: integer bias, to float, × scale, then (requantized)
# round, + zero point, clamp to [0, 255], to u8.  A float output ends at the multiply.
_DEQUANTIZED_CHAIN = ("relax.add", "relax.astype", "relax.multiply")
_REQUANTIZED_CHAIN = _DEQUANTIZED_CHAIN + ("relax.round", "relax.add", "relax.maximum", "relax.minimum",
                                           "relax.astype")


def _absorb_int8_chain(graph: _Graph, fusion: _Fusion) -> str:
    """Move ``fusion.end`` to the end of the integer chain; empty, or why the chain is not the expected one."""
    expected = _DEQUANTIZED_CHAIN if fusion.quantization.dst_scale is None else _REQUANTIZED_CHAIN
    var = fusion.conv_var
    for op in expected:
        user = graph.only_user(var)
        if user is None or _op(graph.value[user]) != op:
            return f"its requantization is not the chain Int8ConvRewrite emits (expected {op} after {var.name_hint})"
        var = user
    if fusion.quantization.dst_scale is not None and str(var.ty.dtype) != "uint8":
        return f"its requantized output is {var.ty.dtype}, not uint8"
    fusion.end = var
    return ""


# LowerQDQ's DequantizeLinear (u8 → float32, − zero point, × scale) and QuantizeLinear (÷ scale, round, + zero
# point, clamp, → u8), each a chain of single-user bindings with scalar constants.
_DEQUANTIZE = ("relax.astype", "relax.subtract", "relax.multiply")
_QUANTIZE = ("relax.divide", "relax.round", "relax.add", "relax.maximum", "relax.minimum", "relax.astype")


def _follow(graph: _Graph, var, ops) -> list | None:
    """The bindings of ``ops`` after ``var``, each the only user of the one before; None when the chain differs."""
    chain = []
    for op in ops:
        user = graph.only_user(var)
        if user is None or _op(graph.value[user]) != op:
            return None
        chain.append(user)
        var = user
    return chain


def _constant_arg(graph: _Graph, var) -> float | None:
    values = [_scalar(arg) for arg in graph.value[var].args[1:]]
    return values[0] if values and values[0] is not None else None


def _absorb_int8_activation(graph: _Graph, fusion: _Fusion) -> None:
    """Extend a requantized int8 conv over the dequantize → activation (→ quantize) that follows it.

    Why: on a YOLO-style model every conv is followed by SiLU, which the QDQ model runs in float between a
    DequantizeLinear and the next QuantizeLinear; as TIR that is one more pass over the tensor per conv, with a
    sigmoid per element.  oneDNN runs the same arithmetic as post-ops of the conv (see ConvSpec.mid_zero).
    """
    q = fusion.quantization
    dequantize = _follow(graph, fusion.end, _DEQUANTIZE)
    if dequantize is None:
        return
    zero, scale = _constant_arg(graph, dequantize[1]), _constant_arg(graph, dequantize[2])
    if str(dequantize[0].ty.dtype) != "float32" or zero != q.dst_zero or scale is None \
            or np.float32(scale) != np.float32(q.dst_scale):
        return
    conv_end = fusion.end
    fusion.end = dequantize[-1]
    _absorb_activation(graph, fusion)
    if fusion.post_op == "none":  # a bare dequantize gains nothing: keep the u8 output
        fusion.end = conv_end
        return
    quantize = _follow(graph, fusion.end, _QUANTIZE)
    if quantize is not None:
        scale, zero = _constant_arg(graph, quantize[0]), _constant_arg(graph, quantize[2])
        low, high = _constant_arg(graph, quantize[3]), _constant_arg(graph, quantize[4])
        if scale is None or zero is None or (low, high) != (0.0, 255.0) or str(quantize[-1].ty.dtype) != "uint8" \
                or zero != int(zero):
            quantize = None
    if quantize is None:
        fusion.activated_float = True
        return
    fusion.activated_scale, fusion.activated_zero = scale, int(zero)
    fusion.end = quantize[-1]


def _absorb_bias(graph: _Graph, fusion: _Fusion, params, channels: int) -> None:
    user = graph.only_user(fusion.end)
    if user is None or _op(graph.value[user]) != "relax.add":
        return
    lhs, rhs = graph.value[user].args
    other = rhs if lhs.same_as(fusion.end) else lhs
    bias = graph.trace(other, params)
    if bias is None or bias.size != channels or bias.dtype != np.float32:
        return
    fusion.bias = bias.reshape(-1)
    fusion.end = user


def _absorb_activation(graph: _Graph, fusion: _Fusion) -> None:
    x = fusion.end
    users = graph.users.get(x, [])
    if x in graph.outputs or not users:
        return
    if len(users) == 1:
        value = graph.value[users[0]]
        if _op(value) == "relax.nn.relu":
            fusion.post_op, fusion.end = "relu", users[0]
        elif _op(value) == "relax.clip":
            low, high = _scalar(value.args[1]), _scalar(value.args[2])
            if low is not None and high is not None:
                fusion.post_op, fusion.alpha, fusion.beta, fusion.end = "clip", low, high, users[0]
        elif _op(value) in ("relax.maximum", "relax.minimum"):
            _absorb_min_max_clip(graph, fusion, users[0])
        return
    if len(users) != 2:
        return
    ops = [_op(graph.value[u]) for u in users]
    # swish: s = sigmoid(x); y = x * s
    if sorted(ops) == ["relax.multiply", "relax.sigmoid"]:
        sig, mul = (users if ops[0] == "relax.sigmoid" else users[::-1])
        if graph.only_user(sig) is not None and graph.only_user(sig).same_as(mul):
            fusion.post_op, fusion.end = "swish", mul
        return
    # hard-swish as ONNX's HardSwish imports: y = x * min(max(x * 1/6 + 0.5, 0), 1)
    if sorted(ops) != ["relax.multiply", "relax.multiply"]:
        return
    for scale, result in (users, users[::-1]):
        chain = [scale]
        while len(chain) < 4 and graph.only_user(chain[-1]) is not None:
            chain.append(graph.only_user(chain[-1]))
        if len(chain) != 4 or graph.only_user(chain[-1]) is None or not graph.only_user(chain[-1]).same_as(result):
            continue
        kinds = [_op(graph.value[v]) for v in chain]
        consts = [next((_scalar(a) for a in graph.value[v].args if _scalar(a) is not None), None) for v in chain]
        if kinds == ["relax.multiply", "relax.add", "relax.maximum", "relax.minimum"] and None not in consts \
                and abs(consts[0] - 1 / 6) < 1e-6 and consts[1:] == [0.5, 0.0, 1.0]:
            fusion.post_op, fusion.end = "hardswish", result
            return


def _absorb_min_max_clip(graph: _Graph, fusion: _Fusion, first) -> None:
    """Absorb ``min(max(x, low), high)`` (or ``max(min(x, high), low)``) after the conv as a clip post-op.

    Why: ONNX's Clip since opset 11 takes its bounds as inputs, and the importer turns it into a maximum and a
    minimum (ReLU6 from PyTorch exports, EfficientNet-Lite's activation), not ``relax.clip``.  Left as TIR, each
    pair is one more pass over the conv's output: 1.7 of EfficientNet-Lite0's 5.8 ms in float.  A lone
    ``max(x, 0)`` is a relu.
    """
    bounds, source, var, end = {}, fusion.end, first, None
    while var is not None and len(bounds) < 2:
        value = graph.value[var]
        kind = _op(value)
        if kind not in ("relax.maximum", "relax.minimum") or kind in bounds:
            break
        lhs, rhs = value.args
        if not (lhs.same_as(source) or rhs.same_as(source)):
            break
        bound = _scalar(rhs if lhs.same_as(source) else lhs)
        if bound is None:
            break
        bounds[kind] = bound
        source = end = var
        var = graph.only_user(var)
    if len(bounds) == 2 and bounds["relax.maximum"] <= bounds["relax.minimum"]:
        fusion.post_op, fusion.alpha, fusion.beta = "clip", bounds["relax.maximum"], bounds["relax.minimum"]
        fusion.end = end
    elif bounds.get("relax.maximum") == 0.0 and _op(graph.value[first]) == "relax.maximum":
        fusion.post_op, fusion.end = "relu", first


def _absorb_residual(graph: _Graph, fusion: _Fusion, claimed: set) -> None:
    """Extend a float32 / bf16 NHWC conv over ``+ r`` after it, r a float32 tensor of its output's shape.

    Why: a ResNet / CSP bottleneck adds its input back after the second conv; as TIR that add is one more pass
    over three tensors per block (the dense detector: about 1 ms per call).  oneDNN adds r as a binary post-op
    while the output is still in registers.  NHWC only: there the primitive writes the graph's layout, which
    the post-op reads r in.  ``claimed``: adds already taken by another conv (both operands may be convs).
    """
    user = graph.only_user(fusion.end)
    if user is None or user in claimed or _op(graph.value[user]) != "relax.add":
        return
    lhs, rhs = graph.value[user].args
    other = rhs if lhs.same_as(fusion.end) else lhs
    if not isinstance(other, relax.Var) or other.same_as(fusion.end) or not isinstance(other.ty, relax.TensorType):
        return
    if str(other.ty.dtype) != "float32" or [int(d) for d in other.ty.shape] != [int(d) for d in fusion.end.ty.shape]:
        return
    fusion.residual, fusion.end = other, user
    claimed.add(user)


def _absorbed_vars(graph: _Graph, fusion: _Fusion) -> set:
    """The bindings a fusion replaces: its conv and every binding from it up to (not including) its end."""
    reaches: dict = {}

    def leads_to_conv(var, depth: int) -> bool:  # an absorbed chain is a few bindings deep
        if var.same_as(fusion.conv_var):
            return True
        if var not in reaches:
            value = graph.value.get(var)
            reaches[var] = depth < 24 and isinstance(value, relax.Call) and any(
                isinstance(arg, relax.Var) and not (fusion.residual is not None and arg.same_as(fusion.residual))
                and leads_to_conv(arg, depth + 1) for arg in value.args)
        return reaches[var]

    leads_to_conv(fusion.end, 0)
    absorbed = {fusion.conv_var} | {var for var, inside in reaches.items() if inside}
    return {var for var in absorbed if not var.same_as(fusion.end)}  # a bare conv is its own end


# Ops that only move or select values: in bf16 each gives exactly the bf16 rounding of what it gives in float32
# (a maximum picks one of its inputs, a nearest resize copies one), so bf16 can pass through them unchanged.
_VALUE_MOVES = ("relax.concat", "relax.nn.max_pool2d", "relax.layout_transform", "relax.permute_dims",
                "relax.reshape", "relax.strided_slice")


def _tensor_inputs(value) -> list:
    inputs = []
    for arg in value.args:
        if isinstance(arg, relax.Tuple):
            inputs += [field for field in arg.fields if isinstance(field, relax.Var)]
        elif isinstance(arg, relax.Var):
            inputs.append(arg)
    return inputs


def _moves_values(value) -> bool:
    if _op(value) == "relax.image.resize2d":
        return str(value.attrs.method) == "nearest_neighbor"
    return _op(value) in _VALUE_MOVES


def _link_bf16_convs(graph: _Graph, fusions: dict) -> list:
    """Let bf16 tensors flow from bf16 convs to the bf16 convs that read them, through ops that only move values.

    A bf16 conv writes bf16 when every reader of its output is a bf16 conv (as its data) or such a move
    (concat, max-pool, nearest resize, layout transform...) whose own readers all qualify in turn and whose
    inputs are all bf16 too; those convs then read bf16.  Why: a bf16 conv otherwise writes float32, the glue
    moves float32, and the next conv rounds it to bf16 in a reorder of its own: passes over the tensor in
    float32 that the next conv's rounding makes pointless (the values it sees are the same).  On the dense
    detector's high-resolution 1x1 convs that pass was most of the call.  Returns the fusions whose spec changed.
    """
    key_of_conv = {fusion.conv_var: end for end, (fusion, _) in fusions.items()}
    bf16_ends = {end for end, (_, spec) in fusions.items() if spec.dtype == "bfloat16"}

    def reads_as_data(user, var) -> bool:
        key = key_of_conv.get(user)
        return key in bf16_ends and fusions[key][0].conv.args[0].same_as(var)

    # what could be bf16, in binding order: bf16 conv outputs, and moves of nothing else
    bf16 = set()
    for var in graph.order:
        value = graph.value[var]
        if var in bf16_ends or (isinstance(value, relax.Call) and _moves_values(value) and _tensor_inputs(value)
                                and all(arg in bf16 for arg in _tensor_inputs(value))):
            bf16.add(var)
    # then drop, until nothing changes, what a float32 consumer reads or what has a float32 input left
    dropped = True
    while dropped:
        dropped = False
        for var in list(bf16):
            users = graph.users.get(var, [])
            keeps = var not in graph.outputs and bool(users) and all(
                reads_as_data(user, var) or (user in bf16 and user not in bf16_ends) for user in users)
            if keeps and var not in bf16_ends:
                keeps = all(arg in bf16 for arg in _tensor_inputs(graph.value[var]))
            if not keeps:
                bf16.discard(var)
                dropped = True
    changed = []
    for end, (fusion, spec) in list(fusions.items()):
        writes, reads = end in bf16, spec.dtype == "bfloat16" and fusion.conv.args[0] in bf16
        if writes or reads:
            fusions[end] = (fusion, dataclasses.replace(spec, bf16_dst=writes, bf16_src=reads))
            changed.append(end)
    return changed


@tvm.transform.module_pass(opt_level=0, name=PASS_NAME)
class OffloadOneDNN(ReportingPass):
    """Replace the convs in ``layers`` and ``int8_layers`` (indices) by calls to the oneDNN bridge.

    Parameters
    ----------
    params : dict
        The imported model's parameter values (weights are read from here).
    layer_ids : sequence of str
    layers : set of int
        Float layer indices to offload (an int8 conv in it is an error).
    decisions : dict
        The layout decision per layer (checked against the conv's own layout).
    threads : int
        OpenMP threads oneDNN runs with.
    int8_layers : set of int
        Int8 layer indices to offload, after Int8ConvRewrite (their quantization is read from the report it
        filled in).
    bf16_layers : set of int
        Float layers (in ``layers``) whose conv runs in bf16: oneDNN rounds their input and weights to
        bfloat16 and sums in float32.  One that oneDNN cannot run is an error, not a float32 conv.
    int8_activation : bool
        An int8 conv's primitive also runs the dequantize → activation (→ quantize) after its output
        quantization (see ``_absorb_int8_activation``).
    bf16_chains : bool
        A bf16 conv read only by bf16 convs hands them its output in bf16 (see ``_link_bf16_convs``).
    residual_add : bool
        A float32 / bf16 NHWC conv also adds the residual that follows it (see ``_absorb_residual``).
    fold_zero_points : bool
        An int8 conv with a zero point runs with it folded where oneDNN then has a faster kernel (``ConvSpec.variant``).
    """

    def __init__(self, params, layer_ids, layers, decisions: dict[int, LayerLayout], threads: int, report=None,
                 int8_layers=(), bf16_layers=(), int8_activation: bool = True, bf16_chains: bool = True,
                 residual_add: bool = True, fold_zero_points: bool = True):
        super().__init__(report)
        self.fold_zero_points = fold_zero_points
        self.residual_add = residual_add
        self.int8_activation = int8_activation
        self.bf16_chains = bf16_chains
        self.params = params
        self.layer_ids = tuple(layer_ids)
        self.layers = set(layers)
        self.int8_layers = set(int8_layers)
        self.bf16_layers = set(bf16_layers)
        if not self.bf16_layers <= self.layers:
            raise CompileError("a bf16 conv must be a float conv offloaded to oneDNN", pass_name=PASS_NAME,
                               layer_id=self.layer_ids[min(self.bf16_layers - self.layers)])
        self.decisions = decisions
        self.threads = threads

    def run(self, mod: tvm.IRModule) -> tvm.IRModule:
        if not self.layers and not self.int8_layers:
            return mod
        func = mod["main"]
        graph = _Graph(func)
        fusions = {}
        claimed: set = set()  # residual adds already absorbed
        offloaded = self.layers | self.int8_layers
        for var, value in graph.value.items():
            if _op(value) != "relax.nn.conv2d":
                continue
            name = graph.weight_name(value.args[1])
            index = layer_of_weight(name) if name else None
            if index is None or index not in offloaded:
                continue
            layer_id = self.layer_ids[index]
            fusion = _Fusion(var, value, index)
            fusion.weight_name = name
            if index in self.int8_layers:
                fusion.quantization = self.report.int8_quantization.get(index)
                if str(value.args[0].ty.dtype) != "uint8" or fusion.quantization is None:
                    raise CompileError("an int8 conv on oneDNN must be Int8ConvRewrite's u8 conv", pass_name=PASS_NAME,
                                       layer_id=layer_id)
                reason = _absorb_int8_chain(graph, fusion)
                if reason:
                    self.report.onednn_skipped[layer_id] = reason
                    continue
                if self.int8_activation and fusion.quantization.dst_scale is not None:
                    _absorb_int8_activation(graph, fusion)
            else:
                if str(value.args[0].ty.dtype) != "float32":
                    raise CompileError("only float convs can run on oneDNN as float", pass_name=PASS_NAME,
                                       layer_id=layer_id)
                _absorb_bias(graph, fusion, self.params, _nchw_shape(value.ty.shape, str(value.attrs.out_layout))[1])
                _absorb_activation(graph, fusion)
                if self.residual_add and str(value.attrs.out_layout) == NHWC:
                    _absorb_residual(graph, fusion, claimed)
            spec = self._spec(fusion, name, layer_id)
            if self.fold_zero_points or not spec.is_int8:
                spec = _onednn.with_fastest_variant(spec)
            kernel = _onednn.implementation(spec)
            reference = any(part.startswith("ref") for part in kernel.split("+"))
            if reference and spec.dtype == "bfloat16":
                raise CompileError(f"oneDNN has only its reference kernel for this bf16 conv ({kernel})",
                                   pass_name=PASS_NAME, layer_id=layer_id)
            if reference:  # oneDNN's reference loops: far slower than any TIR kernel
                self.report.onednn_skipped[layer_id] = f"oneDNN has only its reference kernel ({kernel}) here"
                continue
            self.report.onednn_kernels[layer_id] = kernel
            fusions[fusion.end] = (fusion, spec)
        if self.bf16_chains:
            for end in _link_bf16_convs(graph, fusions):
                fusion, spec = fusions[end]
                self.report.onednn_kernels[self.layer_ids[fusion.index]] = _onednn.implementation(spec)
            self.report.bf16_chained = sorted(self.layer_ids[f.index] for f, spec in fusions.values() if spec.bf16_src)
        # a conv that now reads bf16 could not even be re-emitted as the float conv it was: drop what is absorbed
        absorbed = set().union(*(_absorbed_vars(graph, fusion) for fusion, _ in fusions.values()))
        mutator = _Offloader(mod, fusions, self.params, absorbed)
        mutator.builder_.update_func(mod.get_global_var("main"), mutator.visit_expr(func))
        self.report.onednn_layers = sorted(self.layer_ids[f.index] for f, _ in fusions.values())
        self.report.onednn_fused = {self.layer_ids[f.index]: "+".join(
            part for part in ("bias" if f.bias is not None else "", "" if f.post_op == "none" else f.post_op,
                              "add" if f.residual is not None else "") if part)
            for f, _ in fusions.values()}
        for row in self.report.rows:
            if row.id in self.report.onednn_fused:
                row.backend, row.fused = "onednn", self.report.onednn_fused[row.id]
                if row.index in self.bf16_layers:
                    row.dtype = "bfloat16"
        return mutator.builder_.get()

    def _spec(self, fusion: _Fusion, weight_name: str, layer_id: str) -> _onednn.ConvSpec:
        attrs = fusion.conv.attrs
        layout = str(attrs.data_layout)
        block = _block(layout)
        if block is None or str(attrs.out_layout) != layout:
            raise CompileError(f"oneDNN conv cannot take layout {layout} → {attrs.out_layout}", pass_name=PASS_NAME,
                               layer_id=layer_id)
        planned = self.decisions.get(fusion.index)
        if planned is not None and planned.data_layout != layout:
            raise CompileError(f"conv got layout {layout}, planned {planned.data_layout}", pass_name=PASS_NAME,
                               layer_id=layer_id)
        weights = np.asarray(self.params[weight_name])
        data_shape = _nchw_shape(fusion.conv.args[0].ty.shape, layout)
        out_shape = _nchw_shape(fusion.conv.ty.shape, layout)
        quantization = {}
        q = fusion.quantization
        if q is not None and (fusion.activated_scale is not None or fusion.activated_float):
            quantization = dict(dtype="int8_float_out" if fusion.activated_float else "int8", src_zero=q.src_zero,
                                dst_zero=fusion.activated_zero, src_scale=q.src_scale,
                                dst_scale=1.0 if fusion.activated_float else fusion.activated_scale,
                                weight_scales=tuple(float(v) for v in q.weight_scales),
                                mid_scale=q.dst_scale, mid_zero=q.dst_zero)
        elif q is not None:
            quantization = dict(dtype="int8" if q.dst_scale is not None else "int8_float_out", src_zero=q.src_zero,
                                dst_zero=q.dst_zero, src_scale=q.src_scale,
                                dst_scale=q.dst_scale if q.dst_scale is not None else 1.0,
                                weight_scales=tuple(float(v) for v in q.weight_scales))
        return _onednn.ConvSpec(tuple(data_shape), tuple(out_shape), tuple(int(k) for k in weights.shape[2:]),
                                tuple(int(s) for s in attrs.strides), tuple(int(p) for p in attrs.padding),
                                tuple(int(d) for d in attrs.dilation), int(attrs.groups), block, block,
                                fusion.post_op, fusion.alpha, fusion.beta, self.threads, fusion.index,
                                **(quantization or ({"dtype": "bfloat16"} if fusion.index in self.bf16_layers else {})),
                                residual=fusion.residual is not None)


@relax.expr_functor.mutator
class _Offloader(relax.PyExprMutator):
    def __init__(self, mod, fusions, params, absorbed):
        super().__init__(mod)
        self.fusions = fusions
        self.params = params
        self.absorbed = absorbed

    def visit_var_binding_(self, binding):
        if binding.var in self.absorbed:
            return None
        entry = self.fusions.get(binding.var)
        if entry is None:
            return super().visit_var_binding_(binding)
        fusion, spec = entry
        packed = _onednn.pack_weights(spec, np.asarray(self.params[fusion.weight_name]))
        channels = spec.output_shape[1]
        if fusion.quantization is not None:
            bias = _onednn.folded_bias(spec, fusion.quantization.float_bias(),
                                       np.asarray(self.params[fusion.weight_name]))
        else:
            bias = fusion.bias if fusion.bias is not None else np.zeros(channels, dtype="float32")
        data = self.visit_expr(fusion.conv.args[0])
        residual = [self.visit_expr(fusion.residual)] if fusion.residual is not None else []
        call = relax.op.call_dps_packed(
            _onednn.CONV_ADD_FUNCTION if residual else _onednn.CONV_FUNCTION,
            # relax.const turns int64 arrays into int32 unless told the dtype
            relax.Tuple([data, relax.const(packed, "uint8"), relax.const(bias.astype("float32"), "float32"),
                         relax.const(spec.config(), "int64"), relax.const(spec.post(), "float32"), *residual]),
            out_ty=relax.TensorType(binding.var.ty.shape, "bfloat16") if spec.bf16_dst else binding.var.ty)
        self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, call))
