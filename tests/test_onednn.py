"""Convs on oneDNN (float, and int8 with requantization inside): the bridge's numbers, the offload pass, builds and
exported libraries."""

import os

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

import models
from precsearch.errors import CompileError, ConfigError, VerificationError
from precsearch.model import load_model
from precsearch.model.data import image_batches
from precsearch.model.plan import parse_plan
from precsearch.model.quantize import build_qdq_model, calibrate
from precsearch.tvm import CompileOptions, LoadedLibrary, build_plan, import_qdq_model, pipeline, resolve_target
from precsearch.tvm import _onednn, _onednn_dense
from precsearch.tvm._onednn_dense import OffloadDenseOneDNN
from precsearch.tvm._onednn_offload import OffloadOneDNN

pytestmark = pytest.mark.skipif(not _onednn.available(), reason=_onednn.unavailable_reason() or "oneDNN missing")

# Float convs on oneDNN, int8 on TIR (what every CPU without VNNI gets); int8 on oneDNN too, which needs VNNI.
ONEDNN = CompileOptions(conv_backend="onednn", onednn_int8=False)
ONEDNN_INT8 = CompileOptions(conv_backend="onednn", onednn_int8=True)
HAS_VNNI = _onednn.int8_fast_on(resolve_target(CompileOptions()))
needs_vnni = pytest.mark.skipif(not HAS_VNNI, reason="oneDNN int8 convs need VNNI; this CPU has none (the refusal "
                                                     "is tested instead)")


def _ort_conv(x, w, b, strides, pads, dilations, group, activation=None):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c" if activation else "y"], strides=list(strides),
                              pads=list(pads), dilations=list(dilations), group=group)]
    if activation == "swish":
        nodes += [helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["c", "s"], ["y"])]
    elif activation:
        nodes.append(helper.make_node(activation, ["c"], ["y"]))
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


CASES = [  # ic, oc, size, kernel, stride, pads (t, l, b, r), dilation, groups, block, post-op
    (16, 16, 9, 3, 1, (1, 1, 1, 1), 1, 1, 8, "relu"),
    (8, 16, 10, 3, 2, (0, 1, 1, 0), 1, 1, 8, "none"),  # asymmetric padding, stride 2
    (16, 16, 9, 3, 1, (2, 2, 2, 2), 2, 16, 8, "clip"),  # depthwise, dilated
    (3, 8, 12, 3, 2, (1, 1, 1, 1), 1, 1, 0, "swish"),  # a first conv: plain NCHW in and out
    (16, 32, 7, 1, 1, (0, 0, 0, 0), 1, 1, 8, "hardswish"),
]


@pytest.mark.parametrize("ic, oc, size, kernel, stride, pads, dilation, groups, block, post", CASES)
def test_the_bridge_computes_the_conv_onnx_runtime_computes(ic, oc, size, kernel, stride, pads, dilation, groups,
                                                            block, post):
    rng = np.random.default_rng(ic * oc + size)
    x = rng.standard_normal((1, ic, size, size)).astype("float32")
    w = rng.standard_normal((oc, ic // groups, kernel, kernel)).astype("float32")
    b = rng.standard_normal(oc).astype("float32")
    activation = {"none": None, "relu": "Relu", "clip": "Clip", "swish": "swish", "hardswish": "HardSwish"}[post]
    expected = _ort_conv(x, w, b, (stride, stride), (pads[0], pads[1], pads[2], pads[3]), (dilation, dilation),
                         groups, activation)
    if post == "clip":  # ONNX Clip without bounds is the identity: use the ReLU6 bounds explicitly
        expected = np.clip(_ort_conv(x, w, b, (stride,) * 2, pads, (dilation,) * 2, groups), 0.0, 6.0)
    spec = _onednn.ConvSpec((1, ic, size, size), expected.shape, (kernel, kernel), (stride, stride), pads,
                            (dilation, dilation), groups, block, block, post, 0.0, 6.0 if post == "clip" else 0.0,
                            threads=2)
    packed = _onednn.pack_weights(spec, w)
    np.testing.assert_array_equal(_onednn.unpack_weights(spec, packed), w)
    out = tvm.runtime.tensor(np.zeros(models.blocked(expected, block).shape, dtype="float32"))
    tvm.get_global_func(_onednn.CONV_FUNCTION)(
        tvm.runtime.tensor(models.blocked(x, block)), tvm.runtime.tensor(packed), tvm.runtime.tensor(b),
        tvm.runtime.tensor(spec.config()), tvm.runtime.tensor(spec.post()), out)
    np.testing.assert_allclose(out.numpy(), models.blocked(expected, block), rtol=1e-4, atol=1e-4)
    assert _onednn.spec_from_config(spec.config(), spec.post()) == spec
    assert not _onednn.implementation(spec).startswith("ref")


def _front(model, imported, int8_ids, options):
    """The pipeline up to and including OffloadOneDNN, then dead-code elimination."""
    passes = pipeline(model, imported, int8_ids, options)
    names = [p.info.name for p in passes.passes]
    front = tvm.transform.Sequential([*passes.passes[:names.index("precsearch.OffloadOneDNN") + 1],
                                      tvm.relax.transform.DeadCodeElimination()])
    with resolve_target(options), tvm.transform.PassContext(opt_level=3):
        return front(imported.mod)


def _calls(mod, op_name):
    found = []

    def visit(expr):
        if isinstance(expr, tvm.ir.expr.Call) and getattr(expr.op, "name", "") == op_name:
            found.append(expr)

    tvm.relax.analysis.post_order_visit(mod["main"], visit)
    return found


@pytest.fixture(scope="module")
def activations(tmp_path_factory):
    model = load_model(models.save(models.activations_model(), tmp_path_factory.mktemp("onednn"), "act"))
    ranges = calibrate(model, image_batches(model, None, count=2))
    plan = parse_plan("all", model)  # every conv float
    return model, build_qdq_model(model, ranges, plan), plan.int8_ids(model)


def test_the_pass_fuses_bias_and_the_activations_onednn_has(activations):
    model, qdq, int8_ids = activations
    imported = import_qdq_model(qdq, model)
    mod = _front(model, imported, int8_ids, ONEDNN)
    assert _calls(mod, "relax.nn.conv2d") == []
    offloaded = _calls(mod, "relax.call_dps_packed")
    specs = [_onednn.spec_from_config(call.args[1].fields[3].value.numpy(), call.args[1].fields[4].value.numpy())
             for call in offloaded]
    # SiLU and HardSwish become post-ops; HardSigmoid has none in oneDNN and stays a TIR kernel
    assert {spec.layer: spec.post_op for spec in specs} == {0: "swish", 1: "none", 2: "hardswish", 3: "none"}
    assert len(_calls(mod, "relax.sigmoid")) == 0 and len(_calls(mod, "relax.minimum")) == 1
    initializers = {t.name: numpy_helper.to_array(t) for t in model.proto.graph.initializer}
    bias_of = {node.name: initializers[node.input[2]] for node in model.proto.graph.node if node.op_type == "Conv"}
    for call, spec in zip(offloaded, specs):
        np.testing.assert_array_equal(call.args[1].fields[2].value.numpy(), bias_of[model.layers[spec.layer].id])


def test_the_pass_fuses_a_clip_with_its_bounds_as_inputs_and_gives_onnx_runtimes_outputs(tmp_path):
    # ONNX's Clip since opset 11 imports as a maximum and a minimum (ReLU6 in PyTorch exports), not relax.clip.
    model = load_model(models.save(models.clip_model(), tmp_path, "clips"))
    ranges = calibrate(model, image_batches(model, None, count=2))
    plan = parse_plan("all", model)
    qdq = build_qdq_model(model, ranges, plan)
    mod = _front(model, import_qdq_model(qdq, model), plan.int8_ids(model), ONEDNN)
    specs = [_onednn.spec_from_config(call.args[1].fields[3].value.numpy(), call.args[1].fields[4].value.numpy())
             for call in _calls(mod, "relax.call_dps_packed")]
    assert {s.layer: (s.post_op, s.post_alpha, s.post_beta) for s in specs} == {
        0: ("clip", 0.0, 6.0), 1: ("relu", 0.0, 0.0), 2: ("clip", -1.0, 1.0), 3: ("none", 0.0, 0.0)}
    assert _calls(mod, "relax.maximum") == [] and _calls(mod, "relax.minimum") == []
    built = build_plan(model, qdq, plan.int8_ids(model), options=ONEDNN)
    batch = next(iter(image_batches(model, None, count=1)))
    expected = ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, batch)[0]
    np.testing.assert_allclose(built.run(batch)["output"], expected, rtol=1e-4, atol=1e-4)


def test_the_pass_leaves_a_module_without_chosen_layers_unchanged(activations):
    model, qdq, int8_ids = activations
    imported = import_qdq_model(qdq, model)
    offload = OffloadOneDNN(imported.params, [layer.id for layer in model.layers], (), {}, 2)
    with resolve_target(ONEDNN), tvm.transform.PassContext(opt_level=3):
        tvm.ir.assert_structural_equal(offload(imported.mod), imported.mod)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    model = load_model(models.save(models.chain_model(), tmp_path_factory.mktemp("onednn"), "chain"))
    ranges = calibrate(model, image_batches(model, None, count=4))
    plan = parse_plan("conv1", model)  # int8 → float → int8
    qdq = build_qdq_model(model, ranges, plan)
    return model, qdq, plan.int8_ids(model), next(iter(image_batches(model, None, count=1)))


def test_a_mixed_plan_on_onednn_gives_the_outputs_of_the_tir_build(chain, tmp_path):
    model, qdq, int8_ids, batch = chain
    tir = build_plan(model, qdq, int8_ids)
    onednn = build_plan(model, qdq, int8_ids, options=ONEDNN)
    assert {row.id: row.backend for row in onednn.rows} == {"conv0": "tir", "conv1": "onednn", "conv2": "tir"}
    assert next(row.fused for row in onednn.rows if row.id == "conv1") == "bias+relu"
    assert list(onednn.onednn_kernels) == ["conv1"]
    np.testing.assert_array_equal(onednn.kernel_weights["conv1"], tir.kernel_weights["conv1"])
    expected = tir.run(batch)["logits"]
    np.testing.assert_allclose(onednn.run(batch)["logits"], expected, rtol=1e-4, atol=1e-4)
    loaded = LoadedLibrary(onednn.export_library(tmp_path / "model.so"), onednn.input_names, onednn.output_names)
    np.testing.assert_allclose(loaded.run(batch)["logits"], expected, rtol=1e-4, atol=1e-4)


def test_weights_that_are_not_the_layers_own_fail_verification_naming_the_layer(chain, monkeypatch):
    model, qdq, int8_ids, _ = chain
    real_pack = _onednn.pack_weights
    monkeypatch.setattr(_onednn, "pack_weights", lambda spec, weights: real_pack(spec, weights * 2))
    with pytest.raises(CompileError) as caught:
        build_plan(model, qdq, int8_ids, options=ONEDNN)
    assert isinstance(caught.value, VerificationError) or "VerifyPlan" in str(caught.value)
    assert "conv1" in str(caught.value) and "oneDNN" in str(caught.value)


def test_a_conv_onednn_has_only_its_reference_kernel_for_stays_tir(chain, monkeypatch):
    model, qdq, int8_ids, _ = chain
    monkeypatch.setattr(_onednn, "implementation", lambda spec: "ref:any")
    built = build_plan(model, qdq, int8_ids, options=ONEDNN)
    assert {row.backend for row in built.rows} == {"tir"}
    assert "reference kernel" in built.onednn_skipped["conv1"]


def test_without_onednn_every_conv_stays_tir_and_says_why(chain, monkeypatch):
    model, qdq, int8_ids, batch = chain
    monkeypatch.setattr(_onednn, "unavailable_reason", lambda: "libdnnl not found in /nowhere")
    built = build_plan(model, qdq, int8_ids, options=ONEDNN)
    assert {row.backend for row in built.rows} == {"tir"}
    assert built.onednn_skipped == {"conv1": "libdnnl not found in /nowhere"}


def test_an_unknown_conv_backend_is_a_config_error():
    from precsearch.errors import ConfigError

    with pytest.raises(ConfigError, match="conv_backend"):
        CompileOptions(conv_backend="mkl")


def test_a_build_with_onednn_convs_is_timed_at_both_tvm_pool_sizes(chain):
    from precsearch.tvm import measure_library

    model, qdq, int8_ids, batch = chain
    onednn = build_plan(model, qdq, int8_ids, options=ONEDNN)
    tir = build_plan(model, qdq, int8_ids, options=CompileOptions(conv_backend="tir"))
    for size in (2, 1):
        latency = measure_library(onednn, batch, threads=2, warmup=2, repeats=5, pool_sizes=(size,))
        assert latency.tvm_pool_threads == size and latency.threads == 2
    best = measure_library(onednn, batch, threads=2, warmup=2, repeats=5)
    assert best.tvm_pool_threads in (1, 2) and best.threads == 2
    assert measure_library(tir, batch, threads=2, warmup=2, repeats=5).tvm_pool_threads == 2  # TIR only: all cores


def _integer_conv(x, w, zero, stride, pads, groups):
    """conv(x - zero, w) in int64, padding with the zero point (ONNX QLinearConv's semantics)."""
    top, left, bottom, right = pads
    shifted = np.pad(x.astype(np.int64) - zero, ((0, 0), (0, 0), (top, bottom), (left, right)))
    out_channels, group_channels, kh, kw = w.shape
    oh = (shifted.shape[2] - kh) // stride + 1
    ow = (shifted.shape[3] - kw) // stride + 1
    out = np.zeros((1, out_channels, oh, ow), np.int64)
    per_group = out_channels // groups
    for g in range(groups):
        xs = shifted[:, g * group_channels:(g + 1) * group_channels]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
                out[:, g * per_group:(g + 1) * per_group] += np.einsum(
                    "nchw,oc->nohw", patch, w[g * per_group:(g + 1) * per_group, :, i, j].astype(np.int64))
    return out


INT8_CASES = [  # ic, oc, size, kernel, stride, pads, groups, block, src zero, dst zero (None: float output)
    (16, 32, 11, 3, 1, (1, 1, 1, 1), 1, 8, 5, 7),  # input zero point: padding must count as the zero point
    (32, 32, 9, 3, 2, (0, 1, 1, 0), 32, 16, 0, 0),  # depthwise, stride 2, asymmetric padding
    (16, 16, 7, 1, 1, (0, 0, 0, 0), 1, 16, 3, 0),
    (3, 16, 12, 3, 2, (1, 1, 1, 1), 1, 0, 10, 2),  # a first conv: plain NCHW
    (16, 8, 6, 3, 1, (1, 1, 1, 1), 1, 8, 4, None),  # an int8 conv whose output stays float
]


@needs_vnni
@pytest.mark.parametrize("variant", [-1, 1], ids=["onednn-zero-points", "folded-zero-points"])
@pytest.mark.parametrize("ic, oc, size, kernel, stride, pads, groups, block, src_zero, dst_zero", INT8_CASES)
def test_the_bridge_requantizes_int8_convs_exactly_as_integer_arithmetic_does(ic, oc, size, kernel, stride, pads,
                                                                             groups, block, src_zero, dst_zero,
                                                                             variant):
    rng = np.random.default_rng(ic + 7 * oc + size)
    x = rng.integers(0, 256, (1, ic, size, size)).astype(np.uint8)
    w = rng.integers(-127, 128, (oc, ic // groups, kernel, kernel)).astype(np.int8)
    bias_q = rng.integers(-3000, 3000, oc)
    src_scale, dst_scale = float(np.float32(0.02)), float(np.float32(0.7))  # the bridge holds float32
    weight_scales = rng.uniform(0.001, 0.01, oc).astype(np.float32)
    # oneDNN multiplies in float32: the exact real value, from the float32 scales it is given
    accumulator_scale = (np.float32(src_scale) * weight_scales).astype(np.float64)[None, :, None, None]
    acc = _integer_conv(x, w, src_zero, stride, pads, groups) + bias_q[None, :, None, None]
    real = acc * accumulator_scale
    if dst_zero is None:
        expected, dtype, out_dtype = real.astype(np.float32), "int8_float_out", "float32"
    else:
        steps = real / np.float32(dst_scale)
        # a value within 1e-4 of a .5 tie may round either way in float32 arithmetic
        near_tie = np.abs(np.abs(steps - np.floor(steps)) - 0.5) < 1e-4
        assert near_tie.mean() < 0.01
        expected, dtype, out_dtype = np.clip(np.round(steps) + dst_zero, 0, 255).astype(np.uint8), "int8", "uint8"
    spec = _onednn.ConvSpec((1, ic, size, size), expected.shape, (kernel, kernel), (stride, stride), pads, (1, 1),
                            groups, block, block, threads=2, dtype=dtype, src_zero=src_zero, dst_zero=dst_zero or 0,
                            src_scale=src_scale, dst_scale=dst_scale,
                            weight_scales=tuple(float(v) for v in weight_scales), variant=variant)
    assert _onednn.spec_from_config(spec.config(), spec.post()) == spec
    implementation = _onednn.implementation(spec)
    assert not implementation.startswith("ref")
    bias = (bias_q * accumulator_scale.reshape(-1)).astype(np.float32)
    folded = _onednn.folded_bias(spec, bias, w)
    if variant == 1 and src_zero:
        # the zero point's share of every window moved into the bias; padding made explicit (a staging reorder)
        np.testing.assert_allclose(folded, bias - accumulator_scale.reshape(-1) * src_zero *
                                   w.astype(np.int64).reshape(oc, -1).sum(axis=1), rtol=1e-5, atol=1e-4)
        assert implementation.startswith("reorder+") or not any(pads)
    else:
        assert folded is bias
    bias = folded
    out = tvm.runtime.tensor(np.zeros(models.blocked(expected, block).shape, dtype=out_dtype))
    tvm.get_global_func(_onednn.CONV_FUNCTION)(
        tvm.runtime.tensor(models.blocked(x, block)), tvm.runtime.tensor(_onednn.pack_weights(spec, w)),
        tvm.runtime.tensor(bias), tvm.runtime.tensor(spec.config()), tvm.runtime.tensor(spec.post()), out)
    if dst_zero is None:
        np.testing.assert_allclose(out.numpy(), models.blocked(expected, block), rtol=1e-5, atol=1e-5)
    else:
        difference = np.abs(out.numpy().astype(int) - models.blocked(expected, block).astype(int))
        tie = models.blocked(near_tie, block)
        assert difference[~tie].max() == 0 and (difference[tie] <= 1).all()


@needs_vnni
def test_int8_convs_on_onednn_give_the_outputs_of_the_tir_build(chain, tmp_path):
    model, qdq, int8_ids, batch = chain
    tir = build_plan(model, qdq, int8_ids, options=CompileOptions(conv_backend="tir"))
    onednn = build_plan(model, qdq, int8_ids, options=ONEDNN_INT8)
    assert {row.id: (row.dtype, row.backend) for row in onednn.rows} == {
        "conv0": ("int8", "onednn"), "conv1": ("float32", "onednn"), "conv2": ("int8", "onednn")}
    assert set(onednn.onednn_kernels) == {"conv0", "conv1", "conv2"}
    for layer in ("conv0", "conv2"):
        np.testing.assert_array_equal(onednn.kernel_weights[layer], tir.kernel_weights[layer])
        assert onednn.kernel_weights[layer].dtype == np.int8
    # conv2 is the graph's last conv: its output is dequantized, so the logits are float; the int8 chain itself
    # (conv0's u8 output) must be the same integers TIR's float64 requantization gives
    expected = tir.run(batch)["logits"]
    np.testing.assert_allclose(onednn.run(batch)["logits"], expected, rtol=1e-5, atol=1e-5)
    loaded = LoadedLibrary(onednn.export_library(tmp_path / "model.so"), onednn.input_names, onednn.output_names)
    np.testing.assert_allclose(loaded.run(batch)["logits"], expected, rtol=1e-5, atol=1e-5)


@needs_vnni
def test_int8_weights_that_are_not_the_layers_own_fail_verification_naming_the_layer(chain, monkeypatch):
    model, qdq, int8_ids, _ = chain
    real_pack = _onednn.pack_weights

    def wrong_for_conv2(spec, weights):
        return real_pack(spec, -weights if spec.layer == 2 else weights)

    monkeypatch.setattr(_onednn, "pack_weights", wrong_for_conv2)
    # VerifyPlan packs the layer's weights again to compare: only the pass that builds the graph gets the wrong ones
    monkeypatch.setattr("precsearch.tvm._verify._onednn", _Unwrapped(real_pack))
    with pytest.raises(CompileError) as caught:
        build_plan(model, qdq, int8_ids, options=ONEDNN_INT8)
    assert "conv2" in str(caught.value) and "oneDNN int8" in str(caught.value)


class _Unwrapped:
    """The _onednn module as VerifyPlan sees it, with the real pack_weights."""

    def __init__(self, pack):
        self.pack_weights = pack

    def __getattr__(self, name):
        return getattr(_onednn, name)


def test_int8_convs_go_to_onednn_by_default_only_where_the_cpu_has_vnni(chain):
    model, qdq, int8_ids, _ = chain
    built = build_plan(model, qdq, int8_ids, options=CompileOptions(conv_backend="onednn"))
    int8_backends = {row.backend for row in built.rows if row.dtype == "int8"}
    assert int8_backends == ({"onednn"} if _onednn.int8_fast_on(resolve_target(CompileOptions())) else {"tir"})


@needs_vnni
def test_int8_convs_below_the_mac_threshold_stay_tir_and_say_why(chain):
    model, qdq, int8_ids, batch = chain
    macs = {layer.id: layer.macs for layer in model.layers}
    threshold = max(macs["conv0"], macs["conv2"])  # conv2 or conv0 (whichever is smaller) falls below it
    options = CompileOptions(conv_backend="onednn", onednn_int8=True, onednn_int8_min_macs=threshold)
    built = build_plan(model, qdq, int8_ids, options=options)
    for layer in ("conv0", "conv2"):
        row = next(r for r in built.rows if r.id == layer)
        assert row.backend == ("onednn" if macs[layer] >= threshold else "tir")
        if macs[layer] < threshold:
            assert "onednn_int8_min_macs" in built.onednn_skipped[layer]
    tir = build_plan(model, qdq, int8_ids, options=CompileOptions(conv_backend="tir"))
    np.testing.assert_allclose(built.run(batch)["logits"], tir.run(batch)["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(HAS_VNNI, reason="this CPU has VNNI: int8 convs on oneDNN are built (tested above)")
def test_int8_convs_on_onednn_are_refused_without_vnni(chain):
    model, qdq, int8_ids, _ = chain
    with pytest.raises(ConfigError, match="need a CPU with VNNI"):
        build_plan(model, qdq, int8_ids, options=ONEDNN_INT8)


def _swish(v):
    return v / (1.0 + np.exp(-v))


@needs_vnni
@pytest.mark.parametrize("requantized", [True, False], ids=["u8 out", "float out"])
def test_the_bridge_runs_an_int8_convs_dequantize_swish_and_quantize_as_the_qdq_model_does(requantized):
    """conv → Q(s1, z1) → DQ → SiLU → Q(s2, z2) as one primitive: the u8 values of every step as in integer arithmetic
    (a step may differ only where a value lies within 1e-3 of a rounding tie: oneDNN's sigmoid is not numpy's)."""
    ic, oc, size, block, src_zero = 16, 32, 9, 16, 3
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (1, ic, size, size)).astype(np.uint8)
    w = rng.integers(-127, 128, (oc, ic, 3, 3)).astype(np.int8)
    weight_scales = rng.uniform(0.001, 0.01, oc).astype(np.float32)
    # the bridge holds float32 scales
    src_scale, mid_scale, dst_scale = (float(np.float32(v)) for v in (0.02, 0.05, 0.03))
    mid_zero, dst_zero = 120, 9
    acc = _integer_conv(x, w, src_zero, 1, (1, 1, 1, 1), 1)
    real = acc * (np.float32(src_scale) * weight_scales).astype(np.float64)[None, :, None, None]
    mid_steps = real / np.float32(mid_scale)
    mid = np.clip(np.round(mid_steps), -mid_zero, 255 - mid_zero) * np.float32(mid_scale)
    activated = _swish(mid)
    dst_steps = activated / np.float32(dst_scale)
    near_tie = (np.abs(np.abs(mid_steps - np.floor(mid_steps)) - 0.5) < 1e-3) | (
        np.abs(np.abs(dst_steps - np.floor(dst_steps)) - 0.5) < 1e-3)
    assert near_tie.mean() < 0.01
    if requantized:
        expected, out_dtype = np.clip(np.round(dst_steps) + dst_zero, 0, 255).astype(np.uint8), "uint8"
    else:
        expected, out_dtype = activated.astype(np.float32), "float32"
    spec = _onednn.ConvSpec((1, ic, size, size), expected.shape, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, block, block,
                            post_op="swish", threads=2, dtype="int8" if requantized else "int8_float_out",
                            src_zero=src_zero, dst_zero=dst_zero if requantized else 0, src_scale=src_scale,
                            dst_scale=dst_scale if requantized else 1.0,
                            weight_scales=tuple(float(v) for v in weight_scales), mid_scale=mid_scale,
                            mid_zero=mid_zero)
    assert _onednn.spec_from_config(spec.config(), spec.post()) == spec
    assert not _onednn.implementation(spec).startswith("ref")
    out = tvm.runtime.tensor(np.zeros(models.blocked(expected, block).shape, dtype=out_dtype))
    tvm.get_global_func(_onednn.CONV_FUNCTION)(
        tvm.runtime.tensor(models.blocked(x, block)), tvm.runtime.tensor(_onednn.pack_weights(spec, w)),
        tvm.runtime.tensor(np.zeros(oc, np.float32)), tvm.runtime.tensor(spec.config()),
        tvm.runtime.tensor(spec.post()), out)
    tie = models.blocked(near_tie, block)
    if requantized:
        difference = np.abs(out.numpy().astype(int) - models.blocked(expected, block).astype(int))
        assert difference[~tie].max() == 0 and (difference[tie] <= 1).all()
    else:
        np.testing.assert_allclose(out.numpy()[~tie], models.blocked(expected, block)[~tie], rtol=1e-5, atol=1e-5)


def _silu_fanout_model():
    """conv0 → SiLU, whose output is a graph output ("features") and feeds conv1; conv1 → SiLU → "output"."""
    b = models._Builder(21)
    x = b.conv("conv0", "input", 16, 16)
    silu = b.op("Mul", [x, b.op("Sigmoid", [x], "sigmoid0")], "silu0", out="features")
    y = b.conv("conv1", silu, 16, 16)
    b.op("Mul", [y, b.op("Sigmoid", [y], "sigmoid1")], "silu1", out="output")
    return b.model("silu_fanout", [models._input(16, 8)],
                   [models._output([1, 16, 8, 8]), models._output([1, 16, 8, 8], "features")])


@needs_vnni
@pytest.mark.parametrize("builder", [models.activations_model, _silu_fanout_model], ids=["chain", "fan-out"])
def test_int8_convs_on_onednn_absorb_the_activation_after_their_quantization(builder, tmp_path):
    """SiLU / hard-swish after an int8 conv become post-ops of its primitive, quantized again when a quantization
    is their only consumer, else float (conv1's SiLU output is the graph's "output": float; ORT's quantizer gives
    "features" a Q/DQ pair like any other tensor); the outputs stay ONNX Runtime's on the QDQ model."""
    model = load_model(models.save(builder(), tmp_path, "m"))
    batches = list(image_batches(model, None, count=3))
    qdq = build_qdq_model(model, calibrate(model, batches[:2]), parse_plan("none", model))
    int8_ids = parse_plan("none", model).int8_ids(model)
    imported = import_qdq_model(qdq, model)
    mod = _front(model, imported, int8_ids, ONEDNN_INT8)
    specs = {spec.layer: spec for spec in (_onednn.spec_from_config(call.args[1].fields[3].value.numpy(),
                                                                     call.args[1].fields[4].value.numpy())
                                           for call in _calls(mod, "relax.call_dps_packed"))}
    if builder is models.activations_model:
        # HardSigmoid (after conv1) has no oneDNN post-op; conv3's output is the graph's (quantized, then a DQ)
        assert {i: (s.post_op, s.dtype, s.mid_zero >= 0) for i, s in specs.items()} == {
            0: ("swish", "int8", True), 1: ("none", "int8", False), 2: ("hardswish", "int8", True),
            3: ("none", "int8", False)}
        assert len(_calls(mod, "relax.sigmoid")) == 0
    else:
        assert {i: (s.post_op, s.dtype, s.mid_zero >= 0) for i, s in specs.items()} == {
            0: ("swish", "int8", True), 1: ("swish", "int8_float_out", True)}
    fused = build_plan(model, qdq, int8_ids, options=ONEDNN_INT8)
    apart = build_plan(model, qdq, int8_ids, options=CompileOptions(conv_backend="onednn", onednn_int8=True,
                                                                     onednn_int8_activation=False))
    assert {row.id: row.fused for row in fused.rows}["conv0"] == "swish"
    assert all(not row.fused for row in apart.rows)
    session = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"])
    step = float(np.max(np.abs(session.run(["output"], batches[2])[0]))) / 255
    for built in (fused, apart):
        difference = np.abs(built.run(batches[2])["output"] - session.run(["output"], batches[2])[0])
        # within one quantization step of the output everywhere, and equal almost everywhere
        assert difference.max() <= 1.01 * step * 2 and (difference <= 1e-4).mean() > 0.95


@needs_vnni
@pytest.mark.parametrize("kernel", [1, 3])
def test_an_int8_conv_with_folded_zero_points_runs_the_kernel_of_a_conv_without_them(kernel):
    """oneDNN 3.2 sends a conv with zero points to its older jit kernels (on AMX: 323 GMAC/s against brgconv's
    1097 measured on a 96→96 3×3); folded, the conv is the one oneDNN runs when there are none."""
    pads = (kernel // 2,) * 4

    def spec(src_zero, dst_zero, variant):
        return _onednn.ConvSpec((1, 64, 20, 20), (1, 64, 20, 20), (kernel, kernel), (1, 1), pads, (1, 1), 1, 16, 16,
                                "swish", threads=2, dtype="int8", src_zero=src_zero, dst_zero=dst_zero,
                                src_scale=0.02, dst_scale=0.05, weight_scales=(0.01,) * 64, variant=variant)

    def kernel_name(implementation):
        return implementation.removeprefix("reorder+").removesuffix("+reorder")

    without_zero = kernel_name(_onednn.implementation(spec(0, 0, -1)))
    assert kernel_name(_onednn.implementation(spec(5, 7, 1))) == without_zero
    assert _onednn.with_fastest_variant(spec(5, 7, -1)).variant in (0, 1)  # timed: both variants build
    assert _onednn.with_fastest_variant(spec(0, 0, -1)).variant == -1  # nothing to fold


@needs_vnni
def test_tir_loops_of_a_onednn_build_run_on_the_openmp_pool_with_the_same_outputs(chain, tmp_path, monkeypatch):
    import ctypes

    from precsearch.tvm import _openmp_loops

    model, qdq, int8_ids, batch = chain
    built = build_plan(model, qdq, int8_ids, options=ONEDNN_INT8)
    library = built.export_library(tmp_path / "model.so")

    def launch_pointer():
        return ctypes.c_void_p.in_dll(handle, "__TVMBackendParallelLaunch").value

    monkeypatch.setenv("PRECSEARCH_TIR_POOL", "tvm")  # loaded on TVM's own pool, as TVM's loader sets it
    on_tvm_pool = LoadedLibrary(library, built.input_names, built.output_names)
    handle = ctypes.CDLL(str(library), mode=getattr(os, "RTLD_NOLOAD", 4))  # the loaded library itself
    tvm_launch, _ = _openmp_loops._tvm_runtime_functions()
    assert launch_pointer() == tvm_launch
    expected = on_tvm_pool.run(batch)["logits"]
    monkeypatch.delenv("PRECSEARCH_TIR_POOL")
    assert _openmp_loops.route_parallel_loops() >= 1
    assert launch_pointer() == _onednn.load().parallel_launch_address()
    assert _openmp_loops.route_parallel_loops() == 0  # a routed module is left alone
    np.testing.assert_array_equal(on_tvm_pool.run(batch)["logits"], expected)


def test_a_dense_layer_runs_on_onednn_with_its_bias_and_gives_onnx_runtimes_outputs(tmp_path, monkeypatch):
    # the chain model's classifier: Gemm(transB=1) + bias, 16 → 10 (below MIN_DENSE_MACS, so lowered for the test)
    monkeypatch.setattr(_onednn_dense, "MIN_DENSE_MACS", 0)
    model = load_model(models.save(models.chain_model(), tmp_path, "chain"))
    plan = parse_plan("all", model)
    qdq = build_qdq_model(model, calibrate(model, image_batches(model, None, count=2)), plan)
    imported = import_qdq_model(qdq, model)
    mod = _front(model, imported, plan.int8_ids(model), ONEDNN)
    with resolve_target(ONEDNN), tvm.transform.PassContext(opt_level=3):
        mod = tvm.relax.transform.DeadCodeElimination()(OffloadDenseOneDNN(2)(mod))
    dense = [call for call in _calls(mod, "relax.call_dps_packed")
             if str(call.args[0].global_symbol) == _onednn.DENSE_FUNCTION]
    assert len(dense) == 1 and _calls(mod, "relax.matmul") == [] and _calls(mod, "relax.add") == []
    spec = _onednn.spec_from_config(dense[0].args[1].fields[3].value.numpy(), dense[0].args[1].fields[4].value.numpy())
    assert (spec.input_shape, spec.output_shape, spec.kernel) == ((1, 16, 1, 1), (1, 10, 1, 1), (1, 1))
    weights = next(init for init in model.proto.graph.initializer if init.name == "fc.weight")
    np.testing.assert_array_equal(_onednn.unpack_weights(spec, dense[0].args[1].fields[1].value.numpy()),
                                  numpy_helper.to_array(weights).reshape(10, 16, 1, 1))
    built = build_plan(model, qdq, plan.int8_ids(model), options=ONEDNN)
    assert list(built.onednn_dense) == ["16x10"]
    batch = next(iter(image_batches(model, None, count=1)))
    expected = ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, batch)[0]
    np.testing.assert_allclose(built.run(batch)["logits"], expected, rtol=1e-4, atol=1e-4)
    loaded = LoadedLibrary(built.export_library(tmp_path / "model.so"), built.input_names, built.output_names)
    np.testing.assert_allclose(loaded.run(batch)["logits"], expected, rtol=1e-4, atol=1e-4)


def test_a_small_dense_layer_a_matmul_of_two_activations_and_the_option_off_stay_tir(tmp_path, monkeypatch):
    # gemm_tail at size 8: fc0 is 256 × 32, fc1 32 × 10, both below MIN_DENSE_MACS
    model = load_model(models.save(models.gemm_tail_model(), tmp_path, "gemm_tail"))
    plan = parse_plan("all", model)
    qdq = build_qdq_model(model, calibrate(model, image_batches(model, None, count=2)), plan)
    assert build_plan(model, qdq, plan.int8_ids(model), options=ONEDNN).onednn_dense == {}
    monkeypatch.setattr(_onednn_dense, "MIN_DENSE_MACS", 0)
    assert set(build_plan(model, qdq, plan.int8_ids(model), options=ONEDNN).onednn_dense) == {"256x32", "32x10"}
    off = CompileOptions(conv_backend="onednn", onednn_int8=False, onednn_dense=False)
    assert build_plan(model, qdq, plan.int8_ids(model), options=off).onednn_dense == {}
    # a matmul whose right operand is computed, not a constant, has no weights to pack
    relax = tvm.relax
    bb = relax.BlockBuilder()
    a, b = relax.Var("a", relax.TensorType((4, 64), "float32")), relax.Var("b", relax.TensorType((64, 8192), "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(a, b))
        bb.emit_func_output(out)
    mod = bb.get()
    with resolve_target(ONEDNN), tvm.transform.PassContext(opt_level=3):
        tvm.ir.assert_structural_equal(OffloadDenseOneDNN(2)(mod), mod)
