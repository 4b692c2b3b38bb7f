"""bf16 convs (the plan's third state): the bridge's numbers, builds against ONNX Runtime on bf16-rounded inputs
and weights, verification, and refusals where the CPU or the backend cannot run them."""

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

import models
from precsearch.errors import CompileError, ConfigError
from precsearch.fidelity.reference import run_ort
from precsearch.model import load_model
from precsearch.model.bf16 import bf16_reference_model, round_to_bf16
from precsearch.model.data import image_batches
from precsearch.model.plan import parse_plan
from precsearch.model.quantize import build_qdq_model, calibrate
from precsearch.tvm import CompileOptions, LoadedLibrary, build_plan, resolve_target
from precsearch.tvm import _onednn

pytestmark = pytest.mark.skipif(not _onednn.available(), reason=_onednn.unavailable_reason() or "oneDNN missing")

HAS_BF16 = _onednn.available() and _onednn.bf16_fast_on(resolve_target(CompileOptions()))
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no native bf16 (AVX512-BF16 / AMX-BF16); the "
                                                     "refusal is tested instead")
UNIT_ROUNDOFF_F32 = 2.0 ** -24


def _conv(x, w, strides, pads, group):
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=list(strides), pads=list(pads), group=group)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


CASES = [  # ic, oc, size, kernel, stride, pads, groups, block
    (32, 32, 13, 3, 1, (1, 1, 1, 1), 1, 16),  # dense 3x3: AMX where the CPU has it (nhwc, reordered in and out)
    (16, 48, 9, 1, 1, (0, 0, 0, 0), 1, 16),  # pointwise
    (32, 32, 10, 3, 2, (0, 1, 1, 0), 32, 16),  # depthwise, stride 2, asymmetric padding
    (3, 16, 12, 3, 2, (1, 1, 1, 1), 1, 0),  # a first conv: plain NCHW in and out
]


@needs_bf16
@pytest.mark.parametrize("ic, oc, size, kernel, stride, pads, groups, block", CASES)
def test_the_bridge_computes_the_conv_of_bf16_rounded_inputs_and_weights_in_float32(ic, oc, size, kernel, stride,
                                                                                  pads, groups, block):
    rng = np.random.default_rng(ic + oc + size)
    x = rng.standard_normal((1, ic, size, size)).astype("float32")
    w = rng.standard_normal((oc, ic // groups, kernel, kernel)).astype("float32")
    b = rng.standard_normal(oc).astype("float32")
    expected = _conv(round_to_bf16(x), round_to_bf16(w), (stride,) * 2, pads, groups) + b.reshape(1, -1, 1, 1)
    # What is left is the order of float32 sums: at most K·u·Σ|x·w| per output (K products, u the unit roundoff).
    terms = ic // groups * kernel * kernel
    bound = 2 * terms * UNIT_ROUNDOFF_F32 * _conv(np.abs(round_to_bf16(x)), np.abs(round_to_bf16(w)), (stride,) * 2,
                                                  pads, groups) + 1e-7
    spec = _onednn.ConvSpec((1, ic, size, size), expected.shape, (kernel, kernel), (stride, stride), pads, (1, 1),
                            groups, block, block, threads=2, dtype="bfloat16")
    packed = _onednn.pack_weights(spec, w)
    np.testing.assert_array_equal(_onednn.unpack_weights(spec, packed), round_to_bf16(w))
    out = tvm.runtime.tensor(np.zeros(models.blocked(expected, block).shape, dtype="float32"))
    tvm.get_global_func(_onednn.CONV_FUNCTION)(
        tvm.runtime.tensor(models.blocked(x, block)), tvm.runtime.tensor(packed), tvm.runtime.tensor(b),
        tvm.runtime.tensor(spec.config()), tvm.runtime.tensor(spec.post()), out)
    error = np.abs(out.numpy() - models.blocked(expected, block))
    assert (error <= models.blocked(bound, block)).all(), float((error / models.blocked(bound, block)).max())
    # and it is bf16: the float32 conv of the unrounded values is a hundred times farther away
    exact = _conv(x, w, (stride,) * 2, pads, groups) + b.reshape(1, -1, 1, 1)
    assert np.abs(models.blocked(exact, block) - out.numpy()).max() > 100 * error.max()
    assert _onednn.spec_from_config(spec.config(), spec.post()) == spec
    assert "bf16" in _onednn.implementation(spec) or "amx" in _onednn.implementation(spec)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    model = load_model(models.save(models.chain_model(channels=(16, 32, 32, 32, 32), size=12, seed=5),
                                   tmp_path_factory.mktemp("bf16"), "chain"))
    ranges = calibrate(model, image_batches(model, None, count=4))
    return model, ranges, image_batches(model, None, count=3, offset=4)


def _network_bound(model, reference):
    # Each conv sums K products in float32 in another order than ONNX Runtime (relative error ≤ K·u); summed
    # over the layers, with a factor 4 for what the later layers and the head carry forward.
    terms = sum(layer.in_channels // layer.groups * int(np.prod(layer.kernel)) for layer in model.layers)
    return 4 * terms * UNIT_ROUNDOFF_F32 * np.abs(reference).max()


@needs_bf16
# No int8 conv after a bf16 one: it would requantize values that differ in the last bits, and a value near a
# rounding tie may land on the other integer (the crosscheck's business, not this test's).
@pytest.mark.parametrize("float_spec, bf16_spec", [("none", "all"), ("conv0", "conv2,conv3"), ("none", "conv3")])
def test_a_plan_with_bf16_convs_gives_what_onnx_runtime_gives_on_bf16_rounded_convs(chain, float_spec, bf16_spec):
    model, ranges, batches = chain
    plan = parse_plan(float_spec, model, bf16_spec)
    qdq = build_qdq_model(model, ranges, plan) if plan.int8_ids(model) else model.proto
    built = build_plan(model, qdq, plan)
    assert built.bf16_layers == plan.bf16_layer_ids(model)
    rows = {row.id: row for row in built.rows}
    for layer_id in plan.bf16_ids:
        assert (rows[layer_id].dtype, rows[layer_id].backend) == ("bfloat16", "onednn")
        assert "bf16" in built.onednn_kernels[layer_id] or "amx" in built.onednn_kernels[layer_id]
    assert {i for i, row in rows.items() if row.dtype == "int8"} == set(plan.int8_ids(model))
    reference = run_ort(bf16_reference_model(qdq, plan.bf16_ids), batches, optimized=False)
    unrounded = run_ort(qdq, batches, optimized=False)
    for batch, expected, float_out in zip(batches, reference, unrounded):
        got = built.run(batch)["logits"]
        bound = _network_bound(model, expected["logits"])
        error = np.abs(got - expected["logits"]).max()
        assert error <= bound
        # the bf16 rounding itself is visible: the unrounded model is a hundred times farther away
        assert np.abs(got - float_out["logits"]).max() > 100 * error


@needs_bf16
def test_bf16_weights_that_are_not_the_layers_own_fail_verification_naming_the_layer(chain, monkeypatch):
    model, _, _ = chain
    plan = parse_plan("all", model, "conv1")
    real_pack = _onednn.pack_weights
    monkeypatch.setattr(_onednn, "pack_weights",
                        lambda spec, weights: real_pack(spec, weights * 1.5 if spec.layer == 1 else weights))
    with pytest.raises(CompileError) as caught:
        build_plan(model, model.proto, plan)
    assert "conv1" in str(caught.value) and "oneDNN bf16" in str(caught.value)


@needs_bf16
def test_a_bf16_conv_onednn_runs_only_with_its_reference_kernel_is_an_error_not_a_float32_conv(chain, monkeypatch):
    model, _, _ = chain
    monkeypatch.setattr(_onednn, "implementation", lambda spec: "reorder+ref:any")
    with pytest.raises(CompileError, match="reference kernel for this bf16 conv") as caught:
        build_plan(model, model.proto, parse_plan("all", model, "conv2"))
    assert caught.value.layer_id == "conv2"


def test_bf16_convs_are_refused_on_a_target_without_bf16_and_without_onednn(chain):
    model, _, _ = chain
    plan = parse_plan("all", model, "conv2")
    no_bf16 = CompileOptions(target={"kind": "llvm", "mcpu": "znver3", "num-cores": 2})
    with pytest.raises(ConfigError, match=r"^bf16 convs need a CPU with AVX512-BF16 or AMX-BF16; this target has "
                                          r"neither \(plan runs conv2 and 0 more in bf16\)$"):
        build_plan(model, model.proto, plan, options=no_bf16)
    if HAS_BF16:
        with pytest.raises(ConfigError, match=r"^bf16 convs run on oneDNN: --conv-backend tir leaves no oneDNN conv"):
            build_plan(model, model.proto, plan, options=CompileOptions(conv_backend="tir"))


@needs_bf16
def test_both_bf16_variants_compute_the_same_conv_and_the_build_keeps_the_one_it_timed(chain, tmp_path):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 32, 13, 13)).astype("float32")
    w = rng.standard_normal((32, 32, 3, 3)).astype("float32")
    b = np.zeros(32, dtype="float32")
    base = _onednn.ConvSpec((1, 32, 13, 13), (1, 32, 13, 13), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 16, 16,
                            threads=2, dtype="bfloat16")
    outputs, kernels = [], []
    for variant in (0, 1):
        spec = dataclasses.replace(base, variant=variant)
        out = tvm.runtime.tensor(np.zeros((1, 2, 13, 13, 16), dtype="float32"))
        tvm.get_global_func(_onednn.CONV_FUNCTION)(
            tvm.runtime.tensor(models.blocked(x, 16)), tvm.runtime.tensor(_onednn.pack_weights(spec, w)),
            tvm.runtime.tensor(b), tvm.runtime.tensor(spec.config()), tvm.runtime.tensor(spec.post()), out)
        outputs.append(out.numpy())
        kernels.append(_onednn.implementation(spec))
    # the same bf16 conv either way (float32 sums in another order), by another kernel where the CPU has AMX
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    assert not kernels[0].endswith("+reorder")  # variant 0 reads and writes the graph's layout
    assert kernels[1].endswith("+reorder")  # variant 1 reorders into nhwc and back (AMX kernels where present)
    assert _onednn.with_fastest_variant(base).variant in (0, 1)
    # the variant is part of the config a call carries, so a library loaded elsewhere runs the timed one
    chosen = _onednn.with_fastest_variant(base)
    assert _onednn.spec_from_config(chosen.config(), chosen.post()).variant == chosen.variant
    model, _, batches = chain
    built = build_plan(model, model.proto, parse_plan("all", model, "all"))
    loaded = LoadedLibrary(built.export_library(tmp_path / "model.so"), built.input_names, built.output_names)
    np.testing.assert_array_equal(loaded.run(batches[0])["logits"], built.run(batches[0])["logits"])


CHAINS = [  # model, the convs that read bf16 when every conv runs bf16
    # conv0 feeds conv1 and conv2 directly; they feed an Add (float32 there), conv3 reads the Add
    (models.residual_model, ("conv1", "conv2")),
    # conv0 → three chained 5x5 max-pools → Concat of all four → conv1: bf16 throughout
    (models.sppf_model, ("conv1",)),
    # conv1 → nearest Resize → Concat with conv0's output → conv2
    (lambda: models.resize_model("nearest"), ("conv1", "conv2")),
    # a linear Resize computes new values: its Concat stays float32, and so does conv0's output, which it reads
    (lambda: models.resize_model("linear"), ()),
]


@needs_bf16
@pytest.mark.parametrize("layout", ["nhwc", "blocked"])
@pytest.mark.parametrize("make, chained_ids", CHAINS)
def test_bf16_tensors_flow_from_bf16_convs_to_bf16_convs_through_value_moves_and_the_values_stay_the_same(
        make, chained_ids, layout, tmp_path):
    model = load_model(models.save(make(), tmp_path, "model"))
    plan = parse_plan("all", model, "all")
    batches = image_batches(model, None, count=2)
    options = CompileOptions(activation_layout=layout)
    chained = build_plan(model, model.proto, plan, options=options)
    unchained = build_plan(model, model.proto, plan, options=dataclasses.replace(options, onednn_bf16_chains=False))
    assert chained.bf16_chained == chained_ids and unchained.bf16_chained == ()
    if layout == "nhwc":  # no rounding pass left in front of a chained conv
        assert tuple(layer for layer, kernel in chained.onednn_kernels.items()
                     if not kernel.startswith("reorder+")) == chained_ids
    output = chained.output_names[0]
    reference = run_ort(bf16_reference_model(model.proto, plan.bf16_ids), batches, optimized=False)
    for batch, expected in zip(batches, reference):
        got = chained.run(batch)[output]
        # a conv rounds its output to bf16 where its readers would have: the same values either way; in NHWC
        # the same kernels, so the same bits (blocked, each build times its own variant per conv: the same bf16
        # convs, float32 sums in another order)
        same = np.testing.assert_array_equal if layout == "nhwc" else \
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        same(got, unchained.run(batch)[output])
        assert np.abs(got - expected[output]).max() <= _network_bound(model, expected[output])
