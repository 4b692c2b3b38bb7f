"""Tracing a disagreement with ONNX Runtime to a rounding near-tie or to a compiler problem."""

import numpy as np
import pytest

import models
from precsearch.tvm import _int8_rewrite, build_plan
from precsearch.fidelity.crosscheck import AGREES, COMPILER_PROBLEM, cross_check, exact_conv_value
from precsearch.model.data import image_batches
from precsearch.fidelity.reference import run_ort
from precsearch.model import load_model
from precsearch.model.plan import parse_plan
from precsearch.model.quantize import build_qdq_model, calibrate, output_steps


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    model = load_model(models.save(models.chain_model(), tmp_path_factory.mktemp("x"), "chain"))
    ranges = calibrate(model, image_batches(model, None, 8))
    return model, ranges, image_batches(model, None, 4, offset=8)


def _check(model, ranges, batches, spec="none"):
    plan = parse_plan(spec, model)
    qdq = build_qdq_model(model, ranges, plan)
    built = build_plan(model, qdq, plan.int8_ids(model))
    steps = output_steps(model, ranges)
    outputs = [built.run(batch) for batch in batches]
    return cross_check(model, qdq, plan.int8_ids(model), batches, outputs, steps)


def test_a_correct_build_agrees(chain):
    traced = _check(*chain)
    assert traced.verdict == AGREES and traced.divergences == ()


def test_a_wrong_requantization_scale_is_a_compiler_problem_named_at_its_conv(chain, monkeypatch):
    original_scalar = _int8_rewrite._scalar

    def wrong_output_scale(params, expr, what, layer_id):
        value = original_scalar(params, expr, what, layer_id)
        return value * 1.25 if (what == "output scale" and layer_id == "conv1") else value

    monkeypatch.setattr(_int8_rewrite, "_scalar", wrong_output_scale)
    traced = _check(*chain)
    assert traced.verdict == COMPILER_PROBLEM
    assert traced.agreement.fraction < 0.999
    first = traced.divergences[0]
    assert first.producer == "conv1" and first.op_type == "Conv"
    assert first.exact is False and first.tie_distance > 0.01
    assert "compiler problem" in traced.summary() and "conv1" in traced.summary()


def test_exact_conv_value_matches_ort_float_conv_away_from_ties(chain):
    model, ranges, batches = chain
    qdq = build_qdq_model(model, ranges, parse_plan("none", model))
    import copy

    import onnx
    from onnx import numpy_helper

    probe = copy.deepcopy(qdq)
    conv = next(node for node in probe.graph.node if node.name == "conv1")
    producers = {out: node for node in probe.graph.node for out in node.output}
    quantize = next(n for n in probe.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == conv.output[0])
    for name in (producers[conv.input[0]].input[0], conv.output[0]):
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    tensors = run_ort(probe, batches[:1])[0]
    initializers = {init.name: numpy_helper.to_array(init) for init in probe.graph.initializer}
    y_scale = float(initializers[quantize.input[1]])
    for element in [(0, 0, 0, 0), (0, 5, 7, 3), (0, 15, 15, 15)]:
        exact, _ = exact_conv_value(conv, initializers, producers, tensors, element)
        assert exact == pytest.approx(float(tensors[conv.output[0]][element]) / y_scale, abs=1e-3)


def test_a_bf16_rounding_flip_is_rounding_only_where_the_two_runtimes_agree_to_float32_noise():
    from precsearch.fidelity.crosscheck import BF16_INPUT, _bf16_divergence
    from precsearch.model.bf16 import round_to_bf16

    step = 2.0 ** -7  # the bf16 step between 1.0 and 2.0 (8 significant bits)
    tie = np.float32(1.0 + step / 2)  # halfway between the bf16 neighbours 1.0 and 1.0078125
    ref = np.array([[tie, 1.5, 4.0]], dtype=np.float32)
    ours = ref.copy()
    ours[0, 0] = np.nextafter(tie, np.float32(2))  # one float32 step above the tie: the other neighbour
    assert round_to_bf16(ref)[0, 0] != round_to_bf16(ours)[0, 0]
    near = _bf16_divergence(3, "t", "conv2", ref, ours)
    assert (near.batch, near.producer, near.op_type, near.elements) == (3, "conv2", BF16_INPUT, 1)
    assert near.near_tie and near.tie_distance < 1e-7 and near.explained
    # a value near zero kept as a denormal on one side, flushed on the other: a whole bf16 step of its own, nothing
    # at the tensor's scale
    tiny = ref.copy()
    tiny[0, 1] = np.float32(1e-40)
    flushed = tiny.copy()
    flushed[0, 1] = 0.0
    assert _bf16_divergence(0, "t", "conv2", tiny, flushed).explained
    # two bf16 steps apart: no float32 noise moves a value that far
    far = ref.copy()
    far[0, 1] = np.float32(1.5 + 2 * step)
    off = _bf16_divergence(0, "t", "conv2", ref, far)
    assert not off.near_tie and off.tie_distance == pytest.approx(2 * step / 4.0) and not off.explained


def test_a_flip_after_float_ops_is_rounding_within_float32_noise_at_the_tensors_scale(chain, monkeypatch):
    # conv1 float: its ReLU output is quantized for the int8 conv2, by float arithmetic that ORT and TVM sum in
    # another order.  A flipped element there is rounding if ORT's value sat within 1e-5 of the tensor's largest
    # value (in steps) of a tie, wider than the 1e-3 steps allowed after an int8 conv; far from a tie it is not.
    from onnx import numpy_helper

    from precsearch.fidelity import crosscheck

    model, ranges, batches = chain
    plan = parse_plan("conv1", model)
    qdq = build_qdq_model(model, ranges, plan)
    producers = {out: node for node in qdq.graph.node for out in node.output}
    quantize = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear"
                    and producers.get(n.input[0]) is not None and producers[n.input[0]].name != "conv1"
                    and "conv1" in {p.name for p in qdq.graph.node if p.output[0] in producers[n.input[0]].input})
    _, ort_probe, _ = crosscheck._probe_models(qdq)
    ref = run_ort(ort_probe, batches[:1])[0]
    scale = float(numpy_helper.to_array(next(i for i in qdq.graph.initializer if i.name == quantize.input[1])))
    steps = ref[quantize.input[0]].astype(np.float64) / scale
    distance = np.abs(np.abs(steps - np.floor(steps)) - 0.5)
    window = crosscheck.FLOAT_TIE_RTOL * float(np.abs(ref[quantize.input[0]]).max()) / scale
    assert window > 1.5e-3  # a u8 ReLU output: the tensor's largest value is 100-255 steps
    between = np.argwhere((distance > 1e-3) & (distance < window))
    far = np.argwhere(distance > 0.3)
    assert len(between) and len(far)
    real_build = crosscheck.build_plan

    def flipping_build(element):
        def build(*args, **kwargs):
            built = real_build(*args, **kwargs)
            run = built.run

            def run_flipped(batch):
                outputs = dict(run(batch))
                flipped = outputs[quantize.output[0]].copy()
                flipped[tuple(element)] = flipped[tuple(element)] + (1 if flipped[tuple(element)] < 255 else -1)
                outputs[quantize.output[0]] = flipped
                return outputs
            built.run = run_flipped
            return built
        return build

    built = build_plan(model, qdq, plan.int8_ids(model))
    outputs = [built.run(batch) for batch in batches[:1]]
    outputs[0] = {name: value + 1.0 for name, value in outputs[0].items()}  # so that image 0 is traced
    for element, explained in ((between[0], True), (far[0], False)):
        monkeypatch.setattr(crosscheck, "build_plan", flipping_build(element))
        traced = cross_check(model, qdq, plan.int8_ids(model), batches[:1], outputs, output_steps(model, ranges))
        first = traced.divergences[0]
        assert first.tensor == quantize.output[0] and first.exact is None
        assert first.explained is explained, (first, window)
