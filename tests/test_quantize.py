import json

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

import models
import precsearch.model.quantize as quantize
from precsearch.model.data import image_batches
from precsearch.errors import ConfigError, DataError
from precsearch.fidelity.reference import run_ort
from precsearch.model import load_model, resolve_model
from precsearch.model.plan import parse_plan
from precsearch.model.quantize import build_qdq_model, calibrate, calibration_key, output_steps, user_int8_model


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    model = load_model(models.save(models.chain_model(), tmp_path_factory.mktemp("m"), "chain"))
    batches = image_batches(model, None, count=8)
    return model, batches, calibrate(model, batches)


def _producers(proto):
    return {out: node for node in proto.graph.node for out in node.output}


def _weight_source(proto, conv_id):
    """('dq', DequantizeLinear node, int8 initializer) or ('float', initializer)."""
    conv = next(node for node in proto.graph.node if node.name == conv_id)
    inits = {init.name: init for init in proto.graph.initializer}
    if conv.input[1] in inits:
        return "float", inits[conv.input[1]]
    dq = _producers(proto)[conv.input[1]]
    assert dq.op_type == "DequantizeLinear"
    return "dq", dq, inits[dq.input[0]]


def test_minmax_ranges_cover_convs_and_outputs(chain):
    model, batches, ranges = chain
    assert ranges.method == "minmax"
    data = np.concatenate([b["input"] for b in batches])
    assert ranges.ranges["input"] == (float(data.min()), float(data.max()))
    for node in model.proto.graph.node:
        if node.op_type == "Conv":
            assert node.input[0] in ranges.ranges and node.output[0] in ranges.ranges
    assert "logits" in ranges.ranges
    reference = np.concatenate([out["logits"] for out in run_ort(model.proto, batches)])
    lo, hi = ranges.ranges["logits"]
    assert lo == pytest.approx(float(reference.min()), abs=1e-6) and hi == pytest.approx(float(reference.max()), abs=1e-6)


def test_calibration_cache_hit_runs_nothing(chain, tmp_path, monkeypatch):
    model, batches, _ = chain
    first = calibrate(model, batches, cache_dir=tmp_path)
    files = list(tmp_path.glob("calibration-*.json"))
    assert [f.name for f in files] == [f"calibration-{calibration_key(model, batches, 'minmax')}.json"]
    assert json.loads(files[0].read_text())["onnxruntime"] == onnxruntime.__version__

    def forbidden(*args, **kwargs):
        raise AssertionError("calibration ran although the cache holds the result")

    monkeypatch.setattr(quantize, "create_calibrator", forbidden)
    second = calibrate(model, batches, cache_dir=tmp_path)
    assert second == first
    # The rebuilt ORT TensorsData is exact, so the QDQ models are byte-identical.
    plan = parse_plan("none", model)
    assert build_qdq_model(model, second, plan).SerializeToString() == build_qdq_model(model, first, plan).SerializeToString()
    # Other data or another method is another key: it must calibrate again.
    with pytest.raises(AssertionError, match="calibration ran"):
        calibrate(model, batches[:4], cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="calibration ran"):
        calibrate(model, batches, method="percentile", cache_dir=tmp_path)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_round_trip_exactly(chain, tmp_path, method):
    model, batches, minmax = chain
    ranges = calibrate(model, batches[:2], method=method, cache_dir=tmp_path)
    again = calibrate(model, batches[:2], method=method, cache_dir=tmp_path)
    assert again.ranges == ranges.ranges and again.method == method
    for name, attrs in ranges.tensor_data.items():
        for attr, value in attrs.items():
            other = again.tensor_data[name][attr]
            assert type(other) is type(value) and np.asarray(other).dtype == np.asarray(value).dtype
            np.testing.assert_array_equal(other, value)
    data = ranges.to_tensors_data()
    assert data.calibration_method.name.lower() == method
    assert set(data.keys()) == set(minmax.ranges)


def test_bad_method_and_no_data(chain):
    model, batches, _ = chain
    with pytest.raises(ConfigError, match=r"The 'method' parameter of calibrate must be one of \['entropy', 'minmax', 'percentile'\]; got 'kl' instead"):
        calibrate(model, batches, method="kl")
    with pytest.raises(DataError, match="at least one batch"):
        calibrate(model, [])


def test_qdq_model_quantizes_exactly_the_int8_convs(chain):
    model, batches, ranges = chain
    qdq = build_qdq_model(model, ranges, parse_plan("conv1", model))
    onnx.checker.check_model(qdq)
    assert {node.op_type for node in qdq.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}
    assert not {"QLinearConv", "ConvInteger"} & {node.op_type for node in qdq.graph.node}
    assert [n.name for n in qdq.graph.node if n.op_type == "Conv"] == ["conv0", "conv1", "conv2"]
    for conv_id in ("conv0", "conv2"):
        kind, dq, weight = _weight_source(qdq, conv_id)
        assert kind == "dq" and weight.data_type == onnx.TensorProto.INT8 and list(weight.dims)[0] == 16
        assert onnx.helper.get_attribute_value(dq.attribute[0]) == 0  # per-channel on axis 0
        scale = numpy_helper.to_array(next(i for i in qdq.graph.initializer if i.name == dq.input[1]))
        zero = numpy_helper.to_array(next(i for i in qdq.graph.initializer if i.name == dq.input[2]))
        assert scale.shape == (16,) and np.all(scale > 0) and np.all(zero == 0)
    kind, weight = _weight_source(qdq, "conv1")
    assert kind == "float" and weight.name == "conv1.weight" and weight.data_type == onnx.TensorProto.FLOAT
    # Activations are uint8: the input's Q/DQ pair.
    q_input = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    zp = next(i for i in qdq.graph.initializer if i.name == q_input.input[2])
    assert zp.data_type == onnx.TensorProto.UINT8


def test_qdq_model_is_deterministic_and_leaves_the_model_alone(chain):
    model, batches, ranges = chain
    before = model.proto.SerializeToString()
    plan = parse_plan("conv0", model)
    a = build_qdq_model(model, ranges, plan).SerializeToString()
    assert a == build_qdq_model(model, ranges, plan).SerializeToString()
    assert model.proto.SerializeToString() == before


def test_qdq_numerics_follow_the_float_model(chain):
    model, batches, ranges = chain
    evaluation = image_batches(model, None, count=8, offset=8)
    reference = np.concatenate([out["logits"] for out in run_ort(model.proto, evaluation)]).ravel()
    for spec in ("none", "conv1"):
        got = np.concatenate([out["logits"] for out in run_ort(build_qdq_model(model, ranges, parse_plan(spec, model)), evaluation)]).ravel()
        cosine = float(got @ reference / (np.linalg.norm(got) * np.linalg.norm(reference)))
        assert cosine > 0.99
        assert not np.array_equal(got, reference)
    everything_float = build_qdq_model(model, ranges, parse_plan("all", model))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in everything_float.graph.node)
    got = np.concatenate([out["logits"] for out in run_ort(everything_float, evaluation)]).ravel()
    np.testing.assert_array_equal(got, reference)


def test_residual_add_between_int8_and_float_convs(tmp_path):
    model = load_model(models.save(models.residual_model(), tmp_path, "res"))
    batches = image_batches(model, None, count=4)
    qdq = build_qdq_model(model, calibrate(model, batches), parse_plan("conv2", model))
    producers = _producers(qdq)
    add = next(n for n in qdq.graph.node if n.op_type == "Add")
    # One input comes from int8 conv1 through Q/DQ, its Relu folded into the conv's output quantization (as
    # quantize_static folds it); the other straight from float conv2, whose Relu stays float.
    dq = producers[add.input[0]]
    assert dq.op_type == "DequantizeLinear" and producers[producers[dq.input[0]].input[0]].name == "conv1"
    # relu0 and relu1 follow int8 convs and are folded; relu2 follows the Add and stays.
    assert [n.name for n in qdq.graph.node if n.op_type == "Relu"] == ["relu2"]
    float_relu = build_qdq_model(model, calibrate(model, batches), parse_plan("conv0,conv1", model))
    assert sorted(n.name for n in float_relu.graph.node if n.op_type == "Relu") == ["relu0", "relu1", "relu2"]
    assert producers[add.input[1]].name == "conv2"
    assert _weight_source(qdq, "conv2")[0] == "float" and _weight_source(qdq, "conv1")[0] == "dq"
    out = run_ort(qdq, batches)
    assert np.isfinite(out[0]["output"]).all()


def test_output_steps(chain):
    model, _, ranges = chain
    steps = output_steps(model, ranges)
    lo, hi = ranges.ranges["logits"]
    assert set(steps) == {"logits"}
    assert steps["logits"] == pytest.approx((max(hi, 0) - min(lo, 0)) / 255) and steps["logits"] > 0
    constant = quantize.CalibrationRanges(method="minmax", ranges={"logits": (0.0, 0.0)})
    assert output_steps(model, constant)["logits"] == quantize.MIN_OUTPUT_STEP
    with pytest.raises(DataError, match="no entry for graph output 'logits'"):
        output_steps(model, quantize.CalibrationRanges(method="minmax", ranges={}))


def test_real_model_qdq_is_valid():
    path, shapes, preset = resolve_model("mobilenetv3-textcls")
    model = load_model(path, shapes)
    batches = image_batches(model, preset, count=4)
    ranges = calibrate(model, batches)
    qdq = build_qdq_model(model, ranges, parse_plan("Conv@0,Conv@52", model))
    onnx.checker.check_model(qdq)
    kinds = {layer.id: _weight_source(qdq, layer.id)[0] for layer in model.layers}
    assert [k for k, v in kinds.items() if v == "float"] == ["Conv@0", "Conv@52"]
    assert sum(v == "dq" for v in kinds.values()) == 51
    outputs = run_ort(qdq, batches)
    probabilities = outputs[0][model.output_names[0]]
    assert probabilities.shape == (1, 2) and probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    assert 0 < output_steps(model, ranges)[model.output_names[0]] <= 1 / 255 + 1e-9


def test_user_int8_model_is_quantize_static_with_its_defaults(chain, tmp_path, monkeypatch):
    model, batches, _ = chain
    user = user_int8_model(model, batches, cache_dir=tmp_path)
    ops = [node.op_type for node in user.graph.node]
    # Not only Conv: the Gemm and the pooling are quantized too, int8 activations, per-channel weights.
    gemm = next(node for node in user.graph.node if node.op_type == "Gemm")
    assert _producers(user)[gemm.input[0]].op_type == "DequantizeLinear"
    assert ops.count("QuantizeLinear") > [n.op_type for n in
                                          build_qdq_model(model, calibrate(model, batches), parse_plan("none", model))
                                          .graph.node].count("QuantizeLinear")
    zero_points = {init.name: init for init in user.graph.initializer if init.name.endswith("zero_point")}
    assert {init.data_type for init in zero_points.values()} >= {onnx.TensorProto.INT8}
    kind, dq, weight = _weight_source(user, "conv1")
    assert kind == "dq" and len(numpy_helper.to_array(next(i for i in user.graph.initializer
                                                           if i.name == dq.input[1]))) == 16
    # Cached: the second call quantizes nothing.
    monkeypatch.setattr("onnxruntime.quantization.quantize_static",
                        lambda *a, **k: pytest.fail("quantize_static ran again"))
    assert user_int8_model(model, batches, cache_dir=tmp_path).SerializeToString() == user.SerializeToString()


def test_user_int8_model_excludes_nodes(chain):
    model, batches, _ = chain
    user = user_int8_model(model, batches, nodes_to_exclude=["conv1"])
    assert _weight_source(user, "conv1")[0] == "float" and _weight_source(user, "conv0")[0] == "dq"
