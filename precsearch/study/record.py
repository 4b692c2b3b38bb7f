"""What a backend returns for a plan, what a trial records, and the only code that knows the attribute names.

A trial's outcome is one :class:`TrialRecord`; :meth:`TrialRecord.to_attrs`
writes it as Optuna user attributes and :meth:`TrialRecord.from_trial` reads it
back, so the loop (:mod:`precsearch.study.search`), the report, the export and
the experiments never spell an attribute name.  The study-level attributes
(settings, model, baselines, re-measured front) are read and written by
:class:`StudyAttrs` for the same reason.  Kept apart from the loop and from the
TVM backend (:mod:`precsearch.study.evaluator`) so that neither imports the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Protocol

from precsearch.errors import PrecsearchError
from precsearch.model.plan import TVM, TWO_STATES, Plan

# Verdicts of the cross-check of a build with ONNX Runtime on the same QDQ model: the strings of
# precsearch.fidelity.crosscheck (a test holds them equal), repeated so the search loop need not import TVM.
AGREES, NEAR_TIES, COMPILER_PROBLEM = "agrees", "near-ties", "compiler problem"


@dataclass(frozen=True)
class PlanResult:
    """What an evaluator measured for one plan."""

    latency_ms: float
    latency_iqr_ms: float
    metrics: dict[str, float]
    build_time_s: float = 0.0
    eval_time_s: float = 0.0
    measure_time_s: float = 0.0
    fidelity_batches: int = 0
    stopped_early: bool = False
    details: dict = field(default_factory=dict)
    # The cross-check of the build with ONNX Runtime (AGREES, NEAR_TIES or COMPILER_PROBLEM)
    # and its one-line summary; None when the backend does not check (a stand-in).
    verdict: str | None = None
    verdict_detail: str = ""


class PlanRejected(PrecsearchError, RuntimeError):
    """The plan built and ran, but its cross-check found a compiler problem: the trial fails with that reason.

    ``result`` holds what was measured before the check rejected it (the
    fidelity metrics, the verdict and its summary; no latency).
    """

    def __init__(self, result: PlanResult):
        super().__init__(result.verdict_detail or COMPILER_PROBLEM)
        self.result = result


class PlanEvaluator(Protocol):
    """Everything the search loop calls on a backend (TVM, ONNX Runtime, a stand-in in tests).

    A plan carries the runtime it is for (``plan.backend``); a study over two
    runtimes hands its plans to a dispatching evaluator.
    """

    def evaluate(self, plan: Plan) -> PlanResult:
        """Build, score and time ``plan``; raise (or return a COMPILER_PROBLEM verdict) when its build is wrong."""
        ...

    def measure_baselines(self) -> dict | None:
        """ONNX Runtime float and int8 latency and fidelity (see :data:`BASELINE_KEYS`); None when it cannot run ORT."""
        ...

    def remeasure(self, plan: Plan, repeats: int):
        """A :class:`~precsearch.measure.Latency` of ``plan`` from ``repeats`` runs; None when it cannot time again."""
        ...

    def remeasure_baselines(self, repeats: int) -> dict | None:
        """ONNX Runtime float and int8 timed again (``ort_float_ms``, ``ort_int8_ms``, IQRs); None without ORT."""
        ...


# --------------------------------------------------------------------------- one trial

# Fields of PlanResult.details that the backends fill and the report shows.
DETAIL_KEYS = ("tuned_kernels", "total_kernels", "boundary_transforms", "check_time_s", "timing_others_busy_cores")
_RESULT_SCALARS = ("latency_iqr_ms", "build_time_s", "eval_time_s", "measure_time_s", "fidelity_batches",
                   "stopped_early")
_METRIC_PREFIX = "metric."


@dataclass(frozen=True)
class TrialRecord:
    """What one trial of a search recorded: its plan, who ran it, and its result or why it has none.

    ``result`` is None for a trial that failed before anything was measured;
    a compiler-problem trial keeps the metrics and verdict of the wrong library
    (no latency).  Duplicates (``duplicate_of``) carry their owner's result.
    ``backend`` is the runtime the plan was built for; it is written only when
    it is not ``"tvm"``, so a trial without it (every study made before the
    ONNX Runtime backend) reads as a TVM trial.
    """

    plan_key: str | None = None
    float_layers: tuple[str, ...] = ()  # every layer the plan does not run int8, bf16 ones included
    backend: str = TVM
    bf16_layers: tuple[str, ...] = ()  # written only when there are any (a two-state study has none)
    int8_convs: int | None = None
    result: PlanResult | None = None
    feasible: bool | None = None
    fail_reason: str | None = None
    seed: str | None = None  # the seed plan's name, for queued seeds
    worker: str | None = None  # host:pid
    duplicate_of: int | None = None
    reruns: int | None = None  # the trial whose interrupted or dead plan this one runs again
    skipped: str | None = None  # why the trial was pruned without a plan (the budget was spent)
    estimate_latency_ms: float | None = None  # what the guided estimate expected of a proposed plan
    estimate_fidelity: float | None = None
    # a proposal's turn: "goal" (the fastest plan under the goal's noise budget) or "front" (expected hypervolume
    # gain); the goal's budget is rescaled from the measured goal proposals, so it outlives a restart
    proposal_kind: str | None = None
    number: int | None = None  # read from the trial; not an attribute
    state: str | None = None  # Optuna's TrialState name; not an attribute

    # ---- writing

    def to_attrs(self) -> dict:
        """The user attributes of this record (only the fields that are set)."""
        attrs: dict = {}
        if self.plan_key is not None:
            attrs["plan"] = self.plan_key
            attrs["float_layers"] = list(self.float_layers)
            if self.bf16_layers:
                attrs["bf16_layers"] = list(self.bf16_layers)
        if self.backend != TVM:
            attrs["backend"] = self.backend
        for name in ("int8_convs", "feasible", "fail_reason", "seed", "worker", "duplicate_of", "reruns", "skipped",
                     "estimate_latency_ms", "estimate_fidelity", "proposal_kind"):
            if getattr(self, name) is not None:
                attrs[name] = getattr(self, name)
        if self.result is not None:
            attrs.update(result_attrs(self.result))
        return attrs

    # ---- reading

    @classmethod
    def from_attrs(cls, attrs: dict, *, number: int | None = None, state: str | None = None) -> TrialRecord:
        plan_key = attrs.get("plan")
        return cls(plan_key=plan_key, float_layers=tuple(attrs.get("float_layers", ())),
                   backend=attrs.get("backend", TVM), bf16_layers=tuple(attrs.get("bf16_layers", ())),
                   int8_convs=attrs.get("int8_convs"), result=_result_of(attrs), feasible=attrs.get("feasible"),
                   fail_reason=attrs.get("fail_reason"), seed=attrs.get("seed"), worker=attrs.get("worker"),
                   duplicate_of=attrs.get("duplicate_of"), reruns=attrs.get("reruns"), skipped=attrs.get("skipped"),
                   estimate_latency_ms=attrs.get("estimate_latency_ms"), estimate_fidelity=attrs.get("estimate_fidelity"),
                   proposal_kind=attrs.get("proposal_kind"), number=number, state=state)

    @classmethod
    def from_trial(cls, trial) -> TrialRecord:
        """The record of an Optuna trial (a ``FrozenTrial``)."""
        return cls.from_attrs(trial.user_attrs, number=trial.number, state=trial.state.name)

    @property
    def plan(self) -> Plan:
        return Plan(frozenset(self.float_layers), self.backend, frozenset(self.bf16_layers))

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.result.metrics) if self.result is not None else {}


def result_attrs(result: PlanResult) -> dict:
    """The user attributes of a backend's result (latency, metrics, times, verdict, details)."""
    # A rejected build is never timed: it records no latency at all, not a NaN.
    timed = math.isfinite(result.latency_ms)
    attrs = {"latency_ms": result.latency_ms} if timed else {}
    attrs.update({name: getattr(result, name) for name in _RESULT_SCALARS if timed or name != "latency_iqr_ms"})
    # Optuna stores attributes as JSON, which has no inf/nan: a metric such as an exact plan's SQNR keeps its text.
    attrs.update({_METRIC_PREFIX + name: value if math.isfinite(value) else str(value)
                  for name, value in result.metrics.items()})
    # Only the known details: a key named like a trial attribute ("plan") must not overwrite it.
    attrs.update({key: result.details[key] for key in DETAIL_KEYS if key in result.details})
    if result.verdict is not None:
        attrs["verdict"] = result.verdict
        attrs["verdict_detail"] = result.verdict_detail
    return attrs


def _result_of(attrs: dict) -> PlanResult | None:
    metrics = {k.removeprefix(_METRIC_PREFIX): float(v) for k, v in attrs.items() if k.startswith(_METRIC_PREFIX)}
    if "latency_ms" not in attrs and not metrics:
        return None
    scalars = {name: attrs[name] for name in _RESULT_SCALARS if attrs.get(name) is not None}
    return PlanResult(latency_ms=attrs.get("latency_ms", math.nan), metrics=metrics,
                      **{"latency_iqr_ms": math.nan, **scalars},
                      details={k: attrs[k] for k in DETAIL_KEYS if k in attrs},
                      verdict=attrs.get("verdict"), verdict_detail=attrs.get("verdict_detail") or "")


# Attributes a duplicate does not copy from the trial it follows: they describe the trial, not the plan's result.
OWN_ATTRS = ("seed", "worker", "plan", "float_layers", "bf16_layers", "reruns", "duplicate_of", "estimate_latency_ms",
             "estimate_fidelity", "proposal_kind")


# --------------------------------------------------------------------------- the study


@dataclass
class StudyAttrs:
    """The study-level attributes precsearch keeps: settings, model, layer ids, seeds, baselines, re-measured front."""

    study: object

    CONFIG = "precsearch_config"
    MODEL = "model_sha256"
    LAYER_IDS = "layer_ids"
    STORAGE = "storage"
    SEEDED = "seeds_enqueued"
    BASELINES = "baselines"
    REMEASURED = "remeasured"
    REMEASURED_BASELINES = "remeasured_baselines"
    PRECISIONS = "precisions"  # what each conv may run in: ["int8", "float"] or ["int8", "bf16", "float"]
    LAYER_NOISE = "layer_noise"  # each conv's noise when it alone is int8: the guided estimate's prior
    BF16_LAYER_NOISE = "bf16_layer_noise"  # ... and when it alone is bf16 (three-state studies)
    GUIDED_ESTIMATE = "guided_estimate"  # each backend's guided-estimate fit error on the measured plans

    @property
    def config(self) -> dict | None:
        """The :class:`~precsearch.study.config.SearchConfig` as a dict (None for a study precsearch did not make)."""
        return self.study.user_attrs.get(self.CONFIG)

    @property
    def model_sha256(self) -> str | None:
        return self.study.user_attrs.get(self.MODEL)

    @property
    def layer_ids(self) -> tuple[str, ...]:
        return tuple(self.study.user_attrs.get(self.LAYER_IDS, ()))

    @property
    def seeded(self) -> list[str] | None:
        return self.study.user_attrs.get(self.SEEDED)

    @property
    def baselines(self) -> dict:
        return dict(self.study.user_attrs.get(self.BASELINES) or {})

    @property
    def remeasured(self) -> dict[int, dict]:
        """Trial number → ``{"median_ms", "iqr_ms", "runs"}`` of the front's re-measurement."""
        return {int(k): v for k, v in (self.study.user_attrs.get(self.REMEASURED) or {}).items()}

    @property
    def remeasured_baselines(self) -> dict:
        """The baselines' latencies timed again around the front's re-measurement (empty before it)."""
        return dict(self.study.user_attrs.get(self.REMEASURED_BASELINES) or {})

    @property
    def precisions(self) -> tuple[str, ...]:
        """The values of each conv's parameter; studies made before bf16 existed are int8/float."""
        return tuple(self.study.user_attrs.get(self.PRECISIONS) or TWO_STATES)

    @property
    def layer_noise(self) -> dict[str, float]:
        return dict(self.study.user_attrs.get(self.LAYER_NOISE) or {})

    @property
    def bf16_layer_noise(self) -> dict[str, float]:
        return dict(self.study.user_attrs.get(self.BF16_LAYER_NOISE) or {})

    def set(self, name: str, value) -> None:
        self.study.set_user_attr(name, value)

    def set_remeasured(self, remeasured: dict[int, dict]) -> None:
        self.study.set_user_attr(self.REMEASURED, {str(k): v for k, v in remeasured.items()})


_ATTR_OF_FIELD = {"plan_key": "plan"}


def set_attrs(trial, **values) -> None:
    """Write :class:`TrialRecord` fields (by field name, ``result`` included) onto a running trial; None clears one."""
    known = {f.name for f in fields(TrialRecord)} - {"number", "state"}
    for name, value in values.items():
        if name not in known:
            raise TypeError(f"TrialRecord has no field {name!r}")
        if name == "result":
            if value is None:
                raise TypeError("set_attrs(result=None): a recorded result cannot be taken back")
            for key, item in result_attrs(value).items():
                trial.set_user_attr(key, item)
        elif name == "backend" and value == TVM:
            continue  # the value an absent attribute reads as: TVM trials keep the attributes they always had
        else:
            if name == "bf16_layers" and not value:
                continue  # absent reads as none: two-state trials keep the attributes they always had
            stored = list(value) if name in ("float_layers", "bf16_layers") and value is not None else value
            trial.set_user_attr(_ATTR_OF_FIELD.get(name, name), stored)


def copy_result(trial, owner) -> None:
    """Give ``trial`` the recorded result of ``owner`` (a duplicate of its plan): every attribute but the trial's own."""
    for name, value in owner.user_attrs.items():
        if name not in OWN_ATTRS:
            trial.set_user_attr(name, value)
