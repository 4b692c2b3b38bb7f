"""precsearch.study.record: TrialRecord <-> Optuna user attributes, set_attrs, copy_result and StudyAttrs."""

import json
import math

import optuna
import pytest

from precsearch.model.plan import Plan
from precsearch.study.record import (
    AGREES,
    COMPILER_PROBLEM,
    DETAIL_KEYS,
    OWN_ATTRS,
    PlanRejected,
    PlanResult,
    StudyAttrs,
    TrialRecord,
    copy_result,
    result_attrs,
    set_attrs,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _full_result(**changes) -> PlanResult:
    values = dict(
        latency_ms=1.25,
        latency_iqr_ms=0.05,
        metrics={"sqnr_db": math.inf, "cosine": 0.9990234375, "top1": 1.0},
        build_time_s=3.5,
        eval_time_s=0.75,
        measure_time_s=2.0,
        fidelity_batches=4,
        stopped_early=True,
        details={"tuned_kernels": 3, "total_kernels": 7, "boundary_transforms": 2, "check_time_s": 0.125},
        verdict=AGREES,
        verdict_detail="agrees: 4 outputs within one step",
    )
    values.update(changes)
    return PlanResult(**values)


def _full_record(**changes) -> TrialRecord:
    values = dict(plan_key="float:conv0,conv2", float_layers=("conv0", "conv2"), int8_convs=1, result=_full_result(),
                  feasible=True, seed="first+last float", worker="host:123", reruns=2, estimate_latency_ms=1.5,
                  estimate_fidelity=0.75, proposal_kind="goal")
    values.update(changes)
    return TrialRecord(**values)


def _study():
    return optuna.create_study(directions=["minimize", "maximize"])


# --------------------------------------------------------------------------- to_attrs / from_attrs


def test_to_attrs_of_a_full_record_is_exact():
    attrs = _full_record().to_attrs()
    assert attrs == {
        "plan": "float:conv0,conv2",
        "float_layers": ["conv0", "conv2"],
        "int8_convs": 1,
        "feasible": True,
        "seed": "first+last float",
        "worker": "host:123",
        "reruns": 2,
        "estimate_latency_ms": 1.5,
        "estimate_fidelity": 0.75,
        "proposal_kind": "goal",
        "latency_ms": 1.25,
        "latency_iqr_ms": 0.05,
        "build_time_s": 3.5,
        "eval_time_s": 0.75,
        "measure_time_s": 2.0,
        "fidelity_batches": 4,
        "stopped_early": True,
        "metric.sqnr_db": "inf",
        "metric.cosine": 0.9990234375,
        "metric.top1": 1.0,
        "tuned_kernels": 3,
        "total_kernels": 7,
        "boundary_transforms": 2,
        "check_time_s": 0.125,
        "verdict": "agrees",
        "verdict_detail": "agrees: 4 outputs within one step",
    }


def test_inf_metric_is_stored_as_text_and_read_back_as_float_inf():
    attrs = result_attrs(_full_result(metrics={"sqnr_db": math.inf, "nmse": -math.inf}))
    assert attrs["metric.sqnr_db"] == "inf"
    assert attrs["metric.nmse"] == "-inf"
    record = TrialRecord.from_attrs(attrs)
    assert record.result.metrics == {"sqnr_db": math.inf, "nmse": -math.inf}
    assert isinstance(record.result.metrics["sqnr_db"], float)


def test_nan_metric_is_stored_as_text_and_read_back_as_nan():
    attrs = result_attrs(_full_result(metrics={"sqnr_db": math.nan}))
    assert attrs["metric.sqnr_db"] == "nan"
    assert math.isnan(TrialRecord.from_attrs(attrs).result.metrics["sqnr_db"])


def test_full_record_round_trips_through_attrs():
    record = _full_record()
    back = TrialRecord.from_attrs(record.to_attrs(), number=5, state="COMPLETE")
    assert back == TrialRecord(**{**record.__dict__, "number": 5, "state": "COMPLETE"})
    assert back.result == record.result
    assert back.result.metrics["sqnr_db"] == math.inf
    assert back.result.details == {"tuned_kernels": 3, "total_kernels": 7, "boundary_transforms": 2,
                                   "check_time_s": 0.125}
    assert back.result.verdict == "agrees"
    assert back.result.verdict_detail == "agrees: 4 outputs within one step"
    assert back.plan == Plan(frozenset({"conv0", "conv2"}))
    assert back.metrics == {"sqnr_db": math.inf, "cosine": 0.9990234375, "top1": 1.0}


def test_from_attrs_reads_only_the_known_detail_keys():
    attrs = result_attrs(_full_result(details={"tuned_kernels": 1, "something_else": 9}))
    assert "something_else" not in attrs  # only the known details: no key can shadow a trial attribute
    assert TrialRecord.from_attrs(attrs).result.details == {"tuned_kernels": 1}
    shadow = result_attrs(_full_result(details={"plan": "float:", "tuned_kernels": 2}))
    assert "plan" not in shadow and shadow["tuned_kernels"] == 2
    assert DETAIL_KEYS == ("tuned_kernels", "total_kernels", "boundary_transforms", "check_time_s",
                           "timing_others_busy_cores")


def test_result_without_verdict_writes_no_verdict_keys():
    attrs = result_attrs(_full_result(verdict=None, verdict_detail="ignored"))
    assert "verdict" not in attrs and "verdict_detail" not in attrs
    back = TrialRecord.from_attrs(attrs).result
    assert back.verdict is None
    assert back.verdict_detail == ""


def test_failed_trial_with_only_a_fail_reason_has_no_result():
    record = TrialRecord(fail_reason="CompileError: [pass 'Legalize'] boom")
    attrs = record.to_attrs()
    assert attrs == {"fail_reason": "CompileError: [pass 'Legalize'] boom"}
    back = TrialRecord.from_attrs(attrs, number=3, state="FAIL")
    assert back.result is None
    assert back.metrics == {}
    assert back.fail_reason == "CompileError: [pass 'Legalize'] boom"
    assert back.plan_key is None
    assert back.float_layers == ()
    assert back.plan == Plan(frozenset())
    assert (back.number, back.state) == (3, "FAIL")


def test_empty_record_writes_nothing():
    assert TrialRecord().to_attrs() == {}
    assert TrialRecord.from_attrs({}) == TrialRecord()


def test_plan_with_no_float_layers_still_writes_float_layers():
    attrs = TrialRecord(plan_key="float:", float_layers=()).to_attrs()
    assert attrs == {"plan": "float:", "float_layers": []}


def test_rejected_build_records_no_latency_keys():
    rejected = _full_result(latency_ms=math.nan, latency_iqr_ms=math.nan, measure_time_s=0.0,
                            verdict=COMPILER_PROBLEM, verdict_detail="compiler problem: conv1 is off by 40 steps")
    attrs = TrialRecord(plan_key="float:", result=rejected,
                        fail_reason="compiler problem: conv1 is off by 40 steps").to_attrs()
    assert "latency_ms" not in attrs
    assert "latency_iqr_ms" not in attrs
    assert attrs["verdict"] == "compiler problem"
    assert attrs["metric.cosine"] == 0.9990234375
    back = TrialRecord.from_attrs(attrs).result
    assert math.isnan(back.latency_ms)
    assert math.isnan(back.latency_iqr_ms)
    assert back.metrics == {"sqnr_db": math.inf, "cosine": 0.9990234375, "top1": 1.0}
    assert back.verdict == COMPILER_PROBLEM
    assert back.fidelity_batches == 4


def test_an_infinite_latency_is_not_timed_either():
    # math.isfinite decides: an inf latency is dropped like a NaN (JSON could not hold it).
    attrs = result_attrs(_full_result(latency_ms=math.inf))
    assert "latency_ms" not in attrs and "latency_iqr_ms" not in attrs


def test_plan_rejected_carries_the_result_and_its_detail():
    result = _full_result(verdict=COMPILER_PROBLEM, verdict_detail="compiler problem: conv1")
    exc = PlanRejected(result)
    assert str(exc) == "compiler problem: conv1"
    assert exc.result is result
    assert isinstance(exc, RuntimeError)
    assert str(PlanRejected(_full_result(verdict=COMPILER_PROBLEM, verdict_detail=""))) == "compiler problem"


# --------------------------------------------------------------------------- a real Optuna trial


def test_set_attrs_on_a_running_trial_then_from_trial_of_the_frozen_trial():
    study = _study()
    trial = study.ask()
    set_attrs(trial, plan_key="float:conv1", float_layers=("conv1",), worker="host:1")
    set_attrs(trial, result=_full_result(), int8_convs=2, feasible=False)
    assert trial.user_attrs["plan"] == "float:conv1"
    assert trial.user_attrs["float_layers"] == ["conv1"]
    assert trial.user_attrs["metric.sqnr_db"] == "inf"
    study.tell(trial, [1.25, 30.0])
    (frozen,) = study.get_trials()
    record = TrialRecord.from_trial(frozen)
    assert record.state == "COMPLETE"
    assert record.number == 0
    assert record.plan_key == "float:conv1"
    assert record.float_layers == ("conv1",)
    assert record.int8_convs == 2
    assert record.feasible is False
    assert record.worker == "host:1"
    assert record.result == _full_result()


def test_from_trial_gives_the_number_and_state_of_each_trial():
    study = _study()
    for _ in range(2):
        study.tell(study.ask(), [1.0, 2.0])
    failed = study.ask()
    set_attrs(failed, fail_reason="RuntimeError: x")
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    records = [TrialRecord.from_trial(t) for t in study.get_trials()]
    assert [(r.number, r.state) for r in records] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "FAIL")]
    assert records[2].fail_reason == "RuntimeError: x"
    assert records[2].result is None


def test_set_attrs_none_clears_a_value():
    study = _study()
    trial = study.ask()
    set_attrs(trial, duplicate_of=4)
    assert TrialRecord.from_attrs(trial.user_attrs).duplicate_of == 4
    set_attrs(trial, reruns=4, duplicate_of=None)
    record = TrialRecord.from_attrs(trial.user_attrs)
    assert record.duplicate_of is None
    assert record.reruns == 4
    assert "duplicate_of" not in record.to_attrs()


def test_set_attrs_unknown_field_raises_type_error_and_writes_nothing_after_it():
    study = _study()
    trial = study.ask()
    with pytest.raises(TypeError, match="TrialRecord has no field 'latency'"):
        set_attrs(trial, latency=1.0)
    with pytest.raises(TypeError, match="no field 'number'"):
        set_attrs(trial, number=3)  # read from the trial, never an attribute
    with pytest.raises(TypeError, match="no field 'state'"):
        set_attrs(trial, state="COMPLETE")
    assert trial.user_attrs == {}


def test_set_attrs_result_of_a_rejected_build_writes_no_latency():
    study = _study()
    trial = study.ask()
    set_attrs(trial, result=_full_result(latency_ms=math.nan), fail_reason="compiler problem: x")
    assert "latency_ms" not in trial.user_attrs
    assert "latency_iqr_ms" not in trial.user_attrs
    assert trial.user_attrs["fail_reason"] == "compiler problem: x"


def test_copy_result_copies_every_attribute_but_the_trials_own():
    study = _study()
    owner = study.ask()
    for name, value in _full_record(duplicate_of=None, reruns=4).to_attrs().items():
        owner.set_user_attr(name, value)
    study.tell(owner, [1.25, 30.0])
    frozen_owner = study.get_trials()[0]

    follower = study.ask()
    set_attrs(follower, plan_key="float:conv0,conv2", float_layers=("conv0", "conv2"), worker="other:9",
              seed="my seed")
    copy_result(follower, frozen_owner)
    assert OWN_ATTRS == ("seed", "worker", "plan", "float_layers", "bf16_layers", "reruns", "duplicate_of",
                         "estimate_latency_ms", "estimate_fidelity", "proposal_kind")
    assert frozen_owner.user_attrs["reruns"] == 4 and "reruns" not in follower.user_attrs  # the owner's, not its
    expected = {k: v for k, v in frozen_owner.user_attrs.items() if k not in OWN_ATTRS}
    assert {k: v for k, v in follower.user_attrs.items() if k not in OWN_ATTRS} == expected
    # The follower's own attributes are untouched.
    assert follower.user_attrs["worker"] == "other:9"
    assert follower.user_attrs["seed"] == "my seed"
    assert follower.user_attrs["plan"] == "float:conv0,conv2"
    assert TrialRecord.from_attrs(follower.user_attrs).result == _full_result()


def test_copy_result_does_not_add_own_attrs_the_follower_lacks():
    study = _study()
    owner = study.ask()
    for name, value in _full_record().to_attrs().items():
        owner.set_user_attr(name, value)
    study.tell(owner, [1.0, 2.0])
    follower = study.ask()
    copy_result(follower, study.get_trials()[0])
    for name in OWN_ATTRS:
        assert name not in follower.user_attrs
    assert follower.user_attrs["latency_ms"] == 1.25
    assert follower.user_attrs["metric.sqnr_db"] == "inf"


# --------------------------------------------------------------------------- StudyAttrs


def test_study_attrs_of_a_study_without_attributes():
    attrs = StudyAttrs(_study())
    assert attrs.config is None
    assert attrs.model_sha256 is None
    assert attrs.layer_ids == ()
    assert attrs.seeded is None
    assert attrs.baselines == {}
    assert attrs.remeasured == {}


def test_study_attrs_read_back_what_was_set():
    study = _study()
    attrs = StudyAttrs(study)
    attrs.set(StudyAttrs.CONFIG, {"model": "m.onnx", "trials": 3})
    attrs.set(StudyAttrs.MODEL, "ab" * 32)
    attrs.set(StudyAttrs.LAYER_IDS, ["conv0", "conv1"])
    attrs.set(StudyAttrs.SEEDED, ["all-float", "all-int8"])
    attrs.set(StudyAttrs.BASELINES, {"ort_float_ms": 2.5})
    assert study.user_attrs["precsearch_config"] == {"model": "m.onnx", "trials": 3}
    assert attrs.config == {"model": "m.onnx", "trials": 3}
    assert attrs.model_sha256 == "ab" * 32
    assert attrs.layer_ids == ("conv0", "conv1")
    assert attrs.seeded == ["all-float", "all-int8"]
    assert attrs.baselines == {"ort_float_ms": 2.5}


def test_study_attrs_baselines_is_a_copy_and_none_reads_as_empty():
    study = _study()
    attrs = StudyAttrs(study)
    attrs.set(StudyAttrs.BASELINES, None)
    assert attrs.baselines == {}
    attrs.set(StudyAttrs.BASELINES, {"ort_int8_ms": 1.0})
    attrs.baselines["ort_int8_ms"] = 99.0
    assert attrs.baselines == {"ort_int8_ms": 1.0}


def test_set_remeasured_stores_str_keys_and_remeasured_reads_int_keys():
    study = _study()
    attrs = StudyAttrs(study)
    front = {3: {"median_ms": 1.5, "iqr_ms": 0.1, "runs": 200}, 12: {"median_ms": 0.9, "iqr_ms": 0.05, "runs": 200}}
    attrs.set_remeasured(front)
    assert study.user_attrs["remeasured"] == {"3": front[3], "12": front[12]}
    assert attrs.remeasured == front
    assert sorted(attrs.remeasured) == [3, 12]


def test_attrs_survive_strict_json_as_optuna_storages_keep_them():
    # RDB storages keep user attributes as JSON text, which has no inf or nan.
    record = _full_record(result=_full_result(metrics={"sqnr_db": math.inf, "nmse": math.nan, "cosine": 0.5}))
    text = json.dumps(record.to_attrs(), allow_nan=False)
    back = TrialRecord.from_attrs(json.loads(text)).result
    assert back.metrics["sqnr_db"] == math.inf
    assert math.isnan(back.metrics["nmse"])
    assert back.metrics["cosine"] == 0.5
    assert back.latency_ms == 1.25
    assert back.details == record.result.details
