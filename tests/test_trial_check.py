"""Every search trial is cross-checked with ONNX Runtime as ``build --check`` is, with the real TVM backend.

A tiny 3-conv model, untuned builds: a normal trial records ``agrees`` or
``near-ties``; a build sabotaged to requantize one conv with a wrong scale is
a ``compiler problem``, a failed trial off the front.
"""

import numpy as np
import pandas as pd
import pytest

import models
from precsearch import workspace as workspace_module
from precsearch.tvm import CompileOptions, _int8_rewrite
from precsearch.study.config import SearchConfig
from precsearch.model.data import image_batches
from precsearch.fidelity.reference import reference_outputs
from precsearch.study.evaluator import TvmEvaluator
from precsearch.measure import CpuLock
from precsearch.model import load_model
from precsearch.model.plan import Plan
from precsearch.model.quantize import calibrate
from precsearch.report.writer import collect, write_report
from precsearch.study.record import AGREES, COMPILER_PROBLEM, NEAR_TIES, PlanRejected
from precsearch.study.search import open_study, run_worker, seed_plans
from precsearch.study.storage import default_storage_url, open_storage
from precsearch.workspace import Workspace

EVAL_BATCHES = 4


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    model = load_model(models.save(models.chain_model(), tmp_path_factory.mktemp("chain"), "chain"))
    calibration = image_batches(model, None, 8)
    ranges = calibrate(model, calibration)
    batches = image_batches(model, None, EVAL_BATCHES, offset=8)
    return model, ranges, batches, reference_outputs(model, batches), calibration


def _evaluator(chain, tmp_path, **settings):
    model, ranges, batches, reference, calibration = chain
    workspace = Workspace.in_memory(model, tmp_path, calibration, batches, CompileOptions(), ranges=ranges,
                                    reference=reference)
    return TvmEvaluator(workspace=workspace, metric="sqnr_db", goal=None, warmup=1, repeats=3,
                        lock=CpuLock(tmp_path / "lock"), **settings)


def _search(chain, evaluator, tmp_path, trials):
    model = chain[0]
    config = SearchConfig(model=str(model.source), metric="sqnr_db", sampler="random", trials=trials)
    url = default_storage_url(tmp_path)
    storage = open_storage(url, heartbeat_interval_s=config.heartbeat_interval_s,
                           grace_period_s=config.grace_period_s)
    handle = open_study(config, model, storage, url, "check", "sqnr_db")
    summary = run_worker(handle, model, evaluator, seeds=seed_plans(model))
    return summary, {t.user_attrs["seed"]: t for t in handle.study.get_trials() if "seed" in t.user_attrs}, handle


@pytest.fixture
def counted_runs(monkeypatch):
    """Batches each plan's library ran (the evaluator's builds only; a cross-check's probe build is not counted)."""
    runs = []
    real = workspace_module.build_plan

    def counting(*args, **kwargs):
        built = real(*args, **kwargs)
        runs.append(0)
        run = built.run

        def counted(batch):
            runs[-1] += 1
            return run(batch)

        built.run = counted
        return built

    monkeypatch.setattr(workspace_module, "build_plan", counting)
    return runs


def test_every_trial_records_its_cross_check_verdict_without_running_the_library_again(chain, tmp_path,
                                                                                        counted_runs):
    summary, seeds, handle = _search(chain, _evaluator(chain, tmp_path), tmp_path, trials=3)
    assert summary.completed == 3 and summary.failed == 0
    assert set(seeds) == {"all-int8", "all-float", "first-and-last-float"}
    for name in ("all-int8", "first-and-last-float"):  # plans with int8 layers: checked against ORT on their QDQ model
        attrs = seeds[name].user_attrs
        assert seeds[name].state.name == "COMPLETE" and attrs["verdict"] in (AGREES, NEAR_TIES), attrs
        assert attrs["verdict_detail"] and attrs["check_time_s"] >= 0
    float_attrs = seeds["all-float"].user_attrs
    assert float_attrs["verdict"] == AGREES and float_attrs["verdict_detail"].startswith("no int8 layers")
    # The check reused the fidelity run's outputs: each library ran the evaluation batches once, no more.
    assert counted_runs == [EVAL_BATCHES] * 3
    table = pd.read_csv(write_report(collect(handle.study), tmp_path / "report")["trials.csv"])
    assert set(table["verdict"]) <= {AGREES, NEAR_TIES} and table["verdict"].notna().all()
    assert "verdict" in pd.read_csv(tmp_path / "report" / "pareto.csv")


def test_a_plan_timed_while_another_process_was_busy_is_timed_again_and_its_load_recorded(chain, tmp_path,
                                                                                        monkeypatch):
    from precsearch.measure import _load
    from precsearch.study import evaluator as evaluator_module

    loads = iter([1.3, 0.1, 0.2, 1.7, 1.8])  # all-int8 loaded then quiet; all-float quiet; the third loaded twice
    monkeypatch.setattr(_load.CpuLoad, "others_busy_cores", lambda self: next(loads))
    timed = []
    real_measure = evaluator_module.measure_library

    def measure(*args, **kwargs):
        timed.append(1)
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(evaluator_module, "measure_library", measure)
    summary, seeds, handle = _search(chain, _evaluator(chain, tmp_path), tmp_path, trials=3)
    assert summary.completed == 3 and len(timed) == 5
    recorded = {name: trial.user_attrs["timing_others_busy_cores"] for name, trial in seeds.items()}
    assert recorded == {"all-int8": 0.1, "all-float": 0.2, "first-and-last-float": 1.7}
    table = pd.read_csv(write_report(collect(handle.study), tmp_path / "report")["trials.csv"])
    assert sorted(table["timing_others_busy_cores"]) == [0.1, 0.2, 1.7]


def test_a_miscompiled_int8_build_is_a_compiler_problem_and_a_failed_trial(chain, tmp_path, monkeypatch):
    original_scalar = _int8_rewrite._scalar

    def wrong_output_scale(params, expr, what, layer_id):  # the build requantizes conv1 with a 25 % wrong scale
        value = original_scalar(params, expr, what, layer_id)
        return value * 1.25 if (what == "output scale" and layer_id == "conv1") else value

    monkeypatch.setattr(_int8_rewrite, "_scalar", wrong_output_scale)
    evaluator = _evaluator(chain, tmp_path)
    with pytest.raises(PlanRejected, match=r"^compiler problem: .*conv1 \(Conv\)") as rejected:
        evaluator.evaluate(Plan(frozenset()))
    assert rejected.value.result.verdict == COMPILER_PROBLEM and np.isnan(rejected.value.result.latency_ms)

    summary, seeds, handle = _search(chain, evaluator, tmp_path, trials=2)  # the all-int8 and all-float seeds
    broken, fine = seeds["all-int8"], seeds["all-float"]
    assert broken.state.name == "FAIL" and broken.user_attrs["verdict"] == COMPILER_PROBLEM
    assert broken.user_attrs["fail_reason"].startswith("compiler problem: ") and "conv1" in broken.user_attrs[
        "fail_reason"]
    assert fine.state.name == "COMPLETE" and fine.user_attrs["verdict"] == AGREES  # float convs are not affected
    assert summary.failed == 1 and summary.completed == 1
    assert [p.plan for p in summary.front] == [fine.user_attrs["plan"]]
    table = pd.read_csv(write_report(collect(handle.study), tmp_path / "report")["trials.csv"])
    row = table[table["trial"] == broken.number].iloc[0]
    assert row["state"] == "FAIL" and row["verdict"] == COMPILER_PROBLEM


def test_an_all_float_build_off_ort_float_is_a_compiler_problem(chain, tmp_path):
    model, _, _, reference, _ = chain
    evaluator = _evaluator(chain, tmp_path)
    all_float = Plan(frozenset(model.capable_ids()))
    close = [{name: value * (1 + 1e-6) for name, value in reference[0].items()}]
    assert evaluator.check(all_float, model.proto, close)[0] == AGREES
    off = [{name: value * (1 + 1e-3) for name, value in reference[0].items()}]  # 10x cross_check's float tolerance
    verdict, detail = evaluator.check(all_float, model.proto, off)
    assert verdict == COMPILER_PROBLEM and detail.startswith("compiler problem: the all-float build differs")


def test_the_search_names_verdicts_as_crosscheck_does():
    from precsearch.fidelity import crosscheck
    from precsearch.study import record as scoring

    assert (scoring.AGREES, scoring.NEAR_TIES, scoring.COMPILER_PROBLEM) == (
        crosscheck.AGREES, crosscheck.NEAR_TIES, crosscheck.COMPILER_PROBLEM)
