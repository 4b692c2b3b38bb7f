"""The search's real backend: build a plan with TVM, score its outputs, time it.

Everything that does not depend on the plan (calibration ranges, evaluation
inputs, the float reference, the tuning database) is prepared once per worker
from cached files; :meth:`TvmEvaluator.evaluate` then costs one build, one pass
over the evaluation inputs, one ONNX Runtime run of the plan's QDQ model on the
check batches and one latency measurement.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from precsearch.errors import ConfigError
from precsearch.fidelity.crosscheck import check_build
from precsearch.fidelity.early_stop import evaluate_plan
from precsearch.measure import CpuLock, Latency, latency_unloaded
from precsearch.model.plan import ORT, TVM, Plan
from precsearch.study.config import SearchConfig
from precsearch.study.ort_backend import OrtEvaluator, measure_ort_baselines, require_backend, retime_ort_baselines
from precsearch.study.record import COMPILER_PROBLEM, PlanRejected, PlanResult
from precsearch.tvm import measure_library
from precsearch.workspace import PlanBuild, Workspace

logger = logging.getLogger(__name__)


@dataclass
class TvmEvaluator:
    """Scores plans of one model: TVM build, fidelity against the ORT float reference, latency.

    The fidelity is the built library's outputs on the evaluation batches
    against ONNX Runtime running the float model.  Plans that cannot reach the
    goal stop after the first batches (:func:`precsearch.fidelity.early_stop.evaluate_plan`).

    Every build is then checked as ``build --check`` checks one (:meth:`check`):
    its outputs on the first ``check_batches`` evaluation batches, kept from the
    fidelity run, are compared with ONNX Runtime on the same QDQ model, and a
    divergence is traced to a rounding near-tie or a compiler problem.  A
    compiler problem raises :class:`~precsearch.study.record.PlanRejected` before
    the latency is measured, so the search fails the trial.

    Builds, fidelity runs and checks hold the machine's :class:`CpuLock`
    shared, the latency measurement holds it exclusive.
    """

    workspace: Workspace
    metric: str
    goal: float | None
    goal_on: str = "value"
    warmup: int = 10
    repeats: int = 50
    check_batches: int = 1
    lock: CpuLock = field(default_factory=CpuLock)

    @classmethod
    def from_config(cls, config: SearchConfig, model, workdir: str | Path, preset: str | None,
                    metric: str, *, workspace: Workspace | None = None) -> TvmEvaluator:
        """The search's workspace (calibration, evaluation inputs, reference, tuning database; cached) and settings."""
        workspace = workspace or Workspace.from_config(config, model, workdir, preset)
        workspace.prepare()
        if workspace.database is None and not config.untuned and not config.shares_time_with_tuning:
            logger.warning("no tuning database in %s: the TIR kernels around the convs run their fallback schedules "
                           "('precsearch tune', or a search with --timeout, tunes them)", workdir)
        return cls(workspace=workspace, metric=metric, goal=config.fidelity_goal(metric),
                   goal_on=config.goal_on, warmup=config.warmup,
                   repeats=config.repeats, check_batches=config.check_batches)

    @property
    def model(self):
        return self.workspace.model

    @property
    def options(self):
        return self.workspace.options

    @property
    def batches(self) -> list:
        return self.workspace.eval_batches

    @property
    def reference(self) -> list:
        return self.workspace.reference

    def evaluate(self, plan: Plan) -> PlanResult:
        """Build, score and check ``plan``, then time it; raises :class:`PlanRejected` on a compiler problem."""
        require_backend(plan, TVM, "TVM backend")
        with self.lock.shared():
            started = time.perf_counter()
            build = self.build(plan)
            built = build.built
            build_time_s = time.perf_counter() - started
            fidelity = evaluate_plan(lambda batches: [built.run(batch) for batch in batches], self.reference,
                                     self.batches, self.metric, self.goal, keep=self.check_batches,
                                     goal_on=self.goal_on)
            started = time.perf_counter()
            verdict, verdict_detail = self.check(plan, build.qdq, fidelity.outputs)
            check_time_s = time.perf_counter() - started
        result = PlanResult(latency_ms=math.nan, latency_iqr_ms=math.nan,
                            metrics={k: v for k, v in fidelity.values.items() if "/" not in k},
                            build_time_s=round(build_time_s, 3), eval_time_s=round(fidelity.time_s, 3),
                            fidelity_batches=fidelity.batches_used, stopped_early=fidelity.stopped_early,
                            details={"tuned_kernels": built.tuned_kernels, "total_kernels": built.total_kernels,
                                     "boundary_transforms": built.boundary_transforms,
                                     "check_time_s": round(check_time_s, 3)},
                            verdict=verdict, verdict_detail=verdict_detail)
        if verdict == COMPILER_PROBLEM:
            raise PlanRejected(result)  # a wrong library: not worth timing, never on the front
        started = time.perf_counter()
        latency = self._time(built, self.repeats)
        measure_time_s = time.perf_counter() - started
        return dataclasses.replace(result, latency_ms=latency.median_ms, latency_iqr_ms=latency.iqr_ms,
                                   measure_time_s=round(measure_time_s, 3),
                                   details={**result.details, "timing_others_busy_cores": latency.others_busy_cores})

    def check(self, plan: Plan, qdq, outputs) -> tuple[str, str]:
        """The verdict on a build's ``outputs`` for the first ``len(outputs)`` evaluation batches, and its summary.

        A plan with int8 layers is cross-checked as ``build --check`` does
        (:func:`precsearch.fidelity.crosscheck.cross_check`, against ONNX Runtime on the
        same QDQ model, graph optimizations off); only a divergence beyond one
        output step costs a probe build.  The all-float plan has no QDQ model:
        its outputs are held to ONNX Runtime float (the fidelity reference, so
        no extra run) within :data:`~precsearch.fidelity.crosscheck.FLOAT_TAIL_RTOL`
        relative error, what cross_check allows float arithmetic in another
        order; beyond that it is a compiler problem.  bf16 convs are held to ONNX
        Runtime on their bf16-rounded inputs and weights.
        """
        outputs = list(outputs)
        steps = self.workspace.steps
        checked = check_build(self.model, qdq, plan.int8_ids(self.model), self.batches[:len(outputs)], outputs, steps,
                              options=self.options, float_reference=self.reference[:len(outputs)], yardstick=False,
                              bf16_ids=plan.bf16_ids)
        return checked.verdict, checked.summary

    def build(self, plan: Plan) -> PlanBuild:
        """The plan's QDQ model (the float model when every conv is float) and its TVM build."""
        return self.workspace.build(plan)

    def _time(self, built, repeats: int) -> Latency:
        # The lock stops precsearch's own builds; a timing another process overlapped is taken once more.
        with self.lock.exclusive():
            return latency_unloaded(lambda: measure_library(
                built, self.workspace.timing_input, threads=self.options.threads, warmup=self.warmup,
                repeats=repeats))

    def remeasure(self, plan: Plan, repeats: int) -> Latency:
        """Build ``plan`` again and time it with ``repeats`` runs (the front is re-checked before the final report)."""
        require_backend(plan, TVM, "TVM backend")
        with self.lock.shared():
            built = self.build(plan).built
        return self._time(built, repeats)

    def measure_baselines(self) -> dict:
        """ONNX Runtime float and int8 latency, and ORT int8's fidelity (:func:`measure_ort_baselines`)."""
        return measure_ort_baselines(self.workspace, self.metric, warmup=self.warmup, repeats=self.repeats,
                                     lock=self.lock)

    def remeasure_baselines(self, repeats: int) -> dict:
        """ONNX Runtime float and int8 timed again (:func:`retime_ort_baselines`)."""
        return retime_ort_baselines(self.workspace, warmup=self.warmup, repeats=repeats, lock=self.lock)


@dataclass
class BackendDispatch:
    """The evaluator of a study that searches more than one runtime: each plan goes to its backend's evaluator.

    ``evaluators`` maps a backend name (``plan.backend``) to its
    :class:`~precsearch.study.record.PlanEvaluator`.  The baselines (ONNX
    Runtime float and ``quantize_static`` int8) do not depend on the plan's
    backend: the first evaluator measures them.
    """

    evaluators: dict

    @property
    def workspace(self) -> Workspace:
        """The one workspace the backends share."""
        return next(iter(self.evaluators.values())).workspace

    @property
    def lock(self) -> CpuLock:
        """The machine's CPU lock (every backend's evaluator holds the same one: it is the machine's)."""
        return next(iter(self.evaluators.values())).lock

    def _for(self, plan: Plan):
        if plan.backend not in self.evaluators:
            raise ConfigError(f"The study evaluates plans for {sorted(self.evaluators)}; got plan {plan.key()!r} "
                              f"for {plan.backend!r}.")
        return self.evaluators[plan.backend]

    def evaluate(self, plan: Plan) -> PlanResult:
        return self._for(plan).evaluate(plan)

    def remeasure(self, plan: Plan, repeats: int):
        return self._for(plan).remeasure(plan, repeats)

    def measure_baselines(self):
        return next(iter(self.evaluators.values())).measure_baselines()

    def remeasure_baselines(self, repeats: int):
        return next(iter(self.evaluators.values())).remeasure_baselines(repeats)


def make_evaluator(config: SearchConfig, model, workdir: str | Path, preset: str | None, metric: str):
    """The search's evaluator for ``config.backend``: TVM, ONNX Runtime, or both over one shared workspace."""
    workspace = Workspace.from_config(config, model, workdir, preset)
    evaluators = {}
    if TVM in config.backends:
        evaluators[TVM] = TvmEvaluator.from_config(config, model, workdir, preset, metric, workspace=workspace)
    if ORT in config.backends:
        workspace.prepare(tvm=TVM in config.backends)
        evaluators[ORT] = OrtEvaluator.from_config(config, model, workdir, preset, metric, workspace=workspace)
    return next(iter(evaluators.values())) if len(evaluators) == 1 else BackendDispatch(evaluators)
