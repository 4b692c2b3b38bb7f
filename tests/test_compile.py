"""The TVM build of a plan: numerics against ONNX Runtime, layouts, identity, errors."""

import re

import numpy as np
import pytest
from onnx import numpy_helper

import models
from precsearch.tvm import CompileOptions, LoadedLibrary, build_plan
from precsearch.tvm import _build, _int8_rewrite, _pipeline
from precsearch.model.data import image_batches
from precsearch.errors import CompileError, VerificationError
from precsearch.fidelity.reference import agreement, max_relative_error, run_ort
from precsearch.model import load_model
from precsearch.model.plan import parse_plan
from precsearch.model.quantize import build_qdq_model, calibrate, output_steps


class Case:
    """A tiny model, calibrated once; builds plans and compares them with ORT."""

    def __init__(self, proto, directory, name):
        self.model = load_model(models.save(proto, directory, name))
        self.calibration = image_batches(self.model, None, count=8)
        self.check = image_batches(self.model, None, count=6, offset=8)
        self.ranges = calibrate(self.model, self.calibration)

    def build(self, float_spec, options=None, **kwargs):
        plan = parse_plan(float_spec, self.model)
        qdq = build_qdq_model(self.model, self.ranges, plan)
        built = build_plan(self.model, qdq, plan.int8_ids(self.model), options=options, **kwargs)
        return plan, qdq, built

    def agreement(self, qdq, built):
        reference = run_ort(qdq, self.check, optimized=False)
        candidate = [built.run(batch) for batch in self.check]
        return agreement(reference, candidate, output_steps(self.model, self.ranges))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return Case(models.chain_model(), tmp_path_factory.mktemp("chain"), "chain")


@pytest.fixture(scope="module")
def residual(tmp_path_factory):
    return Case(models.residual_model(), tmp_path_factory.mktemp("residual"), "residual")


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    return Case(models.kinds_model(), tmp_path_factory.mktemp("kinds"), "kinds")


def _rows(built):
    return {row.id: row for row in built.rows}


def test_all_float_build_matches_ort_float(chain, kinds):
    for case in (chain, kinds):
        plan, qdq, built = case.build("all", options=CompileOptions(activation_layout="blocked"))
        assert built.int8_layers == ()
        reference = run_ort(case.model.proto, case.check, optimized=False)
        candidate = [built.run(batch) for batch in case.check]
        assert max_relative_error(reference, candidate) <= 1e-4
        # Float convs run blocked where the channels allow it.
        assert any(row.layout.endswith("c") and row.dtype == "float32" for row in built.rows)


def test_all_int8_build_agrees_with_ort_on_the_same_qdq_model(chain):
    plan, qdq, built = chain.build("none")
    assert built.int8_layers == ("conv0", "conv1", "conv2")
    assert all(row.dtype == "int8" for row in built.rows)
    result = chain.agreement(qdq, built)
    assert result.fraction >= 0.999
    assert result.max_error_steps <= 1.0


@pytest.mark.parametrize("float_spec, expected_int8", [
    ("conv1", ("conv0", "conv2")),  # alternating int8 / float / int8
    ("conv0,conv2", ("conv1",)),  # first and last conv float
])
def test_mixed_chain_plans_agree(chain, float_spec, expected_int8):
    plan, qdq, built = chain.build(float_spec)
    assert built.int8_layers == expected_int8
    rows = _rows(built)
    for layer_id in ("conv0", "conv1", "conv2"):
        assert rows[layer_id].dtype == ("int8" if layer_id in expected_int8 else "float32")
    assert chain.agreement(qdq, built).fraction >= 0.999


def test_residual_add_of_an_int8_and_a_float_conv(residual):
    # conv1 (int8) and conv2 (float) both feed the Add.
    plan, qdq, built = residual.build("conv2", options=CompileOptions(conv_backend="tir"))
    rows = _rows(built)
    assert rows["conv1"].dtype == "int8" and rows["conv2"].dtype == "float32"
    assert rows["conv1"].layout == rows["conv2"].layout == "NCHW16c"  # one layout: no transform at the Add
    result = residual.agreement(qdq, built)
    assert result.fraction >= 0.999


def test_historic_bias_add_between_blocked_int8_and_nchw_float_conv(tmp_path):
    # Relay died on this with "Incompatible broadcast dims: [1,16,224,224,4] and [1,64,1,1]".
    case = Case(models.bias_add_model(), tmp_path, "bias_add")
    dump = tmp_path / "ir"
    plan, qdq, built = case.build("conv1", options=CompileOptions(float_blocked=False, conv_backend="tir"),
                                   dump_ir_dir=dump)
    rows = _rows(built)
    assert (rows["conv0"].dtype, rows["conv0"].layout) == ("int8", "NCHW16c")
    assert (rows["conv1"].dtype, rows["conv1"].layout) == ("float32", "NCHW")
    assert rows["conv1"].transforms_in == ["NCHW16c→NCHW"]
    # The (1,32,1,1) bias was moved to the blocked layout with its add.
    converted = next(dump.glob("*_ConvertLayout.py")).read_text()
    assert re.search(r"R\.Tensor\(\(1, 2, 1, 1, 16\), dtype=\"float32\"\) = R\.layout_transform", converted)
    assert re.search(r"R\.Tensor\(\(1, 2, 16, 16, 16\), dtype=\"float32\"\) = R\.add\(", converted)
    assert case.agreement(qdq, built).fraction >= 0.999


def test_layer_kinds_build_int8_and_fall_back_cleanly(kinds):
    plan, qdq, built = kinds.build("none", options=CompileOptions(activation_layout="blocked"))
    rows = _rows(built)
    assert built.block_size == 8
    # 3-channel first conv and the 16→24 grouped conv cannot be blocked: NCHW, named why.
    assert rows["conv0"].layout == "NCHW" and "not divisible by block 8" in rows["conv0"].note
    assert rows["conv3"].layout == "NCHW" and "grouped conv (groups=2)" in rows["conv3"].note
    # Depthwise, stride 2, 1x1 and 24/32-channel convs run blocked int8.
    for layer_id in ("conv1", "conv2", "conv4", "conv5"):
        assert (rows[layer_id].dtype, rows[layer_id].layout) == ("int8", "NCHW8c"), layer_id
    assert rows["conv0"].transforms_out == ["NCHW→NCHW8c"]
    assert rows["conv3"].transforms_in == ["NCHW8c→NCHW"]
    assert kinds.agreement(qdq, built).fraction >= 0.999


def test_layer_kinds_mixed_plan(kinds):
    plan, qdq, built = kinds.build("conv0,conv2,conv3")
    assert set(built.int8_layers) == {"conv1", "conv4", "conv5"}
    assert kinds.agreement(qdq, built).fraction >= 0.999


def test_each_int8_kernel_holds_its_own_layers_weights(chain):
    plan, qdq, built = chain.build("conv1")
    initializers = {init.name: numpy_helper.to_array(init) for init in qdq.graph.initializer}
    producers = {out: node for node in qdq.graph.node for out in node.output}
    for node in qdq.graph.node:
        if node.op_type != "Conv":
            continue
        weight_input = node.input[1]
        if node.name in built.int8_layers:
            expected = initializers[producers[weight_input].input[0]]  # the int8 initializer the QDQ model holds
            assert expected.dtype == np.int8
        else:
            expected = initializers[weight_input]
        np.testing.assert_array_equal(built.kernel_weights[node.name], expected)


def test_verifier_rejects_a_kernel_with_another_layers_weights(chain, monkeypatch):
    plan = parse_plan("none", chain.model)
    qdq = build_qdq_model(chain.model, chain.ranges, plan)
    real_import = _build.import_qdq_model

    def swapped(*args, **kwargs):
        imported = real_import(*args, **kwargs)
        weights = imported.int8_weights
        weights[1], weights[2] = weights[2], weights[1]
        return imported

    monkeypatch.setattr(_build, "import_qdq_model", swapped)
    # conv1 and conv2 have the same shape, so only content tells them apart.
    with pytest.raises(VerificationError) as error:
        build_plan(chain.model, qdq, plan.int8_ids(chain.model))
    assert "precsearch.VerifyPlan" in str(error.value) and "conv1" in str(error.value)


def test_plan_int8_layer_missing_from_qdq_model_is_named(chain):
    qdq = build_qdq_model(chain.model, chain.ranges, parse_plan("conv2", chain.model))
    with pytest.raises(CompileError, match=r"layer 'conv2'.*does not quantize planned int8 layers"):
        build_plan(chain.model, qdq, ["conv0", "conv1", "conv2"])


def test_broadcast_error_names_layer_and_pass(chain, monkeypatch):
    real = _int8_rewrite.valid_weight_sums
    monkeypatch.setattr(_int8_rewrite, "valid_weight_sums",
                        lambda weight, *args: np.ones((weight.shape[0], 3, 5), dtype=np.int64) + real(weight, *args)[:, :3, :5])
    with pytest.raises(CompileError) as error:
        chain.build("none")
    message = str(error.value)
    assert "precsearch.Int8ConvRewrite" in message and "conv0" in message
    assert "not broadcastable" in message and "relax.add" in message
    assert "\n" not in message


def test_a_convert_layout_failure_falls_back_to_nchw_and_says_so(tmp_path, monkeypatch):
    case = Case(models.conv_transpose_model(), tmp_path, "deconv")
    # Without being told NCHW, conv2d_transpose tries to adopt its blocked input's layout and ConvertLayout fails.
    monkeypatch.setattr(_pipeline, "layout_callback",
                        lambda decisions: lambda call: {"relax.nn.conv2d": [decisions[0].data_layout,
                                                                            decisions[0].kernel_layout]})
    plan, qdq, built = case.build("none")
    assert built.layout_fallback.startswith("[pass 'ConvertLayout'] ")
    assert "Layouts must have the same size" in built.layout_fallback
    assert [row.layout for row in built.rows] == ["NCHW", "NCHW"]
    assert all(row.note == "kept NCHW: the blocked graph failed ConvertLayout" for row in built.rows)
    assert case.agreement(qdq, built).fraction >= 0.999


def test_failure_inside_a_tvm_pass_names_the_pass(tmp_path, monkeypatch):
    case = Case(models.conv_transpose_model(), tmp_path, "deconv")
    # Every conv told NCHW8c: with blocking off there is no fallback left, so the failure is the error.
    monkeypatch.setattr(_pipeline, "layout_callback",
                        lambda decisions: lambda call: {"relax.nn.conv2d": ["NCHW8c", "OIHW8i8o"]})
    with pytest.raises(CompileError, match=r"^\[pass '(ConvertLayout|precsearch.InspectLayout)'"):
        case.build("none", options=CompileOptions(float_blocked=False, int8_blocked=False))


def test_layout_that_convert_layout_cannot_apply_is_an_error(chain, monkeypatch):
    real = _pipeline.decide_layouts

    def impossible(*args, **kwargs):
        decisions = real(*args, **kwargs)
        decisions[0] = type(decisions[0])("NCHW16c", "OIHW16i16o")  # conv0 has 8 input channels
        return decisions

    monkeypatch.setattr(_pipeline, "decide_layouts", impossible)
    with pytest.raises(CompileError, match=r"pass 'precsearch.InspectLayout', layer 'conv0'"):
        chain.build("none")


def test_conv_transpose_stays_float_and_builds(tmp_path):
    case = Case(models.conv_transpose_model(), tmp_path, "deconv")
    plan, qdq, built = case.build("none")
    assert "deconv0" not in built.int8_layers and "deconv0" in built.float_layers
    assert case.agreement(qdq, built).fraction >= 0.999


def test_library_round_trip_and_ir_dump(chain, tmp_path):
    dump = tmp_path / "ir"
    plan, qdq, built = chain.build("conv1", dump_ir_dir=dump)
    library = built.export_library(tmp_path / "out" / "model.so")
    loaded = LoadedLibrary(library, built.input_names, built.output_names)
    for batch in chain.check[:2]:
        expected = built.run(batch)
        got = loaded.run(batch)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])
    files = sorted(dump.iterdir())
    assert len(files) == built.passes_run >= 20
    assert [int(f.name[:3]) for f in files] == list(range(1, len(files) + 1))
    names = [f.name for f in files]
    # Our passes, TVM's, and passes nested inside ours (DCE inside the rewrite) all appear.
    for expected_pass in ("precsearch.Import", "precsearch.Int8ConvRewrite", "ConvertLayout", "LegalizeOps",
                          "FoldConstant", "precsearch.VerifyPlan", "FuseOps"):
        assert any(expected_pass in name for name in names), expected_pass
    rewrite_index = names.index(next(n for n in names if "Int8ConvRewrite" in n))
    assert "DeadCodeElimination" in names[rewrite_index - 1]  # nested: runs inside the rewrite, finishes first
    text = files[rewrite_index].read_text()
    assert 'R.Tensor((1, 16, 16, 16), dtype="int32") = R.nn.conv2d' in text  # shapes and dtypes visible


def test_target_is_the_host_cpu():
    target = _build.host_target(2)
    assert target.attrs["mcpu"] not in ("", "generic")
    assert int(target.attrs["num-cores"]) == 2


def test_float32_requantization_builds_and_agrees(chain):
    plan, qdq, built = chain.build("conv1", options=CompileOptions(requant_dtype="float32"))
    assert chain.agreement(qdq, built).fraction >= 0.999


def test_bad_compile_options_are_named():
    with pytest.raises(ValueError, match="requant_dtype"):
        CompileOptions(requant_dtype="int16")
    with pytest.raises(ValueError, match="block_size"):
        CompileOptions(block_size=12)


def test_constant_weights_and_unfused_batchnorm_build(tmp_path):
    case = Case(models.constant_weights_model(), tmp_path, "constant_weights")
    for spec in ("none", "conv0"):
        plan, qdq, built = case.build(spec)
        assert case.agreement(qdq, built).fraction >= 0.999
    # The BatchNorm was folded into the conv before quantization: no float BN runs between int8 convs.
    assert "BatchNormalization" not in {node.op_type for node in case.model.proto.graph.node}
