"""The ONNX Runtime backend: quantize_static plans, their graph, their fidelity, a search over both runtimes, the CLI.

The graph and fidelity checks use the real backend on a tiny model.  The search
over both runtimes takes real fidelity from each backend (the QDQ emulation for
TVM plans, ORT's own int8 kernels for ORT plans) and a deterministic stand-in
latency (``standin.standin_latency_ms``) in which TVM wins the mostly-int8 plans
and ORT the mostly-float ones.
"""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from onnx import numpy_helper

import models
from precsearch.errors import ModelError
from precsearch.fidelity.metrics import compute_metrics
from precsearch.fidelity.reference import run_ort
from precsearch.measure import Latency
from precsearch.model import load_model
from precsearch.model.data import image_batches
from precsearch.model.plan import Plan, parse_plan
from precsearch.study.config import SearchConfig
from precsearch.study.evaluator import BackendDispatch
from precsearch.study.ort_backend import DISABLED_OPTIMIZERS, OrtEvaluator, check_ort_plan, check_runtime_plan
from precsearch.study.record import TrialRecord
from precsearch.study.search import PlanSpace, open_study, run_worker, seed_plans
from precsearch.study.storage import default_storage_url, open_storage
from precsearch.workspace import Workspace
from standin import StandInEvaluator, standin_latency_ms

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A 4-conv chain in a workspace with 8 calibration and 8 evaluation batches."""
    folder = tmp_path_factory.mktemp("ort")
    path = models.save(models.chain_model(channels=(8, 16, 16, 16, 16), size=8, seed=21), folder, "chain4")
    model = load_model(path)
    workspace = Workspace.in_memory(model, folder / "work", image_batches(model, None, 8),
                                    image_batches(model, None, 8, offset=8))
    return model, workspace


def _graph_float_convs(proto: onnx.ModelProto) -> set[str]:
    """Convs whose weight input is a float32 initializer, read straight off the graph (not the backend's helper)."""
    initializers = {init.name: init for init in proto.graph.initializer}
    names = set()
    for node in proto.graph.node:
        if node.op_type != "Conv":
            continue
        weight = initializers.get(node.input[1])
        if weight is not None and weight.data_type == onnx.TensorProto.FLOAT:
            names.add(node.name)
    return names


@pytest.mark.parametrize("float_ids", [(), ("conv1",), ("conv0", "conv3"), ("conv0", "conv1", "conv2")])
def test_the_ort_plan_keeps_exactly_the_planned_convs_float(chain, float_ids, tmp_path):
    model, workspace = chain
    plan = Plan(frozenset(float_ids), "ort")
    proto = OrtEvaluator(workspace, "sqnr_db", None).model_of(plan)
    convs = [node for node in proto.graph.node if node.op_type == "Conv"]
    assert sorted(node.name for node in convs) == ["conv0", "conv1", "conv2", "conv3"]  # names kept
    assert _graph_float_convs(proto) == set(float_ids)
    # An int8 conv's weight comes out of a DequantizeLinear of an int8 initializer; a float one is never touched by Q/DQ.
    producers = {out: node for node in proto.graph.node for out in node.output}
    initializers = {init.name: init for init in proto.graph.initializer}
    qdq_inputs = {name for node in proto.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                  for name in node.input}
    for node in convs:
        if node.name in float_ids:
            assert node.input[1] not in producers and node.input[1] not in qdq_inputs
        else:
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear"
            assert initializers[dq.input[0]].data_type == onnx.TensorProto.INT8
    # What ORT runs: in the backend's session exactly the int8 convs become QLinearConv.
    assert _qlinear_convs(proto, tmp_path / "backend.onnx", DISABLED_OPTIMIZERS) == \
        {"conv0", "conv1", "conv2", "conv3"} - set(float_ids)


def _qlinear_convs(proto, path, disabled=()) -> set[str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"],
                         **({"disabled_optimizers": list(disabled)} if disabled else {}))
    return {node.name.split("_token_")[0] for node in onnx.load(str(path)).graph.node if node.op_type == "QLinearConv"}


def test_a_default_session_would_run_an_excluded_conv_int8(chain, tmp_path):
    """Why the backend disables WeightBiasQuantization: without it ORT re-quantizes a conv between int8 neighbours."""
    model, workspace = chain
    plan = Plan(frozenset({"conv1"}), "ort")
    proto = workspace.ort_model(plan)
    assert _graph_float_convs(proto) == {"conv1"}  # quantize_static kept it float...
    assert "conv1" in _qlinear_convs(proto, tmp_path / "default.onnx")  # ...a default session makes it int8
    with pytest.raises(ModelError, match=r"runs convs that plan 'ort:float:conv1' keeps float as QLinearConv"):
        check_runtime_plan(model, onnx.load(str(tmp_path / "default.onnx")), plan)
    default = compute_metrics(workspace.reference, run_ort(proto, workspace.eval_batches, optimized=True)).values
    ours = OrtEvaluator(workspace, "sqnr_db", None, warmup=1, repeats=3).evaluate(plan).metrics
    assert default["sqnr_db"] != ours["sqnr_db"]


def test_a_model_that_does_not_match_its_plan_is_refused(chain):
    model, workspace = chain
    other = workspace.ort_model(Plan(frozenset({"conv1"}), "ort"))
    check_ort_plan(model, other, Plan(frozenset({"conv1"}), "ort"))
    with pytest.raises(ModelError, match=r"quantize_static did not build plan 'ort:float:conv2'.*\['conv1'\].*"
                                         r"\['conv2'\]"):
        check_ort_plan(model, other, Plan(frozenset({"conv2"}), "ort"))


def test_fidelity_and_latency_come_from_one_optimized_session(chain):
    model, workspace = chain
    evaluator = OrtEvaluator(workspace, "sqnr_db", None, warmup=1, repeats=5)
    plan = Plan(frozenset({"conv2"}), "ort")
    result = evaluator.evaluate(plan)
    direct = compute_metrics(workspace.reference, _run(workspace.ort_model(plan), workspace.eval_batches)).values
    assert result.metrics["sqnr_db"] == direct["sqnr_db"] and result.metrics["cosine"] == direct["cosine"]
    # ORT's int8 kernels, not the QDQ emulation: the session is fully optimized (its numbers can equal the
    # emulation's where MLAS's int8 kernels are exact, as on a CPU with VNNI, and differ elsewhere).
    options = evaluator.session(plan).get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert result.latency_ms > 0 and result.fidelity_batches == 8 and result.verdict is None
    # The all-float plan is the float model itself, exact against the reference.
    exact = evaluator.evaluate(Plan(frozenset(model.capable_ids()), "ort"))
    assert exact.metrics["max_abs_error"] == 0.0
    with pytest.raises(ValueError, match="builds plans for 'ort'"):
        evaluator.evaluate(Plan(frozenset()))  # a TVM plan


def _run(proto, batches, disabled=DISABLED_OPTIMIZERS):
    """A direct run in an optimized session, as a user would load the exported model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(disabled))
    names = [out.name for out in session.get_outputs()]
    return [dict(zip(names, session.run(names, batch))) for batch in batches]


class _StandInOrt(OrtEvaluator):
    """The real ORT backend (quantize_static, fidelity from its session) with the stand-in latency."""

    def _time(self, plan, session, repeats):
        return Latency(backend="ort", median_ms=standin_latency_ms(self.workspace.model, plan), iqr_ms=0.0,
                       runs=repeats, warmup=0, threads=1)


def test_with_ort_model_conv_qdq_an_ort_plan_is_precsearchs_own_qdq_model(chain):
    """--ort-model conv-qdq: ORT runs the plan's Conv-only QDQ model (the one TVM compiles), its float convs float
    in the graph ORT runs, scored and timed in the same optimized session."""
    from dataclasses import replace

    model, workspace = chain
    conv_qdq = Workspace.in_memory(model, None, workspace.calibration_batches, workspace.eval_batches,
                                   ranges=workspace.ranges, reference=workspace.reference)
    conv_qdq.data = replace(conv_qdq.data, ort_model="conv-qdq")
    plan = Plan(frozenset({"conv1"}), "ort")
    ours = conv_qdq.ort_model(plan)
    assert ours.SerializeToString() == conv_qdq.qdq_model(Plan(frozenset({"conv1"}))).SerializeToString()
    assert ours.SerializeToString() != workspace.ort_model(plan).SerializeToString()  # not quantize_static's
    assert _graph_float_convs(ours) == {"conv1"}
    evaluator = OrtEvaluator(conv_qdq, "sqnr_db", None, warmup=1, repeats=5)
    result = evaluator.evaluate(plan)
    direct = compute_metrics(workspace.reference, _run(ours, workspace.eval_batches)).values
    assert result.metrics["sqnr_db"] == direct["sqnr_db"] and 10 < result.metrics["sqnr_db"] < 80
    assert result.latency_ms > 0
    # The all-float plan is still the float model itself.
    assert conv_qdq.ort_model(Plan(frozenset(model.capable_ids()), "ort")) is model.proto
    with pytest.raises(ValueError, match="'ort_model' parameter of search must be one of"):
        SearchConfig(model="m.onnx", ort_model="qdq")
    assert SearchConfig.from_dict({"model": "m.onnx"}).ort_model == "quantize_static"  # older studies
    # The report: its all-int8 ORT plan is not the user's quantize_static model, and what it ships says so.
    from precsearch.report.writer import _baseline_plans, ship_line

    front = pd.DataFrame({"backend": ["ort", "ort"], "float_count": [0, 4]})
    assert set(_baseline_plans(front, 4, SearchConfig(model="m.onnx", ort_model="conv-qdq"))) == {
        "ONNX Runtime float"}
    assert set(_baseline_plans(front, 4, SearchConfig(model="m.onnx"))) == {
        "ONNX Runtime float", "ONNX Runtime int8 (quantize_static)"}
    assert ship_line({"trial": 3, "float_layers": '["conv1"]', "backend": "ort", "ort_model": "conv-qdq"}) == (
        "Ship trial 3 with ONNX Runtime: precsearch's Conv-only QDQ model with float convs [\"conv1\"] "
        "(export writes model.int8.onnx)")


def test_a_search_over_both_backends_finishes_with_both_on_its_front(chain, tmp_path):
    model, workspace = chain
    tvm = StandInEvaluator(model, workspace.ranges, workspace.eval_batches, workspace.reference)
    ort = _StandInOrt(workspace, "sqnr_db", None, repeats=3)
    evaluator = BackendDispatch({"tvm": tvm, "ort": ort})
    config = SearchConfig(model=str(model.source), metric="sqnr_db", sampler="exhaustive", backend="both",
                          eval_batches=8)
    url = default_storage_url(tmp_path)
    handle = open_study(config, model, open_storage(url), url, "both", "sqnr_db")
    summary = run_worker(handle, model, evaluator, seeds=seed_plans(model, backends=config.backends))
    assert summary.completed == 32 and summary.failed == 0  # 16 float sets on 2 runtimes
    trials = handle.study.get_trials()
    records = [TrialRecord.from_trial(t) for t in trials]
    assert sum(r.backend == "ort" for r in records) == 16 and sum(r.backend == "tvm" for r in records) == 16
    assert all(r.plan_key == r.plan.key() and r.plan_key.startswith("ort:") == (r.backend == "ort")
               for r in records)
    assert len(tvm.calls) == 16 and all(not key.startswith("ort:") for key in tvm.calls)
    front = summary.front
    assert {p.backend for p in front} == {"tvm", "ort"}
    for point in front:  # each point was timed by its own backend
        assert point.latency_ms == pytest.approx(standin_latency_ms(model, Plan(frozenset(point.float_layers),
                                                                                point.backend)))
    assert front[0].backend == "tvm" and front[0].plan == "float:"  # TVM all-int8 is the fastest plan
    assert front[-1].backend == "ort" and set(front[-1].float_layers) == set(model.capable_ids())  # ORT float: exact
    # The report: a backend column, the runtime named in the recommendation.
    from precsearch.report.writer import collect, ship_line, write_report

    data = collect(handle.study)
    assert set(data.front["backend"]) == {"tvm", "ort"}
    assert (data.trials["backend"] == "ort").sum() == 16
    files = write_report(data, tmp_path / "report")
    assert set(pd.read_csv(files["pareto.csv"])["backend"]) == {"tvm", "ort"}
    ort_row = dict(data.front[data.front["backend"] == "ort"].iloc[0])
    assert ship_line(ort_row).startswith(f"Ship trial {int(ort_row['trial'])} with ONNX Runtime: quantize_static "
                                         "with nodes_to_exclude=")
    assert "TVM library" in ship_line(dict(data.front.iloc[0]))


def test_old_records_and_settings_read_as_tvm(chain):
    model, _ = chain
    old = TrialRecord.from_attrs({"plan": "float:conv1", "float_layers": ["conv1"], "latency_ms": 1.0})
    assert old.backend == "tvm" and old.plan == Plan(frozenset({"conv1"})) and old.plan.key() == "float:conv1"
    assert SearchConfig.from_dict({"model": "m.onnx"}).backend == "tvm"
    # TVM records write what they always wrote; ORT ones add the backend and a prefixed key.
    assert TrialRecord(plan_key="float:", float_layers=()).to_attrs() == {"plan": "float:", "float_layers": []}
    ort = TrialRecord(plan_key="ort:float:conv1", float_layers=("conv1",), backend="ort")
    assert ort.to_attrs()["backend"] == "ort" and TrialRecord.from_attrs(ort.to_attrs()).plan == ort.plan
    assert parse_plan("ort:float:conv1", model) == Plan(frozenset({"conv1"}), "ort")
    # A TVM space has no backend parameter, as before; the same float set on two runtimes is two plans.
    assert "backend" not in PlanSpace(model).params(Plan(frozenset()))
    both = PlanSpace(model, ("tvm", "ort"))
    assert both.size == 2 * PlanSpace(model).size
    params = both.params(Plan(frozenset({"conv1"}), "ort"))
    assert params["backend"] == "ort" and both.plan_of(params) == Plan(frozenset({"conv1"}), "ort")
    assert Plan(frozenset({"conv1"})).key() != Plan(frozenset({"conv1"}), "ort").key()
    with pytest.raises(ValueError, match="'backend' parameter of search"):
        SearchConfig(model="m.onnx", backend="onnx")


# --------------------------------------------------------------------------- the command line


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "precsearch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def ort_search(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ort-cli")
    path = models.save(models.chain_model(channels=(8, 16, 16, 16, 16), size=8, seed=21), folder, "chain4")
    workdir = folder / "work"
    result = run("search", path, "--backend", "ort", "--trials", "4", "--workdir", workdir, "--eval-batches", "4",
                 "--calibration-batches", "4", "--repeats", "5", "--warmup", "1", "--remeasure-repeats", "5",
                 "--metric", "sqnr_db", "--json")
    assert result.returncode == 0, result.stderr
    return path, workdir, json.loads(result.stdout)


def test_search_with_backend_ort_records_ort_trials(ort_search):
    path, workdir, summary = ort_search
    assert summary["completed"] == 4 and summary["failed"] == 0
    assert summary["front"] and all(point["backend"] == "ort" for point in summary["front"])
    trials = pd.read_csv(workdir / "report" / "trials.csv")
    done = trials[trials["state"] == "COMPLETE"]
    assert len(done) >= 4 and set(done["backend"]) == {"ort"} and done["plan"].str.startswith("ort:float:").all()
    assert set(pd.read_csv(workdir / "report" / "pareto.csv")["backend"]) == {"ort"}
    report = (workdir / "report" / "report.html").read_text()
    assert "--backend ort" in report  # the reproduce command


def test_export_of_an_ort_trial_is_the_model_that_was_scored(ort_search, tmp_path):
    path, workdir, _ = ort_search
    trials = pd.read_csv(workdir / "report" / "trials.csv")
    row = trials[(trials["state"] == "COMPLETE") & (trials["float_count"] > 0) & (trials["float_count"] < 4)].iloc[0]
    trial, floats = int(row["trial"]), json.loads(row["float_layers"])
    out = tmp_path / "export"
    wrong = run("export", "--workdir", workdir, "--trial", trial, "--out", out, "--backend", "tvm")
    assert wrong.returncode == 2 and "ran on 'ort'" in wrong.stderr and len(wrong.stderr.splitlines()) == 1
    result = run("export", "--workdir", workdir, "--trial", trial, "--out", out, "--backend", "ort", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["backend"] == "ort" and summary["nodes_to_exclude"] == floats
    assert json.loads((out / "plan.json").read_text())["plan"] == row["plan"]
    exported = onnx.load(str(out / "model.int8.onnx"))
    assert _graph_float_convs(exported) == set(floats)
    # A direct ORT run of the exported file gives the trial's fidelity exactly.
    config = SearchConfig(model=str(path), eval_batches=4, calibration_batches=4)
    model = load_model(path)
    workspace = Workspace.from_config(config, model, workdir)
    snippet = runpy.run_path(str(out / "quantize_static.py"))
    assert snippet["NODES_TO_EXCLUDE"] == floats
    session = snippet["session"](str(out / "model.int8.onnx"))
    names = [o.name for o in session.get_outputs()]
    outputs = [dict(zip(names, session.run(names, batch))) for batch in workspace.eval_batches]
    metrics = compute_metrics(workspace.reference, outputs).values
    assert metrics["sqnr_db"] == row["sqnr_db"] and metrics["cosine"] == row["cosine"]
    # quantize_static.py makes the same model from model.onnx with the search's calibration inputs.

    class Reader:
        def __init__(self, batches):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    again = tmp_path / "again.int8.onnx"
    snippet["quantize"](Reader(workspace.calibration_batches), str(out / "model.onnx"), str(again))
    remade = onnx.load(str(again))
    assert {i.name: numpy_helper.to_array(i).tobytes() for i in remade.graph.initializer} == \
        {i.name: numpy_helper.to_array(i).tobytes() for i in exported.graph.initializer}
    for ours, theirs in zip(outputs, _run(remade, workspace.eval_batches)):
        for name in ours:
            np.testing.assert_array_equal(ours[name], theirs[name])


def test_a_conv_qdq_search_exports_the_qdq_model_it_scored_and_resumes_only_as_conv_qdq(tmp_path):
    path = models.save(models.chain_model(channels=(8, 16, 16, 16, 16), size=8, seed=21), tmp_path, "chain4")
    workdir = tmp_path / "work"
    settings = ["--backend", "ort", "--workdir", workdir, "--eval-batches", "4", "--calibration-batches", "4",
                "--repeats", "5", "--warmup", "1", "--remeasure-repeats", "5", "--metric", "sqnr_db"]
    result = run("search", path, "--trials", "4", "--ort-model", "conv-qdq", *settings, "--json")
    assert result.returncode == 0, result.stderr
    assert "--ort-model conv-qdq" in (workdir / "report" / "report.html").read_text()  # the reproduce command
    other = run("search", path, "--trials", "5", *settings)  # the same study with quantize_static's models
    assert other.returncode == 2 and "ort_model: 'quantize_static' != 'conv-qdq'" in other.stderr
    trials = pd.read_csv(workdir / "report" / "trials.csv")
    row = trials[(trials["state"] == "COMPLETE") & (trials["float_count"] > 0) & (trials["float_count"] < 4)].iloc[0]
    out = tmp_path / "export"
    exported = run("export", "--workdir", workdir, "--trial", int(row["trial"]), "--out", out, "--json")
    assert exported.returncode == 0, exported.stderr
    summary = json.loads(exported.stdout)
    assert summary["ort_model"] == "conv-qdq" and summary["snippet"].endswith("session.py")
    assert not (out / "quantize_static.py").exists()
    model = load_model(path)
    workspace = Workspace.from_config(SearchConfig(model=str(path), eval_batches=4, calibration_batches=4,
                                                   ort_model="conv-qdq"), model, workdir)
    plan = parse_plan(row["plan"], model)
    assert onnx.load(str(out / "model.int8.onnx")).SerializeToString() == \
        workspace.qdq_model(Plan(plan.float_ids)).SerializeToString()
    session = runpy.run_path(str(out / "session.py"))["session"](str(out / "model.int8.onnx"))
    names = [o.name for o in session.get_outputs()]
    outputs = [dict(zip(names, session.run(names, batch))) for batch in workspace.eval_batches]
    assert compute_metrics(workspace.reference, outputs).values["sqnr_db"] == row["sqnr_db"]


def test_bench_with_backend_ort_adds_ort_rows(ort_search):
    path, workdir, _ = ort_search
    result = run("bench", path, "--backend", "ort", "--plan", "conv1", "--workdir", workdir, "--repeats", "5",
                 "--warmup", "1", "--calibration-batches", "4", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    names = {row["name"]: row for row in payload["rows"]}
    assert set(names) == {"ort_float", "ort_int8", "ort_int8_conv_only", "openvino", "openvino_f32", "ort_plan1"}
    assert names["ort_plan1"]["plan"] == "ort:float:conv1" and names["ort_plan1"]["int8_convs"] == 3
    assert payload["tvm_float_ms"] is None


def test_sensitivity_with_the_ort_backend_times_ort_sessions(chain):
    from precsearch.study.sensitivity import run_sensitivity, to_frame

    model, workspace = chain
    rows = run_sensitivity(workspace, backends=("ort",))
    assert [row.id for row in rows] == list(model.capable_ids())
    assert all(row.latency_saved_ms is None and isinstance(row.ort_latency_saved_ms, float) for row in rows)
    frame = to_frame(rows, "sqnr_db")
    assert frame["ort_latency_saved_ms"].notna().all() and frame["latency_saved_ms"].isna().all()
