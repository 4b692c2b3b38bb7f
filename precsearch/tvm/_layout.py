"""Per-layer layout choice, the ConvertLayout callback and blocked-conv legalization.

The blocked NCHW<b>c layout is the fast path on x86 for both precisions (VNNI is
reached only through ``conv2d_NCHWc_int8``), so every conv that can be blocked is.
One block size serves the whole model: ConvertLayout converts between two
blocked layouts of equal rank with a transpose, which is wrong when the block
sizes differ, so mixing 8 and 16 is not allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax, te, topi

from precsearch.errors import CompileError
from precsearch.model import ConvLayer
from ._build_report import BuildReport
from ._naming import (WEIGHT_PREFIX, binding_name, conv_kernel_name, kernel_attrs, layer_of_weight,
                      repack_kernel_name)

PASS_NAME = "precsearch.LegalizeConv"
BLOCK_SIZES = (16, 8)
# The layout every conv of an all-oneDNN plan runs in (options.activation_layout), and its weights' (TVM's own
# NHWC convention; oneDNN's weights are packed from the model's OIHW ones).
NHWC, NHWC_KERNEL = "NHWC", "HWIO"

# int8 NCHWc convs take their input channels in groups of four (one vpdpbusd lane).
_INT8_LANES = 4


@dataclass(frozen=True)
class LayerLayout:
    """The layout one conv layer is built in, and why."""

    data_layout: str
    kernel_layout: str
    reason: str = ""

    @property
    def blocked(self) -> bool:
        return self.data_layout not in ("NCHW", NHWC)


def _blockable(layer: ConvLayer, block: int, int8: bool) -> str:
    """Empty string when ``layer`` can run in NCHW<block>c, else the reason it cannot."""
    depthwise = layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels
    if layer.groups > 1 and not depthwise:
        return f"grouped conv (groups={layer.groups}) has no blocked kernel"
    if len(layer.kernel) != 2:
        return "only 2-D convs are blocked"
    if layer.in_channels % block or layer.out_channels % block:
        return f"channels {layer.in_channels}→{layer.out_channels} not divisible by block {block}"
    if int8 and not depthwise and block % _INT8_LANES:
        return f"block {block} is not a multiple of {_INT8_LANES} int8 lanes"
    return ""


def choose_block_size(layers, requested: int | None) -> int:
    """The block size that puts the most MACs in blocked convs (ties go to the larger)."""
    if requested is not None:
        return requested
    capable = [layer for layer in layers if layer.op_type == "Conv"]
    best = max(BLOCK_SIZES, key=lambda b: (sum(l.macs for l in capable if not _blockable(l, b, True)), b))
    return best


def decide_layouts(layers, int8_indices: set[int], block: int, *, float_blocked: bool = True,
                   int8_blocked: bool = True, nhwc: bool = False) -> dict[int, LayerLayout]:
    """Layout per conv layer index for one plan (``nhwc``: every conv NHWC, the other arguments unused)."""
    decisions = {}
    for layer in layers:
        if layer.op_type != "Conv":
            continue
        if nhwc:
            decisions[layer.index] = LayerLayout(NHWC, NHWC_KERNEL)
            continue
        int8 = layer.index in int8_indices
        wanted = int8_blocked if int8 else float_blocked
        reason = _blockable(layer, block, int8) if wanted else f"{'int8' if int8 else 'float'} convs kept NCHW by option"
        if reason:
            decisions[layer.index] = LayerLayout("NCHW", "OIHW", reason)
        elif layer.groups > 1:
            decisions[layer.index] = LayerLayout(f"NCHW{block}c", f"OIHW1i{block}o")
        else:
            decisions[layer.index] = LayerLayout(f"NCHW{block}c", f"OIHW{block}i{block}o")
    return decisions


def layout_callback(decisions: dict[int, LayerLayout]):
    """The ``layout_cb`` of ConvertLayout: asked once per call that has layout inference.

    Convs are told their own layout (identified by their weight parameter); every
    other op follows its inputs, so the answer for them does not matter.
    """
    # Ops with a layout of their own (conv2d_transpose: never int8, never blocked)
    # must be told NCHW explicitly, or they try to adopt a blocked input's layout.
    nchw = {"relax.nn.conv2d": ["NCHW", "OIHW"], "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}

    def callback(call):
        if call.op.name != "relax.nn.conv2d":
            return nchw
        index = layer_of_weight(getattr(call.args[1], "name", ""))
        if index is None or index not in decisions:
            return nchw
        decision = decisions[index]
        return {**nchw, "relax.nn.conv2d": [decision.data_layout, decision.kernel_layout]}

    return callback


def trace_weight_param(bb: relax.BlockBuilder, expr) -> str | None:
    """Follow a conv weight back through layout transforms to its ``ps_w`` parameter."""
    for _ in range(8):
        if isinstance(expr, relax.Var):
            if expr.name.startswith(WEIGHT_PREFIX) and layer_of_weight(expr.name) is not None:
                return expr.name
            bound = bb.lookup_binding(expr)
            if bound is None:
                return None
            expr = bound
        elif isinstance(expr, relax.Call):
            op_name = getattr(expr.op, "name", "")
            if op_name == "relax.layout_transform":
                expr = expr.args[0]
            elif op_name == "relax.call_tir":
                expr = expr.args[1].fields[0]
            else:
                return None
        else:
            return None
    return None


def _repack_int8_kernel(kernel):
    """OIHW<b>i<b>o (6-D) → the 7-D OIHW<b/4>i<b>o4i that conv2d_NCHWc_int8 reads.

    ConvertLayout rejects the 7-D layout string, so the last step is a TE
    compute; FoldConstant runs it once at build time.
    """
    oc_chunk, ic_chunk, kh, kw, ic_bn, oc_bn = (int(d) for d in kernel.shape)
    shape = (oc_chunk, ic_chunk, kh, kw, ic_bn // _INT8_LANES, oc_bn, _INT8_LANES)
    return te.compute(shape, lambda o, i, h, w, ib, ob, lane: kernel[o, i, h, w, ib * _INT8_LANES + lane, ob],
                      name="repack_int8_kernel")


# u8×s8 products are at most 255·128 in magnitude, so float32 (24-bit mantissa)
# holds every partial sum of up to this many terms exactly.
EXACT_FLOAT32_TERMS = (1 << 24) // (255 * 128)


def exact_accumulator(out_dtype: str, terms: int) -> str:
    """The dtype an integer conv accumulates in: float32 when it is exact, else ``out_dtype``.

    Int8 convs that cannot use VNNI (depthwise, and NCHW convs such as a 3-channel
    first conv) run as scalar int32 multiply-adds, 2-4x slower than the same conv in
    float32 (measured on PP-LCNet). With at most EXACT_FLOAT32_TERMS terms per
    output, float32 FMA gives the identical integer, cast to int32 at the end.
    """
    return "float32" if out_dtype == "int32" and terms <= EXACT_FLOAT32_TERMS else out_dtype


def _cast(tensor, dtype: str, name: str):
    if tensor.dtype == dtype:
        return tensor
    return te.compute(tensor.shape, lambda *index: tensor(*index).astype(dtype), name=name)


def exact_conv(data, kernel, stride, padding, dilation, groups, out_dtype, layout: str = "NCHW"):
    """``topi.nn.conv`` in NCHW / OIHW or NHWC / HWIO, accumulating an integer conv in float32 where that is
    exact."""
    kernel_layout = "OIHW" if layout == "NCHW" else NHWC_KERNEL
    shape = dict(zip(kernel_layout, (int(d) for d in kernel.shape)))
    accumulator = exact_accumulator(out_dtype, shape["I"] * shape["H"] * shape["W"])
    if accumulator == out_dtype:
        return topi.nn.conv(data, kernel, stride, padding, dilation, groups, layout, kernel_layout,
                            out_dtype=out_dtype)
    result = topi.nn.conv(_cast(data, accumulator, "data_float"), _cast(kernel, accumulator, "kernel_float"), stride,
                          padding, dilation, groups, layout, kernel_layout, out_dtype=accumulator)
    return _cast(result, out_dtype, "exact_int")


def depthwise_conv2d_nchwc(data, kernel, strides, padding, dilation, out_dtype):
    """Depthwise conv in NCHW<b>c, channel multiplier 1 (integer convs accumulate in exact float32).

    Written by hand because TVM 0.27 ships ``topi.nn.depthwise_conv2d_NCHWc`` as an
    unregistered generic function (the x86 strategy that implemented it is gone).
    """
    batch, chunks, height, width, block = (int(d) for d in data.shape)
    _, _, kernel_h, kernel_w, _, _ = (int(d) for d in kernel.shape)
    pad_top, pad_left, pad_bottom, pad_right = (int(p) for p in padding)
    stride_h, stride_w = (int(s) for s in strides)
    dilation_h, dilation_w = (int(d) for d in dilation)
    padded = topi.nn.pad(data, (0, 0, pad_top, pad_left, 0), (0, 0, pad_bottom, pad_right, 0), name="data_pad")
    out_h = (height + pad_top + pad_bottom - (kernel_h - 1) * dilation_h - 1) // stride_h + 1
    out_w = (width + pad_left + pad_right - (kernel_w - 1) * dilation_w - 1) // stride_w + 1
    ry = te.reduce_axis((0, kernel_h), name="ry")
    rx = te.reduce_axis((0, kernel_w), name="rx")
    accumulator = exact_accumulator(out_dtype, kernel_h * kernel_w)
    result = te.compute(
        (batch, chunks, out_h, out_w, block),
        lambda n, c, y, x, b: te.sum(
            padded[n, c, y * stride_h + ry * dilation_h, x * stride_w + rx * dilation_w, b].astype(accumulator)
            * kernel[c, 0, ry, rx, 0, b].astype(accumulator),
            axis=[ry, rx]),
        name="depthwise_conv2d_NCHWc")
    return _cast(result, out_dtype, "exact_int")


def make_conv_legalizer(layer_ids, decisions: dict[int, LayerLayout], report: BuildReport | None = None):
    """A legalize function for ``relax.nn.conv2d`` that names each kernel after its layer.

    Prim funcs are called ``ps_conv_L<index>_<int8|float>_<layout>`` and carry the
    layer index as an attribute, which also keeps the BlockBuilder from merging two
    layers with equal workloads into one function: the verifier reads identity
    from the attribute and checks it against the weight constant the call receives.
    A CompileError raised here is kept in ``report`` (LegalizeOps calls this from C++).
    """
    report = report if report is not None else BuildReport()

    def legalize(bb: relax.BlockBuilder, call: relax.Call):
        with report.recording_failure():
            return _legalize(bb, call)

    def _legalize(bb: relax.BlockBuilder, call: relax.Call):
        attrs = call.attrs
        weight_name = trace_weight_param(bb, call.args[1])
        if weight_name is None:
            raise CompileError("a conv2d whose weight is not a model parameter reached legalization",
                               pass_name=PASS_NAME)
        index = layer_of_weight(weight_name)
        layer_id = layer_ids[index]
        data_dtype = str(call.args[0].ty.dtype)
        int8 = data_dtype == "uint8"
        precision = "int8" if int8 else "float"
        declared = str(attrs.out_dtype) if attrs.out_dtype is not None else ""
        out_dtype = "int32" if int8 else (declared if declared not in ("", "void", "None") else data_dtype)
        layout = str(attrs.data_layout)
        name = conv_kernel_name(index, precision, layout)
        identity = {"primfunc_attrs": kernel_attrs(index)}
        if layout in ("NCHW", NHWC):
            if layout == NHWC and str(attrs.kernel_layout) != NHWC_KERNEL:
                raise CompileError(f"NHWC conv with kernel layout {attrs.kernel_layout}, expected {NHWC_KERNEL}",
                                   pass_name=PASS_NAME, layer_id=layer_id)
            return bb.call_te(exact_conv, call.args[0], call.args[1], attrs.strides, attrs.padding,
                              attrs.dilation, int(attrs.groups), out_dtype, layout, primfunc_name_hint=name,
                              **identity)
        if str(attrs.out_layout) != layout:
            raise CompileError(f"blocked conv with out layout {attrs.out_layout} != {layout}", pass_name=PASS_NAME,
                               layer_id=layer_id)
        if index not in decisions or decisions[index].data_layout != layout:
            raise CompileError(f"conv got layout {layout}, planned {decisions.get(index)}", pass_name=PASS_NAME,
                               layer_id=layer_id)
        groups = int(attrs.groups)
        common = dict(stride=attrs.strides, padding=attrs.padding, dilation=attrs.dilation, layout=layout,
                      out_layout=layout)
        if groups > 1:
            return bb.call_te(depthwise_conv2d_nchwc, call.args[0], call.args[1], attrs.strides, attrs.padding,
                              attrs.dilation, out_dtype, primfunc_name_hint=name, **identity)
        if int8:
            packed = bb.emit(bb.call_te(_repack_int8_kernel, call.args[1],
                                        primfunc_name_hint=repack_kernel_name(index)), binding_name(index, "kernel"))
            return bb.call_te(topi.nn.conv2d_NCHWc_int8, call.args[0], packed, out_dtype="int32",
                              n_elems=_INT8_LANES, primfunc_name_hint=name, **identity, **common)
        return bb.call_te(topi.nn.conv2d_NCHWc, call.args[0], call.args[1], out_dtype=out_dtype,
                          primfunc_name_hint=name, **identity, **common)

    return legalize


def unpack_kernel(kernel: np.ndarray, layout: str) -> np.ndarray:
    """Undo the packing of a built kernel constant, back to OIHW (for verification)."""
    if layout == "NCHW":
        return kernel
    if layout == NHWC:  # HWIO
        return kernel.transpose(3, 2, 0, 1)
    if kernel.ndim == 7:  # int8 NCHWc: (O/b, I/b, kh, kw, ib/4, ob, 4)
        oc, ic, kh, kw, ib4, ob, lanes = kernel.shape
        return kernel.transpose(0, 5, 1, 4, 6, 2, 3).reshape(oc * ob, ic * ib4 * lanes, kh, kw)
    if kernel.ndim == 6:  # float NCHWc or depthwise: (O/b, I/b, kh, kw, ib, ob)
        oc, ic, kh, kw, ib, ob = kernel.shape
        return kernel.transpose(0, 5, 1, 4, 2, 3).reshape(oc * ob, ic * ib, kh, kw)
    raise ValueError(f"unexpected kernel rank {kernel.ndim} for layout {layout}")
