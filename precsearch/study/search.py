"""The search: an Optuna multi-objective study over which conv layers stay float.

One categorical parameter per int8-capable conv (``int8``/``float``, and
``bf16`` where the study's CPU runs it natively), two
objectives (latency median in ms, minimized; the fidelity metric, maximized or
minimized by its kind), the fidelity goal as an Optuna constraint.  The loop
does not know how a plan is scored: it calls a :class:`PlanEvaluator` (TVM
build and measurement in :mod:`precsearch.study.evaluator`, a stand-in in tests).

What the loop adds to Optuna:

* Identical plans are never evaluated twice: a plan is claimed atomically in the
  study's database (:class:`~precsearch.study.storage.PlanClaims`); a trial that
  proposes a claimed plan waits for its owner and copies its values.
* ``trials`` counts distinct plans, across every worker, exactly.
* A failing plan is a failed trial with its reason; the study goes on.  So is a
  plan whose build the evaluator's cross-check with ONNX Runtime calls a
  compiler problem: it never reaches the front.
* A killed worker's trial goes stale (heartbeats) and is re-queued; an
  interrupted one (Ctrl-C) is re-queued when a worker next starts or settles.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from precsearch.study.config import EXHAUSTIVE_MAX_PLANS, SAMPLERS, SearchConfig
from precsearch.errors import ConfigError, PrecsearchError, first_line
from precsearch.fidelity.early_stop import goal_value
from precsearch.fidelity.metrics import METRICS, TIE_BREAK
from precsearch.study.guided import GUIDED_SEED, GuidedProposals
from precsearch.measure import held_shared
from precsearch.model import LoadedModel
from precsearch.study.pareto import FrontPoint, finite_objective, front_points
from precsearch.model.plan import BACKENDS, BF16, INT8, THREE_STATES, TVM, TWO_STATES, Plan
from precsearch.study.record import (COMPILER_PROBLEM, PlanEvaluator, PlanRejected, StudyAttrs,
                                     TrialRecord, copy_result, set_attrs)
from precsearch.study.storage import PlanClaims, quiet_experimental, redact_url

logger = logging.getLogger(__name__)

BACKEND_PARAM = "backend"  # the Optuna parameter that picks the runtime when a study searches both
INTERRUPTED = "interrupted"
CONSTRAINT = "fidelity_goal"
DEFAULT_TRIALS = 200
# A sampler that has converged keeps proposing plans it has seen; past this many
# duplicates in a row the worker stops instead of looping for ever.
MAX_DUPLICATES_IN_A_ROW = 200
POLL_S = 1.0


class TrialFailed(PrecsearchError, RuntimeError):
    """A plan could not be built, run or measured; the trial is failed with this reason."""


# --------------------------------------------------------------------------- space and seeds


class PlanSpace:
    """The int8-capable convs of a model as Optuna parameters, one per conv, and the backend when there are two.

    With one backend (``("tvm",)``, the default, or ``("ort",)``) every plan
    is built for it and the space has no backend parameter, so a TVM study's
    parameters are what they were before there was a second backend.  With
    ``("tvm", "ort")`` one more categorical parameter, ``backend``, chooses the
    runtime: the same float set on two runtimes is two plans.  ``precisions``
    are each conv's choices: ``("int8", "float")``, or with ``"bf16"`` between
    them (TVM only: ONNX Runtime's quantizer has no bf16 convs).
    """

    def __init__(self, model: LoadedModel, backends: Sequence[str] = (TVM,),
                 precisions: Sequence[str] = TWO_STATES):
        self.precisions = tuple(precisions)
        if self.precisions not in (TWO_STATES, THREE_STATES):
            raise ConfigError(f"The 'precisions' parameter of PlanSpace must be {list(TWO_STATES)} or "
                              f"{list(THREE_STATES)}; got {list(self.precisions)} instead.")
        if BF16 in self.precisions and tuple(backends) != (TVM,):
            raise ConfigError("bf16 convs are searched on the TVM backend only; ONNX Runtime's quantizer has none")
        self.layer_ids = tuple(model.capable_ids())
        if not self.layer_ids:
            raise ConfigError(f"The model {str(model.source)!r} has no int8-capable conv layers to search over.")
        self.backends = tuple(backends)
        unknown = [b for b in self.backends if b not in BACKENDS]
        if not self.backends or unknown:
            raise ConfigError(f"The 'backends' parameter of PlanSpace must hold some of {list(BACKENDS)}; "
                              f"got {list(self.backends)} instead.")
        if len(self.backends) > 1 and BACKEND_PARAM in self.layer_ids:
            raise ConfigError(f"The model {str(model.source)!r} has a conv named {BACKEND_PARAM!r}, the name of "
                              "the search's backend parameter; rename the node to search both backends.")

    @property
    def size(self) -> int:
        return len(self.backends) * len(self.precisions) ** len(self.layer_ids)

    def suggest(self, trial) -> Plan:
        chosen = {i: trial.suggest_categorical(i, list(self.precisions)) for i in self.layer_ids}
        backend = trial.suggest_categorical(BACKEND_PARAM, list(self.backends)) if len(self.backends) > 1 \
            else self.backends[0]
        return self._plan(chosen, backend)

    def _plan(self, chosen: dict, backend: str) -> Plan:
        return Plan(frozenset(i for i in self.layer_ids if chosen[i] != INT8), backend,
                    frozenset(i for i in self.layer_ids if chosen[i] == BF16))

    def params(self, plan: Plan) -> dict[str, str]:
        if plan.bf16_ids and BF16 not in self.precisions:
            raise ConfigError(f"plan {plan.key()!r} runs convs in bf16; this study's space is int8/float")
        params = {i: plan.precision(i) for i in self.layer_ids}
        if len(self.backends) > 1:
            params[BACKEND_PARAM] = plan.backend
        return params

    def plan_of(self, params: dict) -> Plan | None:
        """The plan of a (possibly partial) parameter dict; None when some layer (or the backend) is missing."""
        if any(i not in params for i in self.layer_ids):
            return None
        if len(self.backends) > 1 and BACKEND_PARAM not in params:
            return None
        backend = params[BACKEND_PARAM] if len(self.backends) > 1 else self.backends[0]
        return self._plan(params, backend)


def seed_plans(model: LoadedModel, sensitive_ids: Sequence[str] = (), k: int = 0,
               backends: Sequence[str] = (TVM,), precisions: Sequence[str] = TWO_STATES) -> list[tuple[str, Plan]]:
    """The plans every search starts from, named: all int8, all float, first and last conv float, top-k sensitive.

    ``sensitive_ids`` is the sensitivity ranking, most sensitive first; plans
    with its first 1..k layers float are added.  Each seed is queued on every
    one of ``backends`` (TVM first); repeated plans appear once.  With bf16 in
    ``precisions`` the same plans with bf16 in place of float follow (all
    bf16, top-k sensitive in bf16).
    """
    capable = list(model.capable_ids())
    candidates = [("all-int8", Plan(frozenset())), ("all-float", Plan(frozenset(capable))),
                  ("first-and-last-float", Plan(frozenset({capable[0], capable[-1]})))]
    for n in range(1, min(k, len(sensitive_ids)) + 1):
        candidates.append((f"sensitive-top-{n}", Plan(frozenset(sensitive_ids[:n]))))
    if BF16 in precisions:
        candidates.append(("all-bf16", Plan(frozenset()).with_bf16(capable)))
        for n in range(1, min(k, len(sensitive_ids)) + 1):
            candidates.append((f"sensitive-top-{n}-bf16", Plan(frozenset()).with_bf16(sensitive_ids[:n])))
    seen, seeds = set(), []
    for name, plan in candidates:
        for backend in backends:
            on_backend = plan.on(backend)
            if on_backend.key() not in seen:
                seen.add(on_backend.key())
                seeds.append((name, on_backend))
    return seeds


def make_sampler(name: str, seed: int, plan_count: int):
    """The Optuna sampler for ``name`` (see :data:`precsearch.study.config.SAMPLERS`)."""
    import optuna

    if name == "exhaustive":
        if plan_count > EXHAUSTIVE_MAX_PLANS:
            raise ConfigError(f"The 'sampler' parameter of search can be 'exhaustive' only up to "
                              f"{EXHAUSTIVE_MAX_PLANS} plans; this model has {plan_count} plans.")
        return optuna.samplers.BruteForceSampler(seed=seed)
    if name == "tpe":
        # Multivariate TPE models the layers jointly: float-ness of neighbours interacts
        # through layout boundaries, which independent per-layer densities miss.  On the
        # 8-conv test model, 64 of 256 plans reached 0.93 of the exhaustive front's
        # hypervolume on average over 10 seeds (independent TPE 0.92, random sampling 0.85).
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=16)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        try:
            import torch  # noqa: F401  (GPSampler's own dependency, imported lazily by Optuna)
        except ImportError:
            raise ConfigError("The 'gp' sampler needs PyTorch, which is not installed; "
                              "pip install torch (the CPU build is enough).") from None
        return optuna.samplers.GPSampler(seed=seed)
    raise ConfigError(f"The 'sampler' parameter of search must be one of {list(SAMPLERS)}; got {name!r} instead.")


def default_sampler(plan_count: int, guided: bool = False) -> str:
    """``exhaustive`` for a small space; between the guided proposals, ``gp`` where PyTorch (GPSampler's
    dependency) is installed; else multivariate ``tpe``.

    Why GP there: over 3 seeds at 24 plans, the proposals between GP trials reached 0.977 / 0.965 of the best
    front's hypervolume on MobileNetV3 / PP-LCNet against 0.967 / 0.968 between TPE trials, and alone GP 0.976 /
    0.955 (EfficientNet-Lite0, 2 seeds at 16 plans: 1.000 against 0.987; ``results/<model>/strategies/``).
    """
    if plan_count <= EXHAUSTIVE_MAX_PLANS:
        return "exhaustive"
    if guided:
        import importlib.util

        if importlib.util.find_spec("torch") is not None:
            return "gp"
    return "tpe"


def trial_budget(config: SearchConfig, plan_count: int) -> int:
    """Distinct plans to evaluate: ``trials``, else all of a small space or :data:`DEFAULT_TRIALS`."""
    if config.trials is not None:
        return min(config.trials, plan_count)
    return plan_count if plan_count <= EXHAUSTIVE_MAX_PLANS else DEFAULT_TRIALS


# --------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class SearchProgress:
    """A snapshot of the study, for the progress line."""

    done: int  # distinct plans finished (completed or failed)
    budget: int
    failed: int
    running: int
    elapsed_s: float
    left_s: float | None
    front_size: int
    fastest_feasible: FrontPoint | None
    metric: str
    phase: str = "searching"  # a shared budget's phase (searching untuned, searching tuned)


@dataclass(frozen=True)
class SearchSummary:
    """How a worker's run ended, with the study's front."""

    study_name: str
    storage: str  # redacted
    metric: str
    budget: int
    completed: int
    failed: int
    duplicates: int
    front: list[FrontPoint]
    elapsed_s: float
    stopped_by: str


# --------------------------------------------------------------------------- the study


@dataclass
class StudyHandle:
    """An opened study with what every worker needs beside it."""

    study: object
    claims: PlanClaims
    config: SearchConfig
    storage_url: str
    metric: str
    higher_is_better: bool
    precisions: tuple[str, ...] = TWO_STATES  # each conv's choices, as the study was made with


def open_study(config: SearchConfig, model: LoadedModel, storage, storage_url: str, study_name: str, metric: str,
               *, create: bool = True, precisions: Sequence[str] = TWO_STATES) -> StudyHandle:
    """Create or load ``study_name`` and check that it was made for this model and these settings.

    Parameters
    ----------
    storage : optuna.storages.RDBStorage
    create : bool
        False (a joining worker) refuses a study that does not exist.
    precisions : sequence of str
        Each conv's choices for a new study (``TWO_STATES`` or ``THREE_STATES``); a stored study keeps its own.
    """
    import optuna

    if metric not in METRICS:
        raise ConfigError(f"The 'metric' parameter of search must be one of {sorted(METRICS)}; got {metric!r} instead.")
    higher_is_better = METRICS[metric][1]
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created" on every start
    directions = ["minimize", "maximize" if higher_is_better else "minimize"]
    stored_names = {s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)}
    if study_name not in stored_names and not create:
        raise ConfigError(f"The study {study_name!r} does not exist in {redact_url(storage_url)}; "
                          f"start it with 'precsearch search' first.")
    study = optuna.create_study(storage=storage, study_name=study_name, directions=directions, load_if_exists=True)
    if list(study.directions) != [getattr(optuna.study.StudyDirection, d.upper()) for d in directions]:
        raise ConfigError(f"The study {study_name!r} optimizes other directions than latency and {metric}; "
                          "choose another --study.")
    attrs = StudyAttrs(study)
    stored = attrs.config
    if stored is None:
        with quiet_experimental():
            study.set_metric_names(["latency_ms", metric])
        attrs.set(StudyAttrs.CONFIG, config.replace(study_name=study_name).to_dict())
        attrs.set(StudyAttrs.MODEL, model.sha256)
        attrs.set(StudyAttrs.LAYER_IDS, list(model.capable_ids()))
        attrs.set(StudyAttrs.STORAGE, redact_url(storage_url))
        if tuple(precisions) != TWO_STATES:  # absent reads as int8/float: two-state studies look as they always did
            attrs.set(StudyAttrs.PRECISIONS, list(precisions))
    else:
        previous = SearchConfig.from_dict(stored)
        if attrs.model_sha256 != model.sha256:
            raise ConfigError(f"The study {study_name!r} was made for another model (sha256 "
                              f"{str(attrs.model_sha256)[:12]}…, this one is {model.sha256[:12]}…); "
                              "choose another --study.")
        changed = config.differences(previous)
        if changed:
            raise ConfigError(f"The study {study_name!r} was made with other settings ({'; '.join(changed)}); "
                              "use the same settings to resume it, or another --study.")
        if create and config.replace(study_name=study_name) != previous:
            # The budget, sampler or timeout of the latest run: what the report's "reproduce" command shows.
            attrs.set(StudyAttrs.CONFIG, config.replace(study_name=study_name).to_dict())
    claims = PlanClaims(storage.engine, study_name)
    return StudyHandle(study=study, claims=claims, config=config, storage_url=storage_url, metric=metric,
                       higher_is_better=higher_is_better, precisions=attrs.precisions)


def enqueue_seeds(handle: StudyHandle, space: PlanSpace, seeds: list[tuple[str, Plan]]) -> int:
    """Queue the seed plans once per study (a resumed study keeps its own queue)."""
    study = handle.study
    if StudyAttrs(study).seeded:
        return 0
    for name, plan in seeds:
        study.enqueue_trial(space.params(plan), user_attrs=TrialRecord(seed=name).to_attrs(), skip_if_exists=True)
    StudyAttrs(study).set(StudyAttrs.SEEDED, [name for name, _ in seeds])
    logger.info("queued %d seed plans: %s", len(seeds), ", ".join(name for name, _ in seeds))
    return len(seeds)


def _trial_plan_key(trial, space: PlanSpace) -> str | None:
    record = TrialRecord.from_trial(trial)
    if record.plan_key is not None:
        return record.plan_key
    params = trial.params or trial.system_attrs.get("fixed_params") or {}
    plan = space.plan_of(params)
    return plan.key() if plan is not None else None


def _plan_outcomes(trials) -> tuple[set[str], set[str]]:
    """Plan keys with a completed trial, and those that failed for a reason (not interrupted, not killed)."""
    from optuna.trial import TrialState

    records = [TrialRecord.from_trial(t) for t in trials]
    completed = {r.plan_key for r in records if r.state == TrialState.COMPLETE.name}
    failed = {r.plan_key for r in records if r.state == TrialState.FAIL.name
              and r.fail_reason not in (None, INTERRUPTED)}
    return completed - {None}, failed - completed - {None}


def _retries_exhausted(trial, max_retry: int) -> bool:
    return len(trial.system_attrs.get("retry_history", [])) >= max_retry


class _InterruptFlag:
    """Remembers a Ctrl-C even when a library swallows it.

    A KeyboardInterrupt raised inside one of precsearch's Relax passes, which TVM
    calls from C++, comes back as a TVM error: the trial would be recorded as a
    failed build and the search would go on.  The flag tells the two apart.
    """

    def __init__(self):
        self.raised = False
        self._previous = None

    def _handler(self, signum, frame):
        self.raised = True
        raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _Worker:
    """One worker's loop over the study: claim, evaluate or follow, record, report."""

    def __init__(self, handle: StudyHandle, space: PlanSpace, evaluator: PlanEvaluator, budget: int,
                 progress: Callable[[SearchProgress], None] | None, guide: GuidedProposals | None = None,
                 timeout_s: float | None = None):
        self.handle = handle
        self.timeout_s = timeout_s if timeout_s is not None else handle.config.timeout_s
        self.guide = guide
        self.study = handle.study
        self.space = space
        self.evaluator = evaluator
        self.budget = budget
        self.progress = progress
        self.goal = handle.config.fidelity_goal(handle.metric)
        self.started = time.perf_counter()
        self.duplicates_in_a_row = 0
        self.duplicates = 0
        self.evaluated_here = 0
        self.stopped_by = "budget"
        self.interrupt = _InterruptFlag()
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    # ---- the objective

    def objective(self, trial):
        try:
            plan = self.space.suggest(trial)
            key = plan.key()
            order = self.space.layer_ids.index
            set_attrs(trial, plan_key=key, float_layers=sorted(plan.float_ids, key=order),
                      bf16_layers=sorted(plan.bf16_ids, key=order), backend=plan.backend, worker=self.name)
            while True:
                claim = self.handle.claims.claim(key, trial.number, self.budget)
                if claim.outcome == "full":
                    import optuna

                    set_attrs(trial, skipped="budget reached")
                    self.stopped_by = "budget"
                    trial.study.stop()
                    raise optuna.TrialPruned("the trial budget is spent")
                if claim.owner == trial.number:
                    self.duplicates_in_a_row = 0
                    return self._evaluate(trial, plan)
                followed = self._follow(trial, key, claim.owner)
                if followed is not None:
                    return followed
        except KeyboardInterrupt:
            set_attrs(trial, fail_reason=INTERRUPTED)
            raise

    def _record_constraint(self, trial, fidelity: float) -> float:
        if self.goal is None:
            return 0.0
        violation = (self.goal - fidelity) if self.handle.higher_is_better else (fidelity - self.goal)
        trial.set_constraint(CONSTRAINT, violation)
        set_attrs(trial, feasible=violation <= 0)
        return violation

    def _evaluate(self, trial, plan: Plan):
        try:
            result = self.evaluator.evaluate(plan)
        except PlanRejected as exc:  # raised or returned, a compiler problem fails the trial below
            result = exc.result
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # any failure of one plan: recorded, and the study goes on
            if self.interrupt.raised:
                raise KeyboardInterrupt from None  # a Ctrl-C that TVM turned into an error
            reason = first_line(exc, with_type=True)
            set_attrs(trial, fail_reason=reason)
            logger.warning("trial %d failed (%d float layers): %s", trial.number, len(plan.float_ids), reason)
            raise TrialFailed(reason) from None
        if result.verdict == COMPILER_PROBLEM:
            detail = result.verdict_detail or "the build disagrees with ONNX Runtime"
            reason = detail if detail.startswith(COMPILER_PROBLEM) else f"{COMPILER_PROBLEM}: {detail}"
            # What the wrong library scored, for the record; it was never timed.
            set_attrs(trial, result=dataclasses.replace(result, latency_ms=math.nan), fail_reason=reason)
            logger.warning("trial %d failed (%d float layers): %s", trial.number, len(plan.float_ids), reason)
            raise TrialFailed(reason)
        if self.handle.metric not in result.metrics:
            reason = f"the evaluator returned no {self.handle.metric!r} metric (it has {sorted(result.metrics)})"
            set_attrs(trial, fail_reason=reason)
            raise TrialFailed(reason)
        fidelity = finite_objective(result.metrics[self.handle.metric])
        latency = finite_objective(result.latency_ms)
        set_attrs(trial, result=dataclasses.replace(result, latency_ms=latency),
                  int8_convs=len(self.space.layer_ids) - len(plan.float_ids))
        self._record_constraint(trial, finite_objective(goal_value(result.metrics, self.handle.metric,
                                                                     self.handle.config.goal_on)))
        logger.info("trial %d: %s, %d float layers, %.3f ms, %s %.4g", trial.number, plan.backend,
                    len(plan.float_ids), latency, self.handle.metric, fidelity)
        return latency, fidelity

    def _follow(self, trial, key: str, owner: int):
        """Take the values of the trial that owns this plan, waiting while it runs.

        Returns the values, or None once the claim was taken over from a trial
        that died or was interrupted (the caller then evaluates the plan).
        """
        import optuna
        from optuna.trial import TrialState

        set_attrs(trial, duplicate_of=owner)
        waited_s = 0.0
        while True:
            other = self.study.get_trials(deepcopy=False)[owner]
            if other.state == TrialState.COMPLETE:
                self.duplicates += 1
                self.duplicates_in_a_row += 1
                copy_result(trial, other)
                set_attrs(trial, duplicate_of=owner)
                for name, value in other.constraints.items():
                    trial.set_constraint(name, value)
                if self.duplicates_in_a_row >= MAX_DUPLICATES_IN_A_ROW:
                    self.stopped_by = "sampler repeats itself"
                    trial.study.stop()
                return tuple(other.values)
            if other.state == TrialState.FAIL:
                reason = TrialRecord.from_trial(other).fail_reason
                if reason is None and _retries_exhausted(other, self.handle.config.max_retry):
                    reason = "its worker died evaluating it on every retry"
                if reason is not None and reason != INTERRUPTED:
                    self.duplicates += 1
                    set_attrs(trial, fail_reason=f"same plan as trial {owner}: {reason}")
                    raise TrialFailed(f"same plan as trial {owner}: {reason}")
                if self.handle.claims.take_over(key, owner, trial.number):
                    logger.info("trial %d re-runs the plan of trial %d (%s)", trial.number, owner,
                                reason or "its worker stopped")
                    set_attrs(trial, reruns=owner, duplicate_of=None)
                    return None
                return None  # someone else took it over first: claim again to find the new owner
            # RUNNING or WAITING: wait for it; a dead owner turns stale and fails.
            time.sleep(POLL_S)
            waited_s += POLL_S
            if waited_s % 10 < POLL_S:
                optuna.storages.fail_stale_trials(self.study)

    # ---- the loop

    def after_trial(self, study, trial) -> None:
        if self.interrupt.raised:
            raise KeyboardInterrupt  # swallowed somewhere below: stop now, the trial is recorded
        trials = self.study.get_trials(deepcopy=False)
        if self.finished_plans(trials) >= self.budget or self.handle.claims.count() >= self.space.size:
            study.stop()
        elif self.guide is not None:
            self._propose(trials)
        if self.progress is not None:
            self.progress(self.snapshot(trials))

    def _propose(self, trials) -> None:
        """Queue the guided estimate's next plan when the queue is empty and the proposals are due."""
        from optuna.trial import TrialState

        if any(t.state == TrialState.WAITING for t in trials):
            return  # seeds or a proposal still queued
        records = [TrialRecord.from_trial(t) for t in trials]
        if not self.guide.due(records):
            return
        # Held shared, as a build is: the refit and the integer programs must not overlap another worker's timing.
        with held_shared(_cpu_lock(self.evaluator)):
            self.guide.refit([(r, t.values[0], t.values[1]) for r, t in zip(records, trials)
                              if t.state == TrialState.COMPLETE and t.values is not None])
            proposal = self.guide.next_plan(self.goal, [r.plan for r in records if r.plan_key is not None])
        if proposal is None:
            return
        plan, latency_ms, fidelity, kind = proposal
        finite = [value if math.isfinite(value) else None for value in (latency_ms, fidelity)]
        self.study.enqueue_trial(self.space.params(plan), user_attrs=TrialRecord(
            seed=GUIDED_SEED, estimate_latency_ms=finite[0], estimate_fidelity=finite[1],
            proposal_kind=kind).to_attrs())
        StudyAttrs(self.study).set(StudyAttrs.GUIDED_ESTIMATE, self.guide.errors())
        logger.info("guided proposal: %s plan with %d float convs, expected %.3f ms, %s %.4g", plan.backend,
                    len(plan.float_ids), latency_ms, self.handle.metric, fidelity)

    def finished_plans(self, trials=None) -> int:
        completed, failed = _plan_outcomes(self.study.get_trials(deepcopy=False) if trials is None else trials)
        return len(completed) + len(failed)

    def snapshot(self, trials) -> SearchProgress:
        from optuna.trial import TrialState

        completed, failed = _plan_outcomes(trials)
        done = len(completed) + len(failed)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        front = front_points(trials, feasible_only=True, higher_is_better=self.handle.higher_is_better,
                             tie_break=TIE_BREAK.get(self.handle.metric))
        elapsed_s = time.perf_counter() - self.started
        timeout_s = self.timeout_s
        left_s = None
        if self.evaluated_here:
            per_plan_s = elapsed_s / self.evaluated_here
            left_s = per_plan_s * max(0, self.budget - done) / self.handle.config.workers
        if timeout_s is not None:
            time_left_s = max(0.0, timeout_s - elapsed_s)
            left_s = time_left_s if left_s is None else min(left_s, time_left_s)
        return SearchProgress(done=done, budget=self.budget, failed=len(failed), running=running,
                              elapsed_s=elapsed_s, left_s=left_s, front_size=len(front),
                              fastest_feasible=front[0] if front else None, metric=self.handle.metric)

    def settle(self, wait_for_running: bool) -> int:
        """Re-queue interrupted plans; optionally wait for trials in flight; return the WAITING count.

        A claim whose owner was interrupted (Ctrl-C) holds a budget slot with no
        result: its plan is queued again so the budget ends with that many
        finished plans.  Killed workers' trials are failed when their heartbeat
        goes stale, and Optuna's retry callback queues them.
        """
        import optuna
        from optuna.trial import TrialState

        deadline = time.monotonic() + self.handle.config.grace_period_s + 3 * self.handle.config.heartbeat_interval_s
        while True:
            optuna.storages.fail_stale_trials(self.study)
            trials = self.study.get_trials(deepcopy=False)
            owners = self.handle.claims.owners()
            queued = {_trial_plan_key(t, self.space) for t in trials if t.state in (TrialState.WAITING,
                                                                                    TrialState.RUNNING)}
            for key, owner in owners.items():
                if owner >= len(trials):
                    continue
                trial = trials[owner]
                if trial.state == TrialState.FAIL and TrialRecord.from_trial(trial).fail_reason == INTERRUPTED \
                        and key not in queued:
                    self.study.enqueue_trial(dict(trial.params), user_attrs=TrialRecord(reruns=owner).to_attrs())
                    queued.add(key)
                    logger.info("queued the interrupted plan of trial %d again", owner)
            trials = self.study.get_trials(deepcopy=False)
            waiting = sum(t.state == TrialState.WAITING for t in trials)
            running = [t.number for t in trials if t.state == TrialState.RUNNING and t.number in owners.values()]
            if waiting or not wait_for_running or not running or time.monotonic() > deadline:
                return waiting
            time.sleep(POLL_S)

    def run(self) -> str:
        timeout_s = self.timeout_s
        self.settle(wait_for_running=False)
        catch = (TrialFailed,)
        callbacks = [self._count_evaluation, self.after_trial]
        if self.finished_plans() < self.budget:
            self.study.optimize(self.objective, timeout=timeout_s, catch=catch, callbacks=callbacks,
                                gc_after_trial=False)
            if timeout_s is not None and time.perf_counter() - self.started >= timeout_s:
                self.stopped_by = "timeout"
        # The budget is spent, but plans whose trial was interrupted or whose worker
        # died hold slots without a result: run them before calling the study done.
        for _ in range(self.budget + 10):
            if self.stopped_by == "timeout" or self.stopped_by == "sampler repeats itself":
                break
            waiting = self.settle(wait_for_running=True)
            if not waiting:
                break
            self.study.optimize(self.objective, n_trials=waiting, catch=catch, callbacks=callbacks,
                                gc_after_trial=False)
        return self.stopped_by

    def _count_evaluation(self, study, trial) -> None:
        record = TrialRecord.from_trial(trial)
        if record.duplicate_of is None and record.skipped is None:
            self.evaluated_here += 1


def _cpu_lock(evaluator):
    """The evaluator's :class:`~precsearch.measure.CpuLock` (None for an evaluator that times nothing)."""
    return getattr(evaluator, "lock", None)


def run_worker(handle: StudyHandle, model: LoadedModel, evaluator: PlanEvaluator, *,
               progress: Callable[[SearchProgress], None] | None = None,
               seeds: list[tuple[str, Plan]] | None = None, worker_index: int = 0,
               sampler=None, guide: GuidedProposals | None = None, timeout_s: float | None = None
               ) -> SearchSummary:
    """Run one worker on an opened study until the budget, the timeout or the space is spent.

    Parameters
    ----------
    handle : StudyHandle
        From :func:`open_study`.
    evaluator : PlanEvaluator
    progress : callable, optional
        Called with a :class:`SearchProgress` after every trial.
    seeds : list of (name, Plan), optional
        Queued first, once per study (:func:`seed_plans`).
    worker_index : int
        Offsets the sampler's seed, so parallel workers do not propose the same sequence.
    sampler : optuna.samplers.BaseSampler, optional
        Used instead of the configured one (experiments compare sampler settings the CLI does not offer).
    guide : GuidedProposals, optional
        Queues the guided estimate's plans between the sampler's (:mod:`precsearch.study.guided`).
    timeout_s : float, optional
        This call's time limit instead of the configured one (one search phase of a shared budget).
    """
    import optuna

    config = handle.config
    space = PlanSpace(model, config.backends, handle.precisions)
    budget = trial_budget(config, space.size)
    sampler_name = config.sampler or default_sampler(space.size, guided=guide is not None)
    from precsearch.study.locked_sampler import CpuLockedSampler

    with quiet_experimental():
        handle.study.sampler = CpuLockedSampler(
            sampler or make_sampler(sampler_name, config.seed + worker_index, space.size), _cpu_lock(evaluator))
    if seeds:
        enqueue_seeds(handle, space, seeds)
    # Optuna logs every failed trial with a traceback; the search logs its own one line.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    worker = _Worker(handle, space, evaluator, budget, progress, guide, timeout_s)
    logger.info("worker %s on study %s (%s, %s sampler, budget %d plans)", worker.name, handle.study.study_name,
                redact_url(handle.storage_url), sampler_name, budget)
    with quiet_experimental(), worker.interrupt:
        stopped_by = worker.run()
    summary = SearchSummary(study_name=handle.study.study_name, storage=redact_url(handle.storage_url),
                            metric=handle.metric, budget=budget, completed=0, failed=0, duplicates=worker.duplicates,
                            front=[], elapsed_s=time.perf_counter() - worker.started, stopped_by=stopped_by)
    return summarize_study(handle, summary)


def summarize_study(handle: StudyHandle, summary: SearchSummary) -> SearchSummary:
    """``summary`` with the counts and front of the whole study (after every worker has ended)."""
    trials = handle.study.get_trials(deepcopy=False)
    completed, failed = _plan_outcomes(trials)
    return dataclasses.replace(summary, completed=len(completed), failed=len(failed),
                               front=front_points(trials, higher_is_better=handle.higher_is_better,
                                                 tie_break=TIE_BREAK.get(handle.metric)))


def measure_baselines(handle: StudyHandle, evaluator: PlanEvaluator) -> dict | None:
    """ONNX Runtime's float and int8 latency, measured once per study by a backend that can."""
    attrs = StudyAttrs(handle.study)
    if attrs.baselines:
        return attrs.baselines
    baselines = evaluator.measure_baselines()
    if baselines is None:
        return None
    attrs.set(StudyAttrs.BASELINES, baselines)
    logger.info("baselines: %s", baselines)
    return baselines


def remeasure_front(handle: StudyHandle, evaluator: PlanEvaluator, *, repeats: int,
                    progress: Callable[[str], None] | None = None, tuning_records: int | None = None
                    ) -> dict[int, dict]:
    """Build and time every front plan again with ``repeats`` runs; stored in the study's ``remeasured`` attribute.

    A front picked from single measurements favours plans that were timed on a
    lucky run; the report shows these figures (median and IQR) beside the
    search's own.  Plans already re-measured with as many runs are skipped,
    unless ``tuning_records`` (the tuning database's size now) differs from the
    size their figure was measured with: their kernels may have better records.
    """
    attrs = StudyAttrs(handle.study)
    stored = attrs.remeasured
    points = front_points(handle.study.get_trials(deepcopy=False), higher_is_better=handle.higher_is_better,
                          tie_break=TIE_BREAK.get(handle.metric))
    def stale(point) -> bool:
        entry = stored.get(point.trial, {})
        retuned = tuning_records is not None and point.backend == TVM \
            and entry.get("tuning_records", 0) != tuning_records
        return entry.get("runs", 0) < repeats or retuned

    todo = [(done, point) for done, point in enumerate(points, start=1) if stale(point)]
    if not todo:
        return stored
    # The machine's speed drifts over an overnight run: the baselines measured when the study began are timed
    # again just before and after the front, and the report compares with their mean.
    before = evaluator.remeasure_baselines(repeats)
    for done, point in todo:
        if progress is not None:
            progress(f"re-measuring front plan {done}/{len(points)} (trial {point.trial}, {repeats} runs)")
        latency = evaluator.remeasure(point.to_plan(), repeats)
        if latency is None:
            return stored  # a backend that cannot time a plan again
        stored[point.trial] = {"median_ms": latency.median_ms, "iqr_ms": latency.iqr_ms, "runs": latency.runs,
                               **({"tuning_records": tuning_records} if tuning_records is not None else {})}
        attrs.set_remeasured(stored)
    after = evaluator.remeasure_baselines(repeats)
    if before and after:
        attrs.set(StudyAttrs.REMEASURED_BASELINES,
                  {**{key: (before[key] + after[key]) / 2 for key in before}, "runs": repeats,
                   "before": before, "after": after})
    return stored

