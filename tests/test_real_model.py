"""End to end on the real MobileNetV3 text-angle classifier that ships in rapidocr-onnxruntime.

Its conv weights are Constant nodes, its BatchNorms are unfused and its input is
dynamic: the packaged-model entry fixes it to 1x3x48x192.
"""

import copy
import dataclasses
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from precsearch.compile import build_plan
from precsearch.data import image_batches
from precsearch.evaluate import run_ort
from precsearch.model import load_model, resolve_model
from precsearch.plan import parse_plan
from precsearch.quantize import build_qdq_model, calibrate

pytestmark = pytest.mark.slow

MODEL = "mobilenetv3-textcls"
ALTERNATING = ",".join(f"Conv@{i}" for i in range(1, 53, 2))  # every other conv float


def build(tmp_path, float_spec, *extra):
    result = subprocess.run(
        [sys.executable, "-m", "precsearch", "build", MODEL, "--float", float_spec, "--out", tmp_path / "out",
         "--workdir", tmp_path.parent / "work", "--check", "--json", *map(str, extra)],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_all_int8_build_agrees_and_dumps_every_pass(tmp_path):
    summary = build(tmp_path, "none", "--dump-ir", tmp_path / "ir")
    assert len(summary["int8_layers"]) == 53 and summary["float_layers"] == []
    assert summary["agreement"] >= 0.999
    assert summary["agreement"] >= summary["ort_int8_agreement"]
    files = sorted((tmp_path / "ir").iterdir())
    assert summary["dump_ir"]["files"] == len(files) >= 30
    assert files[0].name == "001_precsearch.Import.py"
    assert any("ConvertLayout" in f.name for f in files) and any("VerifyPlan" in f.name for f in files)
    rows = {row["id"]: row for row in summary["layers"]}
    assert rows["Conv@0"]["layout"] == "NCHW"  # 3 input channels
    assert rows["Conv@1"]["layout"] == "NCHW8c" and rows["Conv@2"]["layout"] == "NCHW8c"  # 1x1 and depthwise
    assert summary["block_size"] == 8


def test_alternating_mixed_plan_agrees(tmp_path):
    summary = build(tmp_path, ALTERNATING)
    assert len(summary["int8_layers"]) == 27 and len(summary["float_layers"]) == 26
    rows = {row["id"]: row for row in summary["layers"]}
    assert rows["Conv@1"]["dtype"] == "float32" and rows["Conv@2"]["dtype"] == "int8"
    assert summary["agreement"] >= 0.999


def _exact_conv_value(node, initializers, producers, tensors, element):
    """Exact requantization input ``acc * sx * sw / sy`` of one output element of a QDQ conv."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    dq_x, dq_w, dq_b = (producers[name] for name in node.input[:3])
    x_q = tensors[dq_x.input[0]].astype(np.int64)
    x_scale, x_zero = float(initializers[dq_x.input[1]]), int(initializers[dq_x.input[2]])
    w_q = initializers[dq_w.input[0]].astype(np.int64)
    w_scale = initializers[dq_w.input[1]]
    bias = initializers[dq_b.input[0]].astype(np.int64)
    group = attrs.get("group", 1)
    strides, dilations = attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    padded = np.pad(x_q, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=x_zero)
    _, channel, y, x = element
    per_group = w_q.shape[1]
    first = channel // (w_q.shape[0] // group) * per_group
    kh, kw = w_q.shape[2:]
    patch = padded[0, first:first + per_group,
                   y * strides[0]:y * strides[0] + (kh - 1) * dilations[0] + 1:dilations[0],
                   x * strides[1]:x * strides[1] + (kw - 1) * dilations[1] + 1:dilations[1]]
    acc = int(((patch - x_zero) * w_q[channel]).sum() + bias[channel])
    (quantize,) = [n for n in producers.values() if n.op_type == "QuantizeLinear" and n.input[0] == node.output[0]]
    y_scale = float(initializers[quantize.input[1]])
    return acc * x_scale * float(w_scale[channel]) / y_scale, int(initializers[quantize.input[2]])


@pytest.mark.parametrize("float_spec", ["none", "Conv@0,Conv@52", ALTERNATING])
def test_every_divergence_from_ort_starts_at_a_near_tie(tmp_path_factory, float_spec):
    # Why agreement with ORT falls below 99.9 % on more images, and the strongest
    # check of the build on a real model: expose every quantized tensor, find where
    # TVM and ORT first differ on each image, and show that ORT's value there sat
    # within a hair of a .5 rounding tie (float summation order decides it), and,
    # after an int8 conv, that TVM holds the exactly rounded integer result.  The
    # network then amplifies that one-step flip into a few output steps.
    path, shapes, preset = resolve_model(MODEL)
    model = load_model(path, shapes)
    ranges = calibrate(model, image_batches(model, preset, 8), cache_dir=tmp_path_factory.getbasetemp() / "work")
    check = image_batches(model, preset, 24, offset=8)
    plan = parse_plan(float_spec, model)
    qdq = build_qdq_model(model, ranges, plan)
    quantize_nodes = [node for node in qdq.graph.node if node.op_type == "QuantizeLinear"]
    quantized = [node.output[0] for node in quantize_nodes]
    probe = copy.deepcopy(qdq)
    for name in quantized:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    probe = onnx.shape_inference.infer_shapes(probe)
    probed = dataclasses.replace(model, output_names=tuple(out.name for out in probe.graph.output))
    built = build_plan(probed, probe, plan.int8_ids(model))
    ort_probe = copy.deepcopy(probe)  # ORT also reports each quantize's float input
    for node in quantize_nodes:
        ort_probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(node.input[0]))
    initializers = {init.name: numpy_helper.to_array(init) for init in qdq.graph.initializer}
    producers = {out: node for node in qdq.graph.node for out in node.output}
    diverging_images = 0
    for reference, batch in zip(run_ort(ort_probe, check), check):
        ours = built.run(batch)
        first = next((name for name in quantized if not np.array_equal(reference[name], ours[name])), None)
        if first is None:
            continue
        diverging_images += 1
        quantize = producers[first]
        scale = float(initializers[quantize.input[1]])
        source = producers[quantize.input[0]]
        for element in map(tuple, np.argwhere(reference[first] != ours[first])):
            ort_value = float(reference[quantize.input[0]][element]) / scale
            assert abs(abs(ort_value - np.floor(ort_value)) - 0.5) < 1e-3, (first, ort_value)
            if source.op_type == "Conv" and source.name in plan.int8_ids(model):
                exact, zero = _exact_conv_value(source, initializers, producers, reference, element)
                assert abs(abs(exact - np.floor(exact)) - 0.5) < 1e-4, (source.name, exact)
                assert int(ours[first][element]) == int(np.clip(np.round(exact) + zero, 0, 255))
    assert diverging_images < len(check)
