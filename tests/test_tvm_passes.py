"""precsearch's passes one at a time on small hand-written Relax modules: structure, then numbers."""

import re

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from precsearch.errors import VerificationError
from precsearch.tvm import BuildReport
from precsearch.tvm._importer import ImportedModel
from precsearch.tvm._int8_rewrite import Int8ConvRewrite
from precsearch.tvm._layout import LayerLayout, layout_callback, make_conv_legalizer, unpack_kernel
from precsearch.tvm._qdq_lower import LowerQDQ
from precsearch.tvm._verify import InspectLayout, VerifyPlan

TARGET = tvm.target.Target({"kind": "llvm"})


def _run(mod, *args):
    with TARGET:
        executable = tvm.compile(mod, TARGET)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(arg) for arg in args)).numpy()


def _conv_nchw(x: np.ndarray, w: np.ndarray, pad: int) -> np.ndarray:
    """Reference stride-1 NCHW conv (no groups), in the dtype of ``x``."""
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    _, _, kh, kw = w.shape
    out_h, out_w = padded.shape[2] - kh + 1, padded.shape[3] - kw + 1
    windows = np.stack([padded[:, :, i:i + out_h, j:j + out_w] for i in range(kh) for j in range(kw)], axis=-1)
    return np.einsum("nchwk,ock->nohw", windows, w.reshape(w.shape[0], w.shape[1], -1).astype(x.dtype))


# ---------------------------------------------------------------------------------------------- LowerQDQ

@I.ir_module
class QuantizeDequantizeClip:
    @R.function
    def main(x: R.Tensor((1, 4, 2, 2), "float32")) -> R.Tensor((1, 4, 2, 2), "float32"):
        with R.dataflow():
            q = R.quantize(x, R.const(0.5, "float32"), R.const(3, "uint8"), axis=1, out_dtype="uint8")
            d = R.dequantize(q, R.const(0.5, "float32"), R.const(3, "uint8"), axis=1, out_dtype="float32")
            c = R.clip(d, R.prim_value(0), R.prim_value(6))
            R.output(c)
        return c


@I.ir_module
class QuantizeDequantizeClipLowered:
    @R.function
    def main(x: R.Tensor((1, 4, 2, 2), "float32")) -> R.Tensor((1, 4, 2, 2), "float32"):
        with R.dataflow():
            # ONNX QuantizeLinear: saturate(round(x / scale) + zero point), as ops with layout inference
            scaled = R.round(R.divide(x, R.const(0.5, "float32")))
            shifted = R.add(scaled, R.const(3.0, "float32"))
            q = R.astype(R.minimum(R.maximum(shifted, R.const(0.0, "float32")), R.const(255.0, "float32")), "uint8")
            d = R.multiply(R.subtract(R.astype(q, "float32"), R.const(3.0, "float32")), R.const(0.5, "float32"))
            c = R.minimum(R.maximum(d, R.const(0.0, "float32")), R.const(6.0, "float32"))
            R.output(c)
        return c


def test_lower_qdq_writes_quantize_dequantize_and_clip_as_elementwise_ops():
    lowered = LowerQDQ({})(QuantizeDequantizeClip)
    tvm.ir.assert_structural_equal(lowered, QuantizeDequantizeClipLowered)


def test_lowered_quantize_rounds_ties_to_even_like_onnx():
    # x / 0.5 = 0.5, 1.5, 2.5, -0.5, … : the ties; then + 3, saturated to [0, 255], back to float, clipped to 6
    x = np.array([0.25, 0.75, 1.25, -0.25, -0.75, 200.0, -9.0, 2.0] * 2, dtype=np.float32).reshape(1, 4, 2, 2)
    expected_q = np.clip(np.rint(x / np.float32(0.5)) + 3, 0, 255)
    expected = np.clip((expected_q - 3) * 0.5, 0, 6)
    np.testing.assert_array_equal(_run(LowerQDQ({})(QuantizeDequantizeClip), x), expected)
    assert expected_q.reshape(-1)[:5].tolist() == [3.0, 5.0, 5.0, 3.0, 1.0]  # 0, 2, 2, -0, -2: half to even


# ------------------------------------------------------------------------------------------ Int8ConvRewrite

@I.ir_module
class TwoConvs:
    @R.function
    def main(input: R.Tensor((1, 16, 8, 8), "float32"), ps_w0: R.Tensor((16, 16, 3, 3), "float32"),
             ps_w1: R.Tensor((16, 16, 3, 3), "float32")) -> R.Tensor((1, 16, 8, 8), "float32"):
        with R.dataflow():
            a = R.nn.conv2d(input, ps_w0, padding=[1, 1, 1, 1])
            b = R.nn.relu(a)
            c = R.nn.conv2d(b, ps_w1, padding=[1, 1, 1, 1])
            R.output(c)
        return c



RNG = np.random.default_rng(0)
W0 = RNG.integers(-127, 128, size=(8, 4, 3, 3)).astype(np.int8)
B0 = RNG.integers(-500, 500, size=8).astype(np.int32)
SW = RNG.uniform(0.001, 0.01, 8).astype(np.float32)
SX, SY, ZY = np.float32(0.05), np.float32(0.0734), 10  # sx/sy is not a power of two: M is not float32


def _qdq_conv(x_zero: int, x_dtype: str = "uint8") -> tvm.IRModule:
    """x → Q → DQ ─ conv(·, DQ(ps_w0)) + reshape(DQ(bias)) → Q → DQ, as ORT's QDQ model imports."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 5, 5), "float32"))
    weight = relax.Var("ps_w0", relax.TensorType((8, 4, 3, 3), "int8"))
    zero = relax.const(x_zero, x_dtype)
    with bb.function("main", [x, weight]):
        with bb.dataflow():
            x_q = bb.emit(relax.op.quantize(x, relax.const(SX), zero, axis=1, out_dtype=x_dtype))
            x_dq = bb.emit(relax.op.dequantize(x_q, relax.const(SX), zero, axis=1))
            w_dq = bb.emit(relax.op.dequantize(weight, relax.const(SW), relax.const(np.zeros(8, np.int8)), axis=0))
            y = bb.emit(relax.op.nn.conv2d(x_dq, w_dq, padding=1))
            b_dq = bb.emit(relax.op.dequantize(relax.const(B0), relax.const(SX * SW),
                                               relax.const(np.zeros(8, np.int32)), axis=0))
            y = bb.emit(relax.op.add(y, bb.emit(relax.op.reshape(b_dq, (1, 8, 1, 1)))))
            y_q = bb.emit(relax.op.quantize(y, relax.const(SY), relax.const(ZY, "uint8"), axis=1, out_dtype="uint8"))
            out = bb.emit_output(relax.op.dequantize(y_q, relax.const(SY), relax.const(ZY, "uint8"), axis=1))
        bb.emit_func_output(out)
    return bb.get()


MULTIPLIER = (np.float64(SX) * SW.astype(np.float64) / np.float64(SY)).reshape(1, 8, 1, 1)  # sx·sw[c]/sy


def _integer_conv(x_zero: int, bias: np.ndarray) -> tvm.IRModule:
    """The integer form: conv in int32, + bias, requantize in float64 with sx·sw[c]/sy."""
    multiplier = MULTIPLIER
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 5, 5), "float32"))
    weight = relax.Var("ps_w0", relax.TensorType((8, 4, 3, 3), "int8"))
    with bb.function("main", [x, weight]):
        with bb.dataflow():
            x_q = bb.emit(relax.op.quantize(x, relax.const(SX), relax.const(x_zero, "uint8"), axis=1,
                                            out_dtype="uint8"))
            acc = bb.emit(relax.op.nn.conv2d(x_q, weight, padding=1, out_dtype="int32"))
            acc = bb.emit(relax.op.add(acc, relax.const(bias.astype(np.int32))))
            acc = bb.emit(relax.op.astype(acc, "float64"))
            scaled = bb.emit(relax.op.round(relax.op.multiply(acc, relax.const(multiplier, "float64"))))
            shifted = relax.op.add(scaled, relax.const(float(ZY), "float64"))
            clipped = relax.op.minimum(relax.op.maximum(shifted, relax.const(0.0, "float64")),
                                       relax.const(255.0, "float64"))
            y_q = bb.emit(relax.op.astype(clipped, "uint8"))
            out = bb.emit_output(relax.op.dequantize(y_q, relax.const(SY), relax.const(ZY, "uint8"), axis=1))
        bb.emit_func_output(out)
    return bb.get()


def _constants_of(mod, op_name: str) -> list[np.ndarray]:
    return [arg.value.numpy() for binding in mod["main"].body.blocks[0].bindings
            if getattr(binding.value, "op", None) is not None and getattr(binding.value.op, "name", "") == op_name
            for arg in binding.value.args if isinstance(arg, tvm.ir.expr.Constant)]


def _rewrite(mod, report=None):
    imported = ImportedModel(mod, {"ps_w0": W0}, ("x",), ("y",), {0: W0}, {})
    return Int8ConvRewrite(imported, ["conv0"], report=report)(mod)


def test_int8_rewrite_of_a_conv_with_a_zero_input_zero_point():
    report = BuildReport()
    rewritten = _rewrite(_qdq_conv(0), report)
    tvm.ir.assert_structural_equal(rewritten, _integer_conv(0, B0.reshape(1, 8, 1, 1)))
    assert report.rewritten_int8 == ["conv0"]
    # structural equality compares float constants with a tolerance: check the multiplier to the bit
    (multiplier,) = _constants_of(rewritten, "relax.multiply")
    assert multiplier.dtype == np.float64
    np.testing.assert_array_equal(multiplier, MULTIPLIER)


def test_int8_rewrite_folds_the_input_zero_point_into_a_per_position_bias():
    # zx = 128 under zero padding: border outputs see fewer real inputs, so the correction zx·S varies by position
    valid_taps = _conv_nchw(np.ones((1, 4, 5, 5), np.int64), W0.astype(np.int64), pad=1)  # S[c, y, x]
    bias = B0.reshape(1, 8, 1, 1) - 128 * valid_taps
    assert bias.shape == (1, 8, 5, 5) and not np.all(bias == bias[:, :, :1, :1])
    tvm.ir.assert_structural_equal(_rewrite(_qdq_conv(128)), _integer_conv(128, bias))


@pytest.mark.parametrize("x_zero", [0, 128])
def test_the_integer_conv_computes_what_the_qdq_conv_means(x_zero):
    x = RNG.normal(0, 3, size=(1, 4, 5, 5)).astype(np.float32)
    lowered = LowerQDQ({})(_rewrite(_qdq_conv(x_zero)))
    got = _run(lowered, x, W0)
    # QDQ semantics in float64: dequantize, float conv, + bias, QuantizeLinear (divide by the scale), dequantize
    x_q = np.clip(np.rint(x / SX) + x_zero, 0, 255)
    real = _conv_nchw((x_q - x_zero) * np.float64(SX), W0 * SW.astype(np.float64)[:, None, None, None], pad=1)
    real += (B0 * (SX * SW)).astype(np.float64).reshape(1, 8, 1, 1)
    expected = (np.clip(np.rint(real / SY) + ZY, 0, 255) - ZY) * SY
    steps = np.abs(got - expected) / SY
    assert steps.max() <= 1.001 and (steps < 1e-3).mean() >= 0.99  # off by one step only at a near-tie


def test_int8_rewrite_leaves_float_convs_alone_and_raises_on_a_quantized_conv_it_cannot_make_integer():
    tvm.ir.assert_structural_equal(_rewrite(TwoConvs), TwoConvs)
    report = BuildReport()
    with pytest.raises(RuntimeError, match=r"\[pass 'precsearch.Int8ConvRewrite', layer 'conv0'\] activations "
                                           r"must be uint8, got int8"):
        _rewrite(_qdq_conv(0, x_dtype="int8"), report)
    assert report.failure.layer_id == "conv0"


# ------------------------------------------------------------------------------- ConvertLayout, FoldConstant

@I.ir_module
class TwoConvsBlockedThenNCHW:
    @R.function
    def main(input: R.Tensor((1, 16, 8, 8), "float32"), ps_w0: R.Tensor((16, 16, 3, 3), "float32"),
             ps_w1: R.Tensor((16, 16, 3, 3), "float32")) -> R.Tensor((1, 16, 8, 8), "float32"):
        with R.dataflow():
            x8 = R.layout_transform(input, index_map=T.index_map(lambda n, c, h, w: (n, c // 8, h, w, c % 8),
                                                             index_dtype="int32"), pad_value=None)
            w8 = R.layout_transform(ps_w0, index_map=T.index_map(
                lambda o, i, h, w: (o // 8, i // 8, h, w, i % 8, o % 8), index_dtype="int32"), pad_value=None)
            a = R.nn.conv2d(x8, w8, padding=[1, 1, 1, 1], data_layout="NCHW8c", kernel_layout="OIHW8i8o",
                            out_layout="NCHW8c")
            b = R.nn.relu(a)  # follows its input: stays blocked
            b_nchw = R.layout_transform(b, index_map=T.index_map(lambda n, c, h, w, i: (n, c * 8 + i, h, w),
                                                                 index_dtype="int32"), pad_value=None)
            c = R.nn.conv2d(b_nchw, ps_w1, padding=[1, 1, 1, 1])
            R.output(c)
        return c


def _index_map(mapping):
    return T.index_map(mapping, index_dtype="int32")  # ConvertLayout writes int32 index variables


DECISIONS = {0: LayerLayout("NCHW8c", "OIHW8i8o"), 1: LayerLayout("NCHW", "OIHW", "kept NCHW for the test")}


def _convert(mod):
    return tvm.transform.Sequential([relax.transform.ConvertLayout({}, layout_callback(DECISIONS)),
                                     relax.transform.Normalize()])(mod)


def test_convert_layout_blocks_the_chosen_conv_and_transforms_at_the_boundary():
    converted = _convert(TwoConvs)
    tvm.ir.assert_structural_equal(converted, TwoConvsBlockedThenNCHW)
    report = BuildReport()
    InspectLayout(["conv0", "conv1"], DECISIONS, report)(converted)
    assert [(r.id, r.layout, r.transforms_in, r.transforms_out) for r in report.rows] == [
        ("conv0", "NCHW8c", ["NCHW→NCHW8c"], ["NCHW8c→NCHW"]), ("conv1", "NCHW", ["NCHW8c→NCHW"], [])]
    # the weight's transform is a constant path (ps_w0 is a weight), not a boundary; the input's is one
    assert report.boundary_transforms == 2
    assert report.rows[1].note == "kept NCHW for the test"


def test_an_input_of_any_name_is_a_boundary_and_a_weight_is_not():
    # A detector's input is called "images": its transform into NCHW8c is a boundary all the same.
    renamed = tvm.script.from_source(re.sub(r"\binput\b", "images", _convert(TwoConvs).script()))
    assert [p.name for p in renamed["main"].params] == ["images", "ps_w0", "ps_w1"]
    report = BuildReport()
    InspectLayout(["conv0", "conv1"], DECISIONS, report)(renamed)
    assert report.boundary_transforms == 2


W_FLOAT = [RNG.normal(0, 0.2, size=(16, 16, 3, 3)).astype(np.float32) for _ in range(2)]


def _fold(mod):
    params = {"ps_w0": W_FLOAT[0], "ps_w1": W_FLOAT[1]}
    return tvm.transform.Sequential([relax.transform.BindParams("main", params), relax.transform.FoldConstant()])(mod)


def _blocked_weight(weight: np.ndarray, block: int) -> np.ndarray:
    """OIHW → OIHW<b>i<b>o: (O/b, I/b, H, W, i, o)."""
    out_c, in_c, kh, kw = weight.shape
    return weight.reshape(out_c // block, block, in_c // block, block, kh, kw).transpose(0, 2, 4, 5, 3, 1)


def test_fold_constant_packs_the_blocked_weight_at_build_time():
    packed = np.ascontiguousarray(_blocked_weight(W_FLOAT[0], 8))
    bb = relax.BlockBuilder()
    x = relax.Var("input", relax.TensorType((1, 16, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            x8 = bb.emit(relax.op.layout_transform(x, _index_map(lambda n, c, h, w: (n, c // 8, h, w, c % 8))))
            a = bb.emit(relax.op.nn.conv2d(x8, relax.const(packed), padding=1, data_layout="NCHW8c",
                                           kernel_layout="OIHW8i8o", out_layout="NCHW8c"))
            b = bb.emit(relax.op.nn.relu(a))
            b_nchw = bb.emit(relax.op.layout_transform(b, _index_map(lambda n, c, h, w, i: (n, c * 8 + i, h, w))))
            c = bb.emit_output(relax.op.nn.conv2d(b_nchw, relax.const(W_FLOAT[1]), padding=1))
        bb.emit_func_output(c)
    folded = _fold(_convert(TwoConvs))
    tvm.ir.assert_structural_equal(folded, bb.get())
    np.testing.assert_array_equal(unpack_kernel(packed, "NCHW8c"), W_FLOAT[0])  # what the verifier undoes


def test_the_blocked_conv_legalized_by_precsearch_keeps_the_numbers():
    x = RNG.normal(size=(1, 16, 8, 8)).astype(np.float32)
    expected = _conv_nchw(np.maximum(_conv_nchw(x.astype(np.float64), W_FLOAT[0], 1), 0), W_FLOAT[1], 1)
    np.testing.assert_allclose(_run(_legalized(DECISIONS), x), expected, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------- legalization and VerifyPlan

def _legalized(decisions, report=None):
    legalize = relax.transform.LegalizeOps({"relax.nn.conv2d": make_conv_legalizer(["conv0", "conv1"], decisions,
                                                                                   report)})
    with TARGET:
        return _fold(tvm.transform.Sequential([relax.transform.ConvertLayout({}, layout_callback(decisions)),
                                               relax.transform.Normalize(), legalize])(TwoConvs))


def _verify(mod, float_weights, report):
    imported = ImportedModel(mod, {}, ("x",), ("y",), {}, float_weights)
    return VerifyPlan(imported, ["conv0", "conv1"], set(), {0, 1}, report)(mod)


def test_conv_kernels_carry_their_layer_and_the_verifier_reads_it_from_there():
    mod = _legalized(DECISIONS)
    kernels = {gvar.name_hint: func for gvar, func in mod.functions.items() if isinstance(func, tvm.tirx.PrimFunc)}
    assert {name: int(func.attrs["precsearch.layer"]) for name, func in kernels.items()
            if "precsearch.layer" in func.attrs} == {"ps_conv_L0_float_NCHW8c": 0, "ps_conv_L1_float_NCHW": 1}
    report = BuildReport()
    _verify(mod, {0: W_FLOAT[0], 1: W_FLOAT[1]}, report)
    assert set(report.kernel_weights) == {"conv0", "conv1"}
    np.testing.assert_array_equal(report.kernel_weights["conv0"], W_FLOAT[0])  # unpacked from NCHW8c

    # the kernel's name says conv0, but without the attribute it is no layer's kernel
    gvar = mod.get_global_var("ps_conv_L0_float_NCHW8c")
    mod[gvar] = kernels["ps_conv_L0_float_NCHW8c"].without_attr("precsearch.layer")
    report = BuildReport()
    with pytest.raises(RuntimeError, match=r"float layers missing: \['conv0'\]"):
        _verify(mod, {0: W_FLOAT[0], 1: W_FLOAT[1]}, report)
    assert isinstance(report.failure, VerificationError) and report.failure.layer_id == "conv0"


def test_the_verifier_rejects_a_kernel_holding_another_layers_weights():
    report = BuildReport()
    with pytest.raises(RuntimeError, match=r"layer 'conv0'\] the float kernel built for this layer does not hold"):
        _verify(_legalized(DECISIONS), {0: W_FLOAT[1], 1: W_FLOAT[0]}, report)
    assert report.failure.pass_name == "precsearch.VerifyPlan"


# ------------------------------------------------------------------- fallback schedule and FastSigmoid
def _legalized_chain():
    """``(x * 0.5 + 0.25)`` then ``max(·, 0) * x``: one multiply that feeds an add, the rest inlinable."""
    x = relax.Var("x", relax.TensorType((2, 8, 6, 32), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            scaled = bb.emit(relax.op.multiply(x, relax.const(0.5, "float32")))
            shifted = bb.emit(relax.op.add(scaled, relax.const(0.25, "float32")))
            clamped = bb.emit(relax.op.maximum(shifted, relax.const(0.0, "float32")))
            out = bb.emit_output(relax.op.multiply(clamped, x))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    mod = relax.transform.AnnotateTIROpPattern()(mod)
    mod = relax.transform.FuseOps()(mod)
    return relax.transform.FuseTIR()(mod)


def test_the_fallback_schedule_inlines_vectorizes_and_parallelizes_without_contracting_a_multiply_add():
    from precsearch.tvm._fallback_schedule import parallel_schedule

    mod = _legalized_chain()
    (gv, func), = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    scheduled = parallel_schedule(func, 2)
    text = scheduled.script()
    # x * 0.5 stays its own loop nest (inlined, LLVM could fuse it with + 0.25 into one FMA); the add, the
    # maximum and the final multiply become one nest: two nests in all, each parallel and vectorized
    assert len(re.findall(r"^\s+with T\.sblock\(", text, re.MULTILINE)) == 2
    assert text.count("T.parallel(") == 2 and text.count("T.vectorized(") == 2
    x = np.random.default_rng(0).standard_normal((2, 8, 6, 32)).astype("float32")
    outputs = []
    for f in (func, scheduled):
        lib = tvm.compile(f.with_attr("global_symbol", "main"), TARGET)
        out = tvm.runtime.tensor(np.zeros_like(x))
        lib["main"](tvm.runtime.tensor(x), out)
        outputs.append(out.numpy())
    np.testing.assert_array_equal(outputs[1], outputs[0])  # the same arithmetic, bit for bit
    np.testing.assert_array_equal(outputs[0], np.maximum(x * np.float32(0.5) + np.float32(0.25), 0) * x)


def test_fast_sigmoid_replaces_every_float_sigmoid_and_keeps_its_values():
    from precsearch.tvm._fast_sigmoid import FastSigmoid

    x = relax.Var("x", relax.TensorType((1, 16, 5, 5), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.multiply(x, relax.op.sigmoid(x)))
        bb.emit_func_output(out)
    mod = FastSigmoid()(bb.get())
    assert "relax.sigmoid" not in mod.script() and "R.sigmoid" not in mod.script()
    values = np.linspace(-100, 100, 400, dtype="float32").reshape(1, 16, 5, 5)
    silu = values / (1 + np.exp(-values.astype(np.float64)))
    np.testing.assert_allclose(_run(mod, values), silu, rtol=5e-6, atol=1e-12)


# ------------------------------------------------------------------------------------- SeparableMaxPool
def _spp(layout: str):
    """YOLO's SPP block: one tensor pooled 5×5, 9×9 and 13×13 at stride 1, concatenated; and a strided 3×3 pool."""
    shape = (1, 13, 11, 16) if layout == "NHWC" else (1, 16, 13, 11)
    channel_axis = layout.index("C")
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            pools = [bb.emit(relax.op.nn.max_pool2d(x, (k, k), (1, 1), (k // 2,) * 4, layout=layout))
                     for k in (5, 9, 13)]
            strided = bb.emit(relax.op.nn.max_pool2d(x, (3, 3), (2, 2), (1, 1, 1, 1), layout=layout))
            spp = bb.emit_output(relax.op.concat([x, *pools], axis=channel_axis))
            out = bb.emit_output(strided)
        bb.emit_func_output(relax.Tuple([spp, out]))
    return bb.get()


@I.ir_module
class SPPSeparable:
    @R.function
    def main(x: R.Tensor((1, 16, 13, 11), "float32")):
        with R.dataflow():
            # 5×5 as 1×5 then 5×1; 9×9 = 5×5 of the 5×5; 13×13 = 5×5 of the 9×9 (SPPF)
            r5 = R.nn.max_pool2d(x, pool_size=(1, 5), strides=(1, 1), padding=(0, 2, 0, 2))
            p5 = R.nn.max_pool2d(r5, pool_size=(5, 1), strides=(1, 1), padding=(2, 0, 2, 0))
            r9 = R.nn.max_pool2d(p5, pool_size=(1, 5), strides=(1, 1), padding=(0, 2, 0, 2))
            p9 = R.nn.max_pool2d(r9, pool_size=(5, 1), strides=(1, 1), padding=(2, 0, 2, 0))
            r13 = R.nn.max_pool2d(p9, pool_size=(1, 5), strides=(1, 1), padding=(0, 2, 0, 2))
            p13 = R.nn.max_pool2d(r13, pool_size=(5, 1), strides=(1, 1), padding=(2, 0, 2, 0))
            r3 = R.nn.max_pool2d(x, pool_size=(1, 3), strides=(1, 2), padding=(0, 1, 0, 1))
            strided = R.nn.max_pool2d(r3, pool_size=(3, 1), strides=(2, 1), padding=(1, 0, 1, 0))
            spp = R.concat((x, p5, p9, p13), axis=1)
            out = strided
            R.output(spp, out)
        return (spp, out)


def test_separable_max_pool_writes_spp_as_sppf_chains_of_separable_pools():
    from precsearch.tvm._max_pool import SeparableMaxPool

    tvm.ir.assert_structural_equal(SeparableMaxPool()(_spp("NCHW")), SPPSeparable)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_separable_max_pool_keeps_every_value(layout):
    from precsearch.tvm._max_pool import SeparableMaxPool

    mod = _spp(layout)
    rewritten = SeparableMaxPool()(mod)
    assert rewritten.script().count("pool_size=[13, 13]") == 0 and mod.script().count("pool_size=[13, 13]") == 1
    shape = [int(d) for d in mod["main"].params[0].ty.shape]
    # distinct values, negatives included: a wrong window or a zero padding changes some maximum
    x = np.random.default_rng(0).permutation(np.prod(shape)).reshape(shape).astype("float32") - 1000
    with TARGET:
        outputs = [relax.VirtualMachine(tvm.compile(m, TARGET), tvm.cpu())["main"](tvm.runtime.tensor(x))
                   for m in (mod, rewritten)]
    for reference, value in zip(*outputs):
        np.testing.assert_array_equal(value.numpy(), reference.numpy())
    # the 13×13 pool against numpy: every window clipped at the edges
    spp = outputs[1][0].numpy()
    axis = layout.index("C")
    h_axis, w_axis = layout.index("H"), layout.index("W")
    c = shape[axis]
    p13 = np.take(spp, range(3 * c, 4 * c), axis=axis)
    for i, j in ((0, 0), (6, 5), (12, 10)):
        rows = range(max(i - 6, 0), min(i + 7, shape[h_axis]))
        window = np.take(np.take(x, rows, axis=h_axis), range(max(j - 6, 0), min(j + 7, shape[w_axis])), axis=w_axis)
        expected = window.max(axis=(h_axis, w_axis))
        np.testing.assert_array_equal(np.take(np.take(p13, [i], axis=h_axis), [j], axis=w_axis).reshape(-1),
                                      expected.reshape(-1))


def _fused_kernels(mod):
    mod = relax.transform.LegalizeOps()(mod)
    mod = relax.transform.AnnotateTIROpPattern()(mod)
    return mod


def test_the_fallback_schedule_loops_a_layout_transform_in_the_order_it_writes():
    from precsearch.tvm._fallback_schedule import parallel_schedule

    x = relax.Var("x", relax.TensorType((1, 12, 10, 6), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.layout_transform(x, index_map=lambda n, c, h, w: (n, h, w, c)))
        bb.emit_func_output(out)
    (func,) = [f for _, f in _fused_kernels(bb.get()).functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    scheduled = parallel_schedule(func, 2)
    text = scheduled.script()
    # LegalizeOps loops over the source (c, h, w); scheduled, over the destination (h, w, c): the vector lanes are
    # the 12 channels, written contiguously, and the parallel loop is the rows
    assert re.search(r"for \w+ in T\.vectorized\(T\.int64\(12\)\)", text), text
    assert re.search(r"for \w+ in T\.parallel\(T\.int64\((10|60)\)\)", text), text
    values = np.random.default_rng(0).standard_normal((1, 12, 10, 6)).astype("float32")
    lib = tvm.compile(scheduled.with_attr("global_symbol", "main"), TARGET)
    out = tvm.runtime.tensor(np.zeros((1, 10, 6, 12), dtype="float32"))
    lib["main"](tvm.runtime.tensor(values), out)
    np.testing.assert_array_equal(out.numpy(), values.transpose(0, 2, 3, 1))


def test_a_take_with_constant_indices_fuses_with_the_transforms_around_it():
    from precsearch.tvm._injective_take import InjectiveTake

    # YOLOX's Focus stem as TVM imports it: space-to-depth, channels reordered by a take, then to NHWC
    x = relax.Var("x", relax.TensorType((1, 3, 8, 8), "float32"))
    order = np.array([0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11], dtype="int64")
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            split = bb.emit(relax.op.reshape(x, (1, 3, 4, 2, 4, 2)))
            moved = bb.emit(relax.op.permute_dims(split, [0, 3, 5, 1, 2, 4]))
            stacked = bb.emit(relax.op.reshape(moved, (1, 12, 4, 4)))
            taken = bb.emit(relax.op.take(stacked, relax.const(order), axis=1, mode="fast"))
            out = bb.emit_output(relax.op.layout_transform(taken, index_map=lambda n, c, h, w: (n, h, w, c)))
        bb.emit_func_output(out)
    mod = bb.get()
    kernels = {}
    for name, passes in (("opaque", []), ("injective", [InjectiveTake()])):
        fused = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                          *passes, relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
        kernels[name] = [gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
        kernels[name + "_module"] = fused
    assert len(kernels["opaque"]) == 3  # the take stops fusion on both sides
    assert len(kernels["injective"]) == 1 and "take" in kernels["injective"][0]
    values = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype("float32")
    outputs = [_run(kernels[name + "_module"], values) for name in ("opaque", "injective")]
    np.testing.assert_array_equal(outputs[1], outputs[0])
    expected = values.reshape(1, 3, 4, 2, 4, 2).transpose(0, 3, 5, 1, 2, 4).reshape(1, 12, 4, 4)[:, order]
    np.testing.assert_array_equal(outputs[1], expected.transpose(0, 2, 3, 1))
    # its lanes would gather (each its own int64 div/mod chain, no AVX-512 form): the fallback unrolls them instead
    from precsearch.tvm._fallback_schedule import parallel_schedule

    (func,) = [f for _, f in kernels["injective_module"].functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    scheduled = parallel_schedule(func, 2)
    assert "T.unroll(T.int64(12))" in scheduled.script() and "T.vectorized(" not in scheduled.script()
    lib = tvm.compile(scheduled.with_attr("global_symbol", "main"), TARGET)
    out = tvm.runtime.tensor(np.zeros((1, 4, 4, 12), dtype="float32"))
    lib["main"](tvm.runtime.tensor(values), tvm.runtime.tensor(order.astype("int32")), out)
    np.testing.assert_array_equal(out.numpy(), expected.transpose(0, 2, 3, 1))


# ------------------------------------------------------------------------------------- concat vector loops
def _requantizing_concat(widths=(32, 16, 16)):
    """A concat of NHWC tensors along channels, then quantized to u8 (an int8 detector's neck between convs)."""
    inputs = [relax.Var(f"x{i}", relax.TensorType((1, 5, 4, width), "float32")) for i, width in enumerate(widths)]
    bb = relax.BlockBuilder()
    with bb.function("main", inputs):
        with bb.dataflow():
            joined = bb.emit(relax.op.concat(inputs, axis=3))
            steps = bb.emit(relax.op.round(relax.op.divide(joined, relax.const(0.05, "float32"))))
            clipped = bb.emit(relax.op.clip(relax.op.add(steps, relax.const(7.0, "float32")), 0, 255))
            out = bb.emit_output(relax.op.astype(clipped, "uint8"))
        bb.emit_func_output(out)
    mod = _fused_kernels(bb.get())
    mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(mod))
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return func


def test_select_boundaries_are_where_a_concats_conditions_change():
    from precsearch.tvm._select_partition import select_boundaries

    v = tvm.tirx.Var("v", "int64")
    c = lambda value: tvm.tirx.IntImm("int64", value)  # noqa: E731
    value = tvm.tirx.Select(c(32) <= v, tvm.tirx.Select(v < c(48), c(1), c(2)), c(0))
    assert select_boundaries(value, v) == {32, 48}
    assert select_boundaries(tvm.tirx.Select(v > c(9), c(1), c(0)), v) == {10}  # v > 9 first holds at 10
    assert select_boundaries(tvm.tirx.Select(tvm.tirx.Var("w", "int64") < c(4), c(1), c(0)), v) == set()


@pytest.mark.parametrize("partition", [True, False])
def test_the_fallback_schedule_cuts_a_concats_vector_loop_where_its_inputs_meet(partition):
    from precsearch.tvm._fallback_schedule import parallel_schedule

    func = _requantizing_concat()
    scheduled = parallel_schedule(func, 2, partition_selects=partition)
    text = scheduled.script()
    # cut at channels 32 and 48 in whole 16-lane vectors: three vector loops, each reading one input
    # (uncut, the 64 channels are one vector loop whose lanes pick their source one by one)
    assert text.count("T.vectorized(") == (3 if partition else 1), text
    assert text.count("T.vectorized(T.int64(16))") == (3 if partition else 0), text
    assert len(re.findall(r'T\.sblock\("\w+_partition"\)', text)) == (3 if partition else 0), text
    rng = np.random.default_rng(0)
    values = [(rng.standard_normal((1, 5, 4, width)) * 4).astype("float32") for width in (32, 16, 16)]
    lib = tvm.compile(scheduled.with_attr("global_symbol", "main"), TARGET)
    out = tvm.runtime.tensor(np.zeros((1, 5, 4, 64), dtype="uint8"))
    lib["main"](*(tvm.runtime.tensor(v) for v in values), out)
    steps = np.round(np.concatenate(values, axis=3) / np.float32(0.05))
    np.testing.assert_array_equal(out.numpy(), np.clip(steps + 7, 0, 255).astype("uint8"))
