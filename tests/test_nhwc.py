"""NHWC builds: every conv on oneDNN in its native layout, transforms only where the graph enters and leaves it."""

import dataclasses

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import relax as R

import models
from test_compile import Case
from precsearch.errors import ConfigError
from precsearch.fidelity.reference import max_relative_error, run_ort
from precsearch.study.config import SearchConfig
from precsearch.tvm import CompileOptions, _onednn, resolve_target
from precsearch.tvm._nhwc import NHWCTransforms, map_permutation, permutation_index_map

needs_onednn_int8 = pytest.mark.skipif(
    not (_onednn.available() and _onednn.int8_fast_on(resolve_target(CompileOptions()))),
    reason="NHWC int8 convs are oneDNN's: this CPU has no VNNI or no oneDNN")
NHWC = CompileOptions(activation_layout="nhwc")
BLOCKED = CompileOptions(activation_layout="blocked")


def test_the_pass_turns_convert_layouts_nhwc_permutes_into_layout_transforms_and_leaves_others():
    @tvm.script.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 5, 6), "float32"), w: R.Tensor((8, 4, 3, 3), "float32"),
                 y: R.Tensor((2, 3), "float32")):
            with R.dataflow():
                a = R.permute_dims(x, axes=[0, 2, 3, 1])
                b = R.permute_dims(w, axes=[2, 3, 1, 0])
                c = R.permute_dims(a, axes=[0, 3, 1, 2])
                d = R.permute_dims(y, axes=[1, 0])  # a model's own transpose
                gv = (b, c, d)
                R.output(gv)
            return gv

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 5, 6), "float32"))
    w = relax.Var("w", relax.TensorType((8, 4, 3, 3), "float32"))
    y = relax.Var("y", relax.TensorType((2, 3), "float32"))
    with bb.function("main", [x, w, y]):
        with bb.dataflow():
            a = bb.emit(relax.op.layout_transform(x, permutation_index_map((0, 2, 3, 1))))
            b = bb.emit(relax.op.layout_transform(w, permutation_index_map((2, 3, 1, 0))))
            c = bb.emit(relax.op.layout_transform(a, permutation_index_map((0, 3, 1, 2))))
            d = bb.emit(relax.op.permute_dims(y, [1, 0]))
            gv = bb.emit_output(relax.Tuple([b, c, d]))
        bb.emit_func_output(gv)
    after = NHWCTransforms()(Before)
    tvm.ir.assert_structural_equal(after, bb.get())
    assert map_permutation(permutation_index_map((0, 2, 3, 1))) == (0, 2, 3, 1)
    # and it computes what the permutes computed
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=shape).astype("float32") for shape in ((1, 4, 5, 6), (8, 4, 3, 3), (2, 3))]
    results = []
    for mod in (Before, after):
        vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
        results.append([out.numpy() for out in vm["main"](*[tvm.runtime.tensor(x) for x in inputs])])
    for before, rewritten in zip(*results):
        np.testing.assert_array_equal(before, rewritten)


@needs_onednn_int8
@pytest.mark.parametrize("builder, spec", [(models.chain_model, "conv1"), (models.kinds_model, "conv2"),
                                           (models.activations_model, "none"), (models.sppf_model, "none"),
                                           (models.resize_model, "none")],
                         ids=["chain int8/float/int8", "kinds", "activations", "sppf", "resize"])
def test_an_nhwc_build_computes_what_the_blocked_build_computes_with_transforms_only_at_the_edges(builder, spec,
                                                                                               tmp_path):
    case = Case(builder(), tmp_path, "m")
    _, qdq, nhwc = case.build(spec, options=NHWC)
    _, _, blocked = case.build(spec, options=BLOCKED)
    assert nhwc.activation_layout == "NHWC" and blocked.activation_layout.startswith("NCHW")
    assert {row.layout for row in nhwc.rows} == {"NHWC"} and {row.backend for row in nhwc.rows} == {"onednn"}
    # one transform into NHWC per graph input and one out of it per output: none between ops
    assert nhwc.boundary_transforms == len(nhwc.input_names) + len(nhwc.output_names)
    # only the conv that reads the graph input has a transform in front of it
    assert [row.transforms_in for row in nhwc.rows if row.transforms_in] == [["NCHW→NHWC"]]
    fell_back = {op["op"] for op in nhwc.operator_layouts if op["nchw_fallback"]}
    # the chain's Flatten (a reshape) reads NCHW, after the graph's last conv
    assert fell_back == ({"reshape"} if builder is models.chain_model else set()), fell_back
    reference = [blocked.run(batch) for batch in case.check]
    candidate = [nhwc.run(batch) for batch in case.check]
    if spec == "all":
        assert max_relative_error(reference, candidate) <= 1e-4
    assert case.agreement(qdq, nhwc).fraction >= 0.99
    assert case.agreement(qdq, nhwc).fraction >= case.agreement(qdq, blocked).fraction - 0.01


@needs_onednn_int8
def test_an_all_float_nhwc_build_matches_onnx_runtime_float(tmp_path):
    case = Case(models.kinds_model(), tmp_path, "kinds")  # 3-channel first conv, depthwise, grouped, 24/32 channels
    _, _, built = case.build("all", options=NHWC)
    assert {row.layout for row in built.rows} == {"NHWC"}
    assert max_relative_error(run_ort(case.model.proto, case.check, optimized=False),
                              [built.run(batch) for batch in case.check]) <= 1e-4


@needs_onednn_int8
def test_a_residual_add_after_a_float_conv_is_a_post_op_of_its_primitive_and_keeps_the_numbers(tmp_path):
    # add(relu(conv1(x)), conv2(x)) → relu → conv3: one of conv1 / conv2 takes the add, the other's output is the
    # residual; the conv after the add reads its sum
    case = Case(models.residual_model(), tmp_path, "residual")
    _, _, fused = case.build("all", options=NHWC)
    _, _, unfused = case.build("all", options=dataclasses.replace(NHWC, onednn_residual_add=False))
    adds = {row.id: row.fused for row in fused.rows if "add" in row.fused}
    assert len(adds) == 1 and set(adds) <= {"conv1", "conv2"}, adds
    assert not any("add" in row.fused for row in unfused.rows)
    reference = run_ort(case.model.proto, case.check, optimized=False)
    candidate = [fused.run(batch) for batch in case.check]
    assert max_relative_error(reference, candidate) <= 1e-4
    # the same float32 sum in the same order: the unfused build's bits
    for got, expected in zip(candidate, [unfused.run(batch) for batch in case.check]):
        for name in got:
            np.testing.assert_array_equal(got[name], expected[name])


@needs_onednn_int8
def test_auto_is_nhwc_only_when_every_conv_runs_on_onednn_and_no_block_was_asked_for(tmp_path):
    case = Case(models.chain_model(), tmp_path, "chain")
    assert case.build("conv1")[2].activation_layout == "NHWC"
    assert case.build("conv1", options=CompileOptions(block_size=8))[2].activation_layout == "NCHW8c"
    # int8 convs on TIR need the blocked layout (VNNI is reached through conv2d_NCHWc_int8)
    assert case.build("conv1", options=CompileOptions(onednn_int8=False))[2].activation_layout == "NCHW8c"
    assert case.build("conv1", options=CompileOptions(conv_backend="tir"))[2].activation_layout == "NCHW8c"


def test_a_convtranspose_model_stays_blocked_and_refuses_nhwc(tmp_path):
    case = Case(models.conv_transpose_model(), tmp_path, "deconv")
    assert not case.build("none")[2].activation_layout == "NHWC"
    with pytest.raises(ConfigError, match="no NHWC ConvTranspose"):
        case.build("none", options=NHWC)
    with pytest.raises(ConfigError, match="activation_layout"):
        CompileOptions(activation_layout="nchw")


def test_a_study_stored_before_the_nhwc_layout_resumes_as_blocked():
    stored = SearchConfig(model="m").to_dict()
    del stored["activation_layout"]
    assert SearchConfig.from_dict(stored).activation_layout == "blocked"
    assert SearchConfig.from_dict(SearchConfig(model="m").to_dict()).activation_layout == "auto"
    assert SearchConfig(model="m").differences(SearchConfig.from_dict(stored)) == [
        "activation_layout: 'auto' != 'blocked'"]


def test_an_nhwc_build_on_tir_kernels_is_the_plan_and_computes_the_qdq_models_integers(tmp_path):
    """Where oneDNN cannot run a conv, NHWC falls to TIR's NHWC conv (HWIO weights), verified like any other."""
    case = Case(models.chain_model(), tmp_path, "chain")
    _, qdq, built = case.build("conv1", options=CompileOptions(activation_layout="nhwc", conv_backend="tir"))
    assert {(row.layout, row.backend) for row in built.rows} == {("NHWC", "tir")}
    assert set(built.kernel_weights) == {"conv0", "conv1", "conv2"}  # unpacked from HWIO and checked by VerifyPlan
    assert case.agreement(qdq, built).fraction >= 0.999
