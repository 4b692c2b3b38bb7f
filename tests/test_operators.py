"""Operators that real detectors put between convs, in every plan and in blocked layouts.

Each tiny model is one pattern (YOLOv8's channel Split, YOLOX's Focus, an FPN's
Resize + Concat, SPPF, SiLU, the DFL head, NHWC input, grouped convs, recurrent
and dense tails).  Every one is built all-float, all-int8 and mixed, and checked
for structure (the layout each conv was built in, what precsearch rewrote and
which operators ran outside the blocked layout) and numbers (all-float against
ORT float, int8 plans against ORT on the same QDQ model).
"""

import numpy as np
import pytest

import models
from precsearch.tvm import CompileOptions, build_plan, unsupported_operators
from precsearch.tvm._onnx_rewrite import rewrite_for_tvm, split_sizes
from precsearch.fidelity.crosscheck import AGREES, NEAR_TIES, cross_check
from precsearch.model.data import image_batches
from precsearch.errors import CompileError
from precsearch.fidelity.reference import agreement, max_relative_error, run_ort
from precsearch.model import load_model
from precsearch.model.plan import parse_plan
from precsearch.model.quantize import build_qdq_model, calibrate, output_steps

pytestmark = pytest.mark.slow  # dozens of TVM builds (minutes)


class Pattern:
    """A tiny model calibrated once; ``check(plan, block)`` builds and compares one plan."""

    def __init__(self, proto, directory, name):
        self.model = load_model(models.save(proto, directory, name))
        self.check_batches = image_batches(self.model, None, count=3, offset=4)
        self.ranges = calibrate(self.model, image_batches(self.model, None, count=4))
        self.steps = output_steps(self.model, self.ranges)

    def check(self, float_spec: str, block: int | None = 16):
        plan = parse_plan(float_spec, self.model)
        int8_ids = plan.int8_ids(self.model)
        qdq = build_qdq_model(self.model, self.ranges, plan) if int8_ids else self.model.proto
        options = CompileOptions(block_size=block)
        built = build_plan(self.model, qdq, int8_ids, options=options)
        candidate = [built.run(batch) for batch in self.check_batches]
        if not int8_ids:
            assert max_relative_error(run_ort(self.model.proto, self.check_batches), candidate) <= 1e-4
        else:
            traced = cross_check(self.model, qdq, int8_ids, self.check_batches, candidate, self.steps,
                                 options=options)
            # One rounding near-tie flipped the other way may move a few outputs one step more.
            assert traced.verdict in (AGREES, NEAR_TIES), traced.summary()
            assert traced.agreement.fraction >= 0.99, (float_spec, block, traced.agreement)
        assert built.layout_fallback == ""  # each pattern builds blocked, not through the NCHW safety net
        return built

    def layouts(self, built) -> dict[str, str]:
        return {row.id: f"{'int8' if row.dtype == 'int8' else 'float'}/{row.layout}" for row in built.rows}

    def alternating(self) -> str:
        return ",".join(layer.id for layer in self.model.layers[::2])


def _operators(built, key: str) -> dict[str, int]:
    return {row["op"]: row[key] for row in built.operator_layouts if row[key]}


PLANS = ["all", "none", "alternating"]


def _spec(case: Pattern, plan: str) -> str:
    return case.alternating() if plan == "alternating" else plan


@pytest.mark.parametrize("parts, block", [((16, 16), 8), ((16, 16), 16), ((8, 24), 16), ((12, 20), 8),
                                          ((4, 12, 16), 16)])
@pytest.mark.parametrize("plan", PLANS)
def test_channel_split_builds_in_every_plan(tmp_path, parts, block, plan):
    case = Pattern(models.split_model(parts), tmp_path, "split")
    built = case.check(_spec(case, plan), block)
    # The split became one Slice per part, each named after the ONNX node.
    assert [(note.node, note.op_type, note.action) for note in built.operator_notes] == [("split", "Split",
                                                                                          "rewritten")]
    assert f"channel split {list(parts)}" in built.operator_notes[0].detail
    layouts = case.layouts(built)
    # A part whose channels the block divides is blocked; the others stay NCHW with a stated reason.
    for i, part in enumerate(parts):
        assert layouts[f"conv{i + 1}"].endswith(f"NCHW{block}c" if part % block == 0 else "/NCHW")
    assert layouts["conv0"].endswith(f"NCHW{block}c") and layouts["conv_out"].endswith(f"NCHW{block}c")
    assert _operators(built, "nchw_fallback").get("strided_slice") == len(parts)


def test_split_sizes_from_input_attribute_and_equal_parts():
    from onnx import helper

    constants = {"sizes": np.array([8, 24])}
    assert split_sizes(helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1), constants, 32) == [8, 24]
    assert split_sizes(helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1), {}, 48) == [16, 16, 16]
    assert split_sizes(helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3), {}, 10) == [4, 4, 2]
    with pytest.raises(CompileError, match="'s' takes its sizes from a runtime tensor"):
        split_sizes(helper.make_node("Split", ["x", "runtime"], ["a", "b"], name="s", axis=1), {}, 32)


def test_split_on_height_is_left_to_tvm():
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Split", ["input"], ["h0", "h1"], name="hsplit", axis=2),
             helper.make_node("Concat", ["h1", "h0"], ["output"], name="hcat", axis=2)]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "hsplit", [value("input", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [value("output", TensorProto.FLOAT, [1, 16, 8, 8])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rewritten, notes = rewrite_for_tvm(proto)
    # H is never sub-indexed by a channel block, so TVM's own split rule is right there.
    assert notes == [] and [node.op_type for node in rewritten.graph.node] == ["Split", "Concat"]


@pytest.fixture(scope="module")
def patterns(tmp_path_factory):
    cache = {}

    def get(name, *args):
        if (name, args) not in cache:
            cache[(name, args)] = Pattern(getattr(models, name)(*args), tmp_path_factory.mktemp(name), name)
        return cache[(name, args)]

    return get


@pytest.mark.parametrize("plan", PLANS)
def test_concat_of_blocked_and_unblocked_inputs(patterns, plan):
    case = patterns("concat_model")
    built = case.check(_spec(case, plan))
    layouts = case.layouts(built)
    assert layouts["conv1"].endswith("NCHW16c") and layouts["conv2"].endswith("/NCHW")  # 6 channels
    assert layouts["conv3"].endswith("/NCHW")  # 22 input channels
    assert [row.note for row in built.rows if row.id == "conv2"] == ["channels 16→6 not divisible by block 16"]


@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("plan", PLANS)
def test_focus_stem_and_slices_on_channels_and_space(patterns, plan, block):
    case = patterns("focus_model")
    built = case.check(_spec(case, plan), block)
    assert set(case.layouts(built).values()) <= {f"int8/NCHW{block}c", f"float/NCHW{block}c"}
    # strided_slice has no blocked rule in TVM 0.27: the C and H/W slices after blocked convs run NCHW.
    assert _operators(built, "nchw_fallback") == {"strided_slice": 2}


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("plan", PLANS)
def test_resize_then_concat(patterns, mode, plan):
    case = patterns("resize_model", mode)
    built = case.check(_spec(case, plan))
    assert set(case.layouts(built).values()) <= {"int8/NCHW16c", "float/NCHW16c"}
    # resize2d has no blocked rule in TVM 0.27, and the Concat follows its first (NCHW) input.
    assert _operators(built, "nchw_fallback") == {"image.resize2d": 1, "concat": 1}


@pytest.mark.parametrize("plan", PLANS)
def test_sppf_maxpool_chain_stays_blocked(patterns, plan):
    case = patterns("sppf_model")
    built = case.check(_spec(case, plan))
    blocked = _operators(built, "blocked")
    # three 5x5 pools, each a 1x5 then a 5x1 pool (SeparableMaxPool), all blocked
    assert blocked["nn.max_pool2d"] == 6 and blocked["concat"] == 1
    assert "nn.max_pool2d" not in _operators(built, "nchw_fallback")


@pytest.mark.parametrize("plan", PLANS)
def test_silu_hardsigmoid_hardswish_stay_blocked(patterns, plan):
    case = patterns("activations_model")
    built = case.check(_spec(case, plan))
    assert set(case.layouts(built).values()) <= {"int8/NCHW16c", "float/NCHW16c"}
    assert _operators(built, "nchw_fallback") == {}
    assert _operators(built, "blocked")["sigmoid"] == 1


@pytest.mark.parametrize("plan", PLANS)
def test_dfl_head_reshape_softmax_conv(patterns, plan):
    case = patterns("dfl_model")
    built = case.check(_spec(case, plan))
    layouts = case.layouts(built)
    assert layouts["conv1"].endswith("NCHW16c") and layouts["dfl_conv"].endswith("/NCHW")  # 16 -> 1 channel
    assert _operators(built, "nchw_fallback").get("reshape") == 1


@pytest.mark.parametrize("plan", PLANS)
def test_nhwc_input_transposed_to_nchw(patterns, plan):
    case = patterns("nhwc_input_model")
    built = case.check(_spec(case, plan))
    layouts = case.layouts(built)
    assert layouts["conv0"].endswith("/NCHW") and layouts["conv1"].endswith("NCHW16c")


@pytest.mark.parametrize("plan", PLANS)
def test_grouped_convs_run_nchw_with_a_reason(patterns, plan):
    case = patterns("grouped_model")
    built = case.check(_spec(case, plan))
    notes = {row.id: row.note for row in built.rows}
    assert notes["conv1"] == "grouped conv (groups=2) has no blocked kernel"
    assert notes["conv2"] == "grouped conv (groups=4) has no blocked kernel"
    assert case.layouts(built)["conv3"].endswith("NCHW16c")


@pytest.mark.parametrize("plan", PLANS)
def test_residual_add_of_blocked_int8_and_nchw_float_branch(patterns, plan):
    case = patterns("residual_model")
    spec = {"all": "all", "none": "none", "alternating": "conv2"}[plan]
    model, ranges = case.model, case.ranges
    parsed = parse_plan(spec, model)
    qdq = build_qdq_model(model, ranges, parsed) if parsed.int8_ids(model) else model.proto
    # Float convs in NCHW: the Add meets a blocked int8 branch and an NCHW float one.
    built = build_plan(model, qdq, parsed.int8_ids(model), options=CompileOptions(block_size=16,
                                                                                   float_blocked=False))
    candidate = [built.run(batch) for batch in case.check_batches]
    if spec == "all":
        assert max_relative_error(run_ort(model.proto, case.check_batches), candidate) <= 1e-4
    else:
        assert agreement(run_ort(qdq, case.check_batches), candidate, case.steps).fraction >= 0.999
    layouts = case.layouts(built)
    if spec == "conv2":
        assert layouts["conv1"] == "int8/NCHW16c" and layouts["conv2"] == "float/NCHW"


@pytest.mark.parametrize("plan", PLANS)
def test_conv_transpose_stays_float_between_int8_convs(patterns, plan):
    case = patterns("conv_transpose_model")
    built = case.check(_spec(case, plan), block=8)
    assert "deconv0" in built.float_layers
    assert case.layouts(built)["conv0"].endswith("NCHW8c")


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("plan", PLANS)
def test_recurrent_tail_is_unrolled_and_stays_float(patterns, cell, plan):
    case = patterns("recurrent_tail_model", cell)
    built = case.check(_spec(case, plan))
    assert [(note.node, note.op_type, note.action) for note in built.operator_notes] == [("rnn", cell,
                                                                                          "unrolled")]
    assert set(case.layouts(built).values()) <= {"int8/NCHW16c", "float/NCHW16c"}


@pytest.mark.parametrize("plan", PLANS)
def test_gemm_and_matmul_tail_stays_float(patterns, plan):
    case = patterns("gemm_tail_model")
    built = case.check(_spec(case, plan))
    assert built.int8_layers == tuple(parse_plan(_spec(case, plan), case.model).int8_ids(case.model))


def test_an_operator_tvm_cannot_import_is_named_before_any_build(tmp_path):
    from onnx import helper

    proto = models.chain_model()
    relu = next(node for node in proto.graph.node if node.op_type == "Relu")
    relu.op_type, relu.domain = "FancyRelu", "com.example"
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    assert unsupported_operators(proto) == [(relu.name, "com.example.FancyRelu")]
    with pytest.raises(CompileError, match=r"\[pass 'precsearch.Import', layer 'relu0'\] TVM's ONNX frontend "
                                           r"cannot import 1 node\(s\): 'relu0' \(com.example.FancyRelu\)"):
        from precsearch.tvm._importer import import_qdq_model

        import_qdq_model(proto, load_model(models.save(models.chain_model(), tmp_path, "chain")))
