"""Reports from a stored study, report.html in headless Chromium, and exports that reproduce a trial."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import optuna
import pandas as pd
import pytest
from PIL import Image

import models
from precsearch.tvm import LoadedLibrary
from precsearch.study.config import SearchConfig
from precsearch.model.data import image_batches, split_batches
from precsearch.fidelity.reference import reference_outputs, run_ort
from precsearch.model import open_model
from precsearch.fidelity.metrics import compute_metrics
from precsearch.model import load_model
from precsearch.model.quantize import calibrate
from precsearch.report.writer import collect, knee_point, write_report
from precsearch.study.record import StudyAttrs
from precsearch.study.search import open_study, run_worker, seed_plans
from precsearch.study.storage import default_storage_url, open_storage
from standin import StandInEvaluator

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0", "--window-size=1200,1600", "--virtual-time-budget=8000"]


@pytest.fixture(scope="module")
def stored_study(tmp_path_factory):
    """A finished constrained search of a 6-conv model, written to SQLite, then closed."""
    folder = tmp_path_factory.mktemp("report")
    model = load_model(models.save(models.chain_model(channels=(8, 16, 16, 16, 16, 16, 16), size=8, seed=5),
                                   folder, "six"))
    ranges = calibrate(model, image_batches(model, None, 6))
    batches = image_batches(model, None, 6, offset=6)
    evaluator = StandInEvaluator(model, ranges, batches, run_ort(model.proto, batches),
                                 fail_plans=[seed_plans(model)[2][1]])
    config = SearchConfig(model=str(model.source), metric="cosine", max_drop=1e-5, sampler="random", trials=30)
    url = default_storage_url(folder)
    storage = open_storage(url, heartbeat_interval_s=config.heartbeat_interval_s, grace_period_s=config.grace_period_s)
    handle = open_study(config, model, storage, url, "six", "cosine")
    handle.study.set_user_attr("baselines", {"ort_float_ms": 2.0, "ort_int8_ms": 1.0, "ort_int8_cosine": 0.9999})
    run_worker(handle, model, evaluator, seeds=seed_plans(model))
    return folder, url


def test_report_from_storage_alone_holds_exactly_the_feasible_front(stored_study, tmp_path):
    folder, url = stored_study
    study = optuna.load_study(study_name="six", storage=url)  # a fresh handle: storage is all there is
    workdir = tmp_path / "work"
    workdir.mkdir()
    pd.DataFrame({"rank": [1, 2], "id": ["conv3", "conv0"], "only_int8.cosine": [0.99, 0.999]}).to_csv(
        workdir / "sensitivity.csv", index=False)
    files = write_report(collect(study, workdir=workdir), tmp_path / "report")
    assert sorted(p.name for p in files.values()) == ["pareto.csv", "pareto.html", "pareto.png", "report.html",
                                                      "trials.csv"]
    trials = pd.read_csv(files["trials.csv"])
    assert len(trials) == len(study.trials)
    assert (trials["state"] == "FAIL").sum() == 1 and trials["fail_reason"].dropna().str.contains("CompileError").all()
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    feasible = {t.user_attrs["plan"]: tuple(t.values) for t in done if t.values[1] >= 1 - 1e-5}
    expected = {plan for plan, (lat, fid) in feasible.items()
                if not any(l2 <= lat and f2 >= fid and (l2 < lat or f2 > fid) for l2, f2 in feasible.values())}
    pareto = pd.read_csv(files["pareto.csv"])
    assert set(pareto["plan"]) == expected and len(pareto) == len(expected)
    assert list(pareto["latency_ms"]) == sorted(pareto["latency_ms"])
    for column in ("float_layers", "latency_ms", "latency_iqr_ms", "cosine", "sqnr_db", "top1", "speedup_vs_ort_float",
                   "speedup_vs_ort_int8"):
        assert column in pareto, column
    row = pareto.iloc[0]
    assert row["speedup_vs_ort_float"] == pytest.approx(2.0 / row["latency_ms"])
    assert isinstance(json.loads(row["float_layers"]), list)
    # The plotly page carries each point's plan for its hover text.
    page = files["pareto.html"].read_text()
    assert json.loads(pareto.iloc[-1]["float_layers"])[0] in page and "hovertemplate" in page
    assert "TVM all-int8" in page and "TVM all-float" in page and "ORT float" in page
    report = files["report.html"].read_text()
    assert "Ship trial" in report and "precsearch export" in report and "precsearch search" in report
    assert report.count("<script") >= 2 and "data:image/png;base64," in report
    assert "sensitivity: cosine with only that layer int8" in report
    assert "which layers stay float" in report and "hypervolume of the feasible front" in report


def test_knee_point():
    latency = np.array([1.0, 2.0, 3.0, 10.0])
    fidelity = np.array([0.0, 0.9, 0.95, 1.0])
    assert knee_point(latency, fidelity) == 1  # most of the fidelity for a fifth of the latency range
    assert knee_point(latency[:2], fidelity[:2]) == 0
    assert knee_point(latency, -fidelity, higher_is_better=False) == 1


def test_knee_point_of_a_front_ending_in_an_exact_plan():
    # SQNR: the all-float plan is exact (+inf dB); the knee is where it would be with the best finite value there
    latency = np.array([1.0, 2.0, 3.0, 10.0])
    with np.errstate(all="raise"):  # no inf/inf or 0/0 on the way
        assert knee_point(latency, np.array([20.0, 38.0, 39.0, np.inf])) == 1
        assert knee_point(latency, np.array([20.0, 38.0, 39.0, 40.0])) == 1


def _chromium() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    if os.getuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium",
                       shell=True, capture_output=True, timeout=1200)
        found = shutil.which("chromium")
    if not found:
        if os.environ.get("CI"):
            pytest.fail("CI must provide Debian's chromium (tests/test_report.py installs it as root)")
        pytest.skip("no chromium and no way to install it")
    return found


def _open_in_chromium(page: Path, screenshot: Path) -> list[str]:
    """The page's JavaScript errors (console lines Chromium logs), after taking a screenshot."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                 f"--screenshot={screenshot}", page.resolve().as_uri()],
                                capture_output=True, text=True, timeout=180)
    assert screenshot.is_file(), result.stderr[-2000:]
    return [line for line in result.stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]


def test_report_html_loads_in_chromium_without_javascript_errors(stored_study, tmp_path):
    folder, url = stored_study
    files = write_report(collect(optuna.load_study(study_name="six", storage=url), workdir=folder), tmp_path)
    # The check can fail: a page with a broken script is caught.
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><h1>x</h1><script>notDefinedAnywhere();</script></body></html>")
    assert _open_in_chromium(broken, tmp_path / "broken.png")
    errors = _open_in_chromium(files["report.html"], tmp_path / "report.png")
    assert errors == []
    pixels = np.asarray(Image.open(tmp_path / "report.png").convert("L"), dtype=np.float64)
    assert pixels.shape[0] >= 1000 and pixels.std() > 20  # text, a PNG plot and plotly charts, not a blank page
    assert (pixels < 128).mean() > 0.01


def run(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "precsearch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_export_reproduces_the_trial_and_report_regenerates_from_storage(tmp_path):
    model_path = models.save(models.chain_model(channels=(8, 16, 16, 16, 16), size=8, seed=21), tmp_path, "four")
    workdir = tmp_path / "work"
    result = run("search", model_path, "--workdir", workdir, "--trials", "4", "--sampler", "random", "--untuned",
                 "--metric", "sqnr_db", "--eval-batches", "4", "--calibration-batches", "4", "--repeats", "5",
                 "--warmup", "1", "--remeasure-repeats", "10", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (workdir / "report" / "report.html").is_file()
    study = optuna.load_study(study_name=summary["study"], storage=default_storage_url(workdir))
    assert set(map(int, study.user_attrs["remeasured"])) == {p["trial"] for p in summary["front"]}
    assert {"ort_float_ms", "ort_int8_ms", "ort_int8_sqnr_db"} <= set(study.user_attrs["baselines"])
    # The baselines were timed again around the front, and the report compares with those figures.
    again = study.user_attrs["remeasured_baselines"]
    assert again["runs"] == 10 and again["ort_float_ms"] == pytest.approx(
        (again["before"]["ort_float_ms"] + again["after"]["ort_float_ms"]) / 2)

    shutil.rmtree(workdir / "report")
    regenerated = run("report", "--workdir", workdir)
    assert regenerated.returncode == 0, regenerated.stderr
    assert len(pd.read_csv(workdir / "report" / "pareto.csv")) == len(summary["front"])

    # Export a front plan that mixes int8 and float when there is one.
    trial = max(summary["front"], key=lambda p: 0 < len(p["float_layers"]) < 4)["trial"]
    out = tmp_path / "export"
    exported = run("export", "--workdir", workdir, "--trial", trial, "--out", out, "--json")
    assert exported.returncode == 0, exported.stderr
    plan = json.loads(exported.stdout)
    recorded = study.trials[trial]
    assert plan["float_layers"] == recorded.user_attrs["float_layers"]
    for name in ("model.so", "model.qdq.onnx", "plan.json", "onnxruntime_quantize.py", "nncf_ignored_scope.py",
                 "inc_op_name_dict.py"):
        assert (out / name).is_file(), name
    snippet = {}
    exec((out / "inc_op_name_dict.py").read_text(), snippet)
    assert sorted(snippet["OP_NAME_DICT"]) == sorted(plan["float_layers"])
    assert f"IgnoredScope(names={json.dumps(plan['float_layers'])})" in (out / "nncf_ignored_scope.py").read_text()
    assert f"NODES_TO_EXCLUDE = {json.dumps(plan['float_layers'])}" in (out / "onnxruntime_quantize.py").read_text()

    # The search's own evaluation inputs and reference, rebuilt from the stored settings.
    config = SearchConfig.from_dict(StudyAttrs(study).config)
    model, preset = open_model(config.model, config.input_shapes)
    _, batches = split_batches(model, config.data, config.preset or preset, config.calibration_batches,
                               config.eval_batches)
    reference = reference_outputs(model, batches, cache_dir=workdir / "cache")
    # The exported QDQ model runs in ONNX Runtime and keeps the trial's float layers float.
    qdq = onnx.load(out / "model.qdq.onnx")
    dequantized = {out for node in qdq.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    weight_is_int8 = {node.name: node.input[1] in dequantized for node in qdq.graph.node if node.op_type == "Conv"}
    assert {name for name, int8 in weight_is_int8.items() if not int8} == set(plan["float_layers"])
    assert {name for name, int8 in weight_is_int8.items() if int8} == set(plan["int8_layers"])
    ort_outputs = run_ort(qdq, batches)
    assert compute_metrics(reference, ort_outputs).values["sqnr_db"] > 20
    # The exported library loads in TVM and reproduces the trial's outputs: the same fidelity, to the last bit.
    library = LoadedLibrary(out / "model.so", plan["inputs"], plan["outputs"])
    metrics = compute_metrics(reference, [library.run(b) for b in batches]).values
    assert metrics["sqnr_db"] == pytest.approx(recorded.user_attrs["metric.sqnr_db"], rel=1e-12)
    assert metrics["max_abs_error"] == pytest.approx(recorded.user_attrs["metric.max_abs_error"], rel=1e-12)

    bad = run("export", "--workdir", workdir, "--trial", "999", "--out", tmp_path / "x")
    assert bad.returncode == 2 and "'trial' parameter of export" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_the_knee_is_recommended_only_among_plans_that_beat_onnx_runtime():
    import pandas as pd

    from precsearch.report.writer import beats_baselines

    front = pd.DataFrame({"latency_ms": [1.0, 2.0, 3.0], "top1": [0.90, 0.97, 1.0],
                          "remeasured_median_ms": [None, None, 3.5]})
    baselines = {"ort_float_ms": 3.2, "ort_int8_ms": 1.5, "ort_int8_top1": 0.95}
    beats, ship = beats_baselines(front, baselines, "top1", True)
    # Plan 0 (1.0 ms) is faster than ORT int8; plan 1 is more faithful than ORT int8; plan 2 (3.5 ms
    # re-measured) is slower than ORT float, which is exact.
    assert beats.tolist() == [True, True, False] and ship is None
    beats, ship = beats_baselines(front, {**baselines, "ort_float_ms": 0.9}, "top1", True)
    assert beats.tolist() == [False, False, False] and ship == "ONNX Runtime float"
    beats, ship = beats_baselines(front.iloc[:1], {**baselines, "ort_int8_ms": 0.5}, "top1", True)
    assert beats.tolist() == [False] and ship == "ONNX Runtime int8 (quantize_static)"
    nmse = pd.DataFrame({"latency_ms": [1.0], "nmse": [0.02]})  # lower is better
    assert beats_baselines(nmse, {"ort_int8_ms": 0.8, "ort_int8_nmse": 0.01}, "nmse", False)[1] is not None
    assert beats_baselines(nmse, {"ort_int8_ms": 0.8, "ort_int8_nmse": 0.05}, "nmse", False)[1] is None
    assert beats_baselines(front.iloc[:0], baselines, "top1", True)[1] is None
    # OpenVINO's default build is a baseline with a fidelity of its own: it beats the plans it is faster than
    # and at least as faithful as (plan 1: 2.0 ms, 0.97), not plan 0 (faster); plan 2 is ORT float's already
    beats, ship = beats_baselines(front, {**baselines, "openvino_ms": 1.8, "openvino_top1": 0.98}, "top1", True)
    assert beats.tolist() == [True, False, False] and ship is None
    beats, ship = beats_baselines(front, {**baselines, "openvino_ms": 0.5, "openvino_top1": 1.0}, "top1", True)
    assert beats.tolist() == [False, False, False] and ship == "OpenVINO (its default build)"
    # With a goal, a baseline that meets it beats every plan it is at least as fast as, however faithful the
    # plan: OpenVINO at 1.8 ms and 0.96 (goal 0.95) beats plans 1 and 2, which are more faithful but slower
    openvino = {**baselines, "openvino_ms": 1.8, "openvino_top1": 0.96}
    assert beats_baselines(front, openvino, "top1", True)[0].tolist() == [True, True, False]
    beats, ship = beats_baselines(front, openvino, "top1", True, goal=0.95)
    assert beats.tolist() == [True, False, False] and ship is None
    beats, ship = beats_baselines(front, {**openvino, "openvino_ms": 0.9}, "top1", True, goal=0.95)
    assert beats.tolist() == [False, False, False] and ship == "OpenVINO (its default build)"
    # a baseline below the goal beats only what it is as faithful as (lower is better: nmse, goal 0.01)
    assert beats_baselines(nmse, {"ort_int8_ms": 0.8, "ort_int8_nmse": 0.05}, "nmse", False, goal=0.01)[1] is None
    assert beats_baselines(nmse, {"ort_int8_ms": 0.8, "ort_int8_nmse": 0.005}, "nmse", False, goal=0.01)[1] \
        is not None
