"""The public pass pipeline: it is what build_plan compiles, its passes fill one report, errors come back whole."""

from pathlib import Path

import numpy as np
import pytest
import tvm

import models
from precsearch.errors import CompileError, VerificationError
from precsearch.model import load_model
from precsearch.model.data import image_batches
from precsearch.model.quantize import build_qdq_model, calibrate
from precsearch.model.plan import parse_plan
from precsearch.tvm import (BuildReport, CompileOptions, build_plan, fused_module, import_qdq_model, pipeline,
                            resolve_target)
from precsearch.tvm import _build, _onednn


class Chain:
    """The 3-conv chain model with the plan "conv1 float" (int8 → float → int8)."""

    def __init__(self, directory):
        self.model = load_model(models.save(models.chain_model(), directory, "chain"))
        self.ranges = calibrate(self.model, image_batches(self.model, None, count=4))
        self.plan = parse_plan("conv1", self.model)
        self.qdq = build_qdq_model(self.model, self.ranges, self.plan)
        self.int8_ids = self.plan.int8_ids(self.model)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return Chain(tmp_path_factory.mktemp("pipeline"))


def _run(passes, mod, options=None):
    with resolve_target(options or CompileOptions()), tvm.transform.PassContext(opt_level=3):
        return passes(mod)


def test_the_pipeline_is_the_module_build_plan_compiles(chain, monkeypatch):
    compiled = []
    real_compile = tvm.compile

    def spy(mod, *args, **kwargs):
        compiled.append((mod, kwargs.get("relax_pipeline", "default")))
        return real_compile(mod, *args, **kwargs)

    monkeypatch.setattr(tvm, "compile", spy)
    built = build_plan(chain.model, chain.qdq, chain.int8_ids)
    monkeypatch.undo()
    imported = import_qdq_model(chain.qdq, chain.model)
    lowered = _run(pipeline(chain.model, imported, chain.int8_ids), imported.mod)
    assert len(compiled) == 1 and built.int8_layers == ("conv0", "conv2")
    compiled_mod, relax_passes = compiled[0]
    assert relax_passes is None  # no Relax pass runs between pipeline() and codegen
    tvm.ir.assert_structural_equal(lowered, compiled_mod)


def test_value_info_without_a_type_is_dropped_before_tvm_checks_the_model(chain):
    """Such entries (EfficientNet-Lite0's QDQ models have them) made TVM's frontend print a UserWarning per
    entry into the search's output; dropped, the import is the same module and warns nothing."""
    import warnings

    import onnx

    untyped = onnx.ModelProto()
    untyped.CopyFrom(chain.qdq)
    untyped.graph.value_info.add().name = untyped.graph.node[0].output[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        imported = import_qdq_model(untyped, chain.model)
    assert not [w for w in caught if "Unrecognized type value case" in str(w.message)]
    tvm.ir.assert_structural_equal(imported.mod, import_qdq_model(chain.qdq, chain.model).mod)
    assert len(untyped.graph.value_info) == len(chain.qdq.graph.value_info) + 1  # the caller's model untouched


def test_the_pipeline_lists_its_passes_and_stops_after_fusion_when_asked(chain):
    imported = import_qdq_model(chain.qdq, chain.model)
    blocked = CompileOptions(activation_layout="blocked")
    names = [p.info.name for p in pipeline(chain.model, imported, chain.int8_ids, blocked).passes]
    ours = [name for name in names if name.startswith("precsearch.")]
    assert ours == ["precsearch.Int8ConvRewrite", "precsearch.LowerQDQ", "precsearch.SeparableMaxPool",
                    "precsearch.InspectLayout",
                    "precsearch.OffloadOneDNN", "precsearch.OffloadDenseOneDNN", "precsearch.FastSigmoid",
                    "precsearch.InjectiveTake",
                    "precsearch.VerifyPlan",
                    "precsearch.ApplyTuning"]
    # an NHWC build turns ConvertLayout's permutes into layout transforms right after it
    nhwc = [p.info.name for p in pipeline(chain.model, imported, chain.int8_ids,
                                          CompileOptions(activation_layout="nhwc")).passes]
    assert nhwc[nhwc.index("ConvertLayout") + 1] == "precsearch.NHWCTransforms"
    assert [name for name in nhwc if name != "precsearch.NHWCTransforms"] == names
    assert names.index("ConvertLayout") < names.index("precsearch.InspectLayout") < names.index("LegalizeOps") \
        < names.index("FoldConstant") < names.index("precsearch.VerifyPlan") < names.index("FuseTIR")
    front = [p.info.name for p in pipeline(chain.model, imported, chain.plan, blocked, fused_only=True).passes]
    assert front == names[:names.index("FuseTIR") + 1]
    fused = _run(pipeline(chain.model, imported, chain.plan, fused_only=True), imported.mod)  # a Plan will do
    tvm.ir.assert_structural_equal(fused, fused_module(chain.model, chain.qdq, chain.int8_ids))


def test_the_passes_fill_one_report_and_the_built_plan_is_made_from_it(chain):
    imported = import_qdq_model(chain.qdq, chain.model)
    report = BuildReport()
    passes = pipeline(chain.model, imported, chain.int8_ids, report=report)
    # the layout decision is known before anything runs
    assert (report.int8_layers, report.float_layers, report.block_size) == (("conv0", "conv2"), ("conv1",), 8)
    assert report.rows == [] and report.kernel_weights == {}
    _run(passes, imported.mod)
    assert report.rewritten_int8 == ["conv0", "conv2"]
    # every conv on oneDNN (an AVX-512 CPU with VNNI) runs NHWC by default, else blocked
    layout = "NHWC" if report.activation_layout == "NHWC" else "NCHW8c"
    assert report.activation_layout in ("NHWC", "NCHW8c")
    assert [(row.id, row.dtype, row.layout) for row in report.rows] == [
        ("conv0", "int8", layout), ("conv1", "float32", layout), ("conv2", "int8", layout)]
    assert set(report.kernel_weights) == {"conv0", "conv1", "conv2"}
    assert report.total_kernels > 0 and report.tuned_kernels == 0  # no database
    # conv1 (float) runs on oneDNN, and so do conv0 and conv2 where the CPU has VNNI: no TIR kernel to tune
    if not _onednn.available():
        assert report.untuned_convs == ("conv0", "conv1", "conv2")
    elif _onednn.int8_fast_on(resolve_target(CompileOptions())):
        assert report.untuned_convs == ()
    else:
        assert report.untuned_convs == ("conv0", "conv2")
    built = build_plan(chain.model, chain.qdq, chain.int8_ids)
    assert [row.to_dict() for row in built.rows] == [row.to_dict() for row in report.rows]
    assert (built.boundary_transforms, built.operator_layouts) == (report.boundary_transforms, report.operator_layouts)
    assert (built.tuned_kernels, built.total_kernels, built.untuned_convs) == (0, report.total_kernels,
                                                                               report.untuned_convs)
    for layer_id, weights in report.kernel_weights.items():
        np.testing.assert_array_equal(built.kernel_weights[layer_id], weights)


def _swap_int8_weights(imported):
    weights = imported.int8_weights
    weights[0], weights[2] = weights[2], weights[0]  # the two int8 layers of the plan trade weights


def test_a_pass_error_is_kept_as_raised_while_tvm_passes_on_only_its_text(chain):
    imported = import_qdq_model(chain.qdq, chain.model)
    _swap_int8_weights(imported)
    report = BuildReport()
    with pytest.raises(RuntimeError) as raised:
        _run(pipeline(chain.model, imported, chain.int8_ids, report=report), imported.mod)
    assert not isinstance(raised.value, CompileError)  # what TVM's FFI makes of it
    assert raised.value.__cause__ is None and raised.value.__context__ is None
    failure = report.failure
    assert isinstance(failure, VerificationError)
    assert (failure.pass_name, failure.layer_id) == ("precsearch.VerifyPlan", "conv0")
    assert str(failure) in str(raised.value)
    assert _build._precsearch_error(raised.value, report) is failure


def test_build_plan_raises_the_passes_own_error(chain, monkeypatch):
    real_import = _build.import_qdq_model

    def swapped(*args, **kwargs):
        imported = real_import(*args, **kwargs)
        _swap_int8_weights(imported)
        return imported

    monkeypatch.setattr(_build, "import_qdq_model", swapped)
    with pytest.raises(VerificationError) as error:
        build_plan(chain.model, chain.qdq, chain.int8_ids)
    assert error.value.layer_id == "conv0"
    # the original object: its traceback reaches into the pass that raised it
    frames = []
    tb = error.value.__traceback__
    while tb is not None:
        frames.append((Path(tb.tb_frame.f_code.co_filename).name, tb.tb_frame.f_code.co_name))
        tb = tb.tb_next
    assert ("_verify.py", "run") in frames  # VerifyPlan.run raised it


def test_the_error_text_is_parsed_only_when_no_pass_kept_the_error():
    text = RuntimeError("Traceback (most recent call last):\n  File x\n"
                        "[pass 'precsearch.VerifyPlan', layer 'conv3'] layer appears twice in the built graph")
    parsed = _build._precsearch_error(text, BuildReport())
    assert isinstance(parsed, VerificationError)
    assert (parsed.pass_name, parsed.layer_id) == ("precsearch.VerifyPlan", "conv3")
    assert str(parsed) == "[pass 'precsearch.VerifyPlan', layer 'conv3'] layer appears twice in the built graph"
    stale = BuildReport(failure=CompileError("an earlier failure", pass_name="precsearch.LowerQDQ"))
    assert _build._precsearch_error(text, stale) is not stale.failure  # kept for another error: not this one
    assert _build._precsearch_error(RuntimeError("InternalError: Check failed"), BuildReport()) is None


def test_a_tvm_error_names_the_layer_its_text_names():
    class Tracer:
        current = "FuseTIR"

    with pytest.raises(CompileError) as error:
        _build._raise_compile_error(RuntimeError("ValueError: cannot fuse fused_ps_conv_L2_int8_NCHW8c_add3"),
                                    Tracer(), ["conv0", "conv1", "conv2"], BuildReport())
    assert (error.value.pass_name, error.value.layer_id) == ("FuseTIR", "conv2")
