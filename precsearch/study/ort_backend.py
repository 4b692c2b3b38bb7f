"""The search's ONNX Runtime backend: a plan as ``quantize_static`` makes it, scored and timed in one ORT session.

A plan for ONNX Runtime is the model a user gets from ``quantize_static`` with
its defaults (QDQ, every op type ORT quantizes, per-channel weights) and the
plan's float convs in ``nodes_to_exclude``; what happens to the ops that only
feed or follow an excluded conv is ORT's tool's own decision.  The model is
loaded into an optimized session (the one a deployment would run, with ORT's
real int8 kernels), its outputs on the evaluation batches are compared with the
ORT float reference, and the same session is timed with the settings a TVM
build is timed with, under the same :class:`~precsearch.measure.CpuLock`.

There is no compiler to cross-check: the session is the runtime that ships.
What is checked instead is the graph, twice: in the quantized model every conv
the plan keeps float has float weights and every other int8-capable conv
quantized ones (:func:`check_ort_plan`), and in the graph the session runs no
conv the plan keeps float is a ``QLinearConv`` (:func:`check_runtime_plan`).

The second check needs one setting.  ONNX Runtime 1.32's graph optimizer
``WeightBiasQuantization`` quantizes, at load time, the float weights of any
Conv/Gemm whose input comes out of a DequantizeLinear (symmetric per-tensor
int8), after which the conv fuses into a ``QLinearConv``.  An excluded conv
between quantized neighbours, which is what ``nodes_to_exclude`` usually makes,
would then run int8 after all, with other weight scales than the plan's: the
float choice would be undone without a word.  Every session of this backend
therefore disables that one transformer (:data:`DISABLED_OPTIMIZERS`), and the
export writes the session settings beside the model.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from precsearch.errors import ConfigError, ModelError
from precsearch.fidelity.early_stop import evaluate_plan
from precsearch.fidelity.metrics import compute_metrics
from precsearch.fidelity.reference import run_ort
from precsearch.measure import (CpuLock, Latency, measure_onnxruntime, measure_openvino_builds, onnxruntime_session,
                                latency_unloaded, openvino_missing_reason, time_session)
from precsearch.model.plan import ORT, Plan
from precsearch.study.record import PlanResult
from precsearch.workspace import Workspace

logger = logging.getLogger(__name__)

#: ORT graph transformers this backend's sessions skip: WeightBiasQuantization would re-quantize excluded convs.
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)
_TOKEN = re.compile(r"_token_\d+$")


def float_convs(proto: onnx.ModelProto) -> set[str]:
    """Names of the Conv nodes of a QDQ model whose weights are float (no DequantizeLinear produces them).

    ``quantize_static`` quantizes a conv's weight into an int8 initializer
    feeding a ``DequantizeLinear`` whose output is the conv's weight input; an
    excluded conv keeps its float initializer as the weight input.
    """
    dequantized = {out for node in proto.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return {node.name for node in proto.graph.node
            if node.op_type == "Conv" and node.domain in ("", "ai.onnx") and node.input[1] not in dequantized}


def check_ort_plan(model, proto: onnx.ModelProto, plan: Plan) -> None:
    """Raise when the quantized model does not keep exactly the plan's convs float (and quantize the others)."""
    capable = set(model.capable_ids())
    planned = set(plan.float_layer_ids(model)) & capable
    found = float_convs(proto) & capable
    if found != planned:
        extra, missing = sorted(found - planned), sorted(planned - found)
        raise ModelError(f"quantize_static did not build plan {plan.key()!r}: "
                         f"float convs it should have quantized {extra[:5]}, quantized convs the plan keeps float "
                         f"{missing[:5]}.")


def runtime_int8_convs(optimized: onnx.ModelProto) -> set[str]:
    """Names of the convs ORT runs as ``QLinearConv`` in an optimized graph (its ``_token_<n>`` suffixes removed)."""
    return {_TOKEN.sub("", node.name) for node in optimized.graph.node if node.op_type == "QLinearConv"}


def check_runtime_plan(model, optimized: onnx.ModelProto, plan: Plan) -> None:
    """Raise when the graph ORT runs has made a conv the plan keeps float int8 (a ``QLinearConv``)."""
    requantized = sorted(runtime_int8_convs(optimized) & set(plan.float_layer_ids(model)))
    if requantized:
        raise ModelError(f"ONNX Runtime's optimized graph runs convs that plan {plan.key()!r} keeps float as "
                         f"QLinearConv: {requantized[:5]}.")


def plan_session(model, proto: onnx.ModelProto, plan: Plan, *, threads: int):
    """The optimized session of a plan's model, its float convs checked in the graph ORT runs."""
    with tempfile.TemporaryDirectory(prefix="precsearch-ort-") as scratch:
        optimized_path = Path(scratch) / "optimized.onnx"
        session = onnxruntime_session(proto, optimized=True, threads=threads, disabled_optimizers=DISABLED_OPTIMIZERS,
                                      optimized_model_path=optimized_path if plan.int8_ids(model) else None)
        if plan.int8_ids(model):
            check_runtime_plan(model, onnx.load(str(optimized_path)), plan)
    return session


def require_backend(plan: Plan, backend: str, who: str) -> None:
    if plan.backend != backend:
        raise ConfigError(f"The {who} builds plans for {backend!r}; got plan {plan.key()!r} for {plan.backend!r}.")


@dataclass
class OrtEvaluator:
    """Scores plans of one model on ONNX Runtime: ``quantize_static`` with ``nodes_to_exclude``, fidelity, latency.

    Implements :class:`~precsearch.study.record.PlanEvaluator`.  Building the
    model and the fidelity run hold the machine's :class:`CpuLock` shared; the
    latency measurement holds it exclusive, as :class:`TvmEvaluator` does.
    """

    workspace: Workspace
    metric: str
    goal: float | None
    goal_on: str = "value"
    warmup: int = 10
    repeats: int = 50
    lock: CpuLock = field(default_factory=CpuLock)

    @classmethod
    def from_config(cls, config, model, workdir: str | Path, preset: str | None, metric: str, *,
                    workspace: Workspace | None = None) -> OrtEvaluator:
        """The search's workspace (calibration inputs, evaluation inputs, reference; cached) and settings."""
        if workspace is None:
            workspace = Workspace.from_config(config, model, workdir, preset)
            workspace.prepare(tvm=False)
        return cls(workspace=workspace, metric=metric, goal=config.fidelity_goal(metric),
                   goal_on=config.goal_on, warmup=config.warmup,
                   repeats=config.repeats)

    @property
    def threads(self) -> int:
        return self.workspace.options.threads

    def model_of(self, plan: Plan) -> onnx.ModelProto:
        """The plan's quantized model (the float model when every conv is float), checked against the plan."""
        require_backend(plan, ORT, "ONNX Runtime backend")
        proto = self.workspace.ort_model(plan)
        if plan.int8_ids(self.workspace.model):
            check_ort_plan(self.workspace.model, proto, plan)
        return proto

    def session(self, plan: Plan):
        """An optimized ORT session on the plan's model (:func:`plan_session`), with the workspace's thread count."""
        return plan_session(self.workspace.model, self.model_of(plan), plan, threads=self.threads)

    def evaluate(self, plan: Plan) -> PlanResult:
        """Quantize, score and time ``plan``; fidelity and latency come from the same optimized session."""
        with self.lock.shared():
            started = time.perf_counter()
            session = self.session(plan)
            build_time_s = time.perf_counter() - started
            names = [out.name for out in session.get_outputs()]
            fidelity = evaluate_plan(lambda batches: [dict(zip(names, session.run(names, b))) for b in batches],
                                     self.workspace.reference, self.workspace.eval_batches, self.metric, self.goal,
                                     goal_on=self.goal_on)
        started = time.perf_counter()
        latency = self._time(plan, session, self.repeats)
        measure_time_s = time.perf_counter() - started
        return PlanResult(latency_ms=latency.median_ms, latency_iqr_ms=latency.iqr_ms,
                          metrics={k: v for k, v in fidelity.values.items() if "/" not in k},
                          build_time_s=round(build_time_s, 3), eval_time_s=round(fidelity.time_s, 3),
                          measure_time_s=round(measure_time_s, 3), fidelity_batches=fidelity.batches_used,
                          stopped_early=fidelity.stopped_early,
                          details={"timing_others_busy_cores": latency.others_busy_cores})

    def _time(self, plan: Plan, session, repeats: int) -> Latency:
        # As TvmEvaluator._time: a timing another process overlapped is taken once more.
        with self.lock.exclusive():
            return latency_unloaded(lambda: time_session(
                session, self.workspace.timing_input, threads=self.threads, warmup=self.warmup, repeats=repeats,
                backend="ort"))

    def remeasure(self, plan: Plan, repeats: int) -> Latency:
        """Open the plan's session again and time it with ``repeats`` runs."""
        with self.lock.shared():
            session = self.session(plan)
        return self._time(plan, session, repeats)

    def measure_baselines(self) -> dict:
        return measure_ort_baselines(self.workspace, self.metric, warmup=self.warmup, repeats=self.repeats,
                                     lock=self.lock)

    def remeasure_baselines(self, repeats: int) -> dict:
        return retime_ort_baselines(self.workspace, warmup=self.warmup, repeats=repeats, lock=self.lock)


def _time_baselines(workspace: Workspace, models, *, warmup: int, repeats: int, lock: CpuLock) -> list:
    settings = dict(threads=workspace.options.threads, warmup=warmup, repeats=repeats)
    with lock.exclusive():
        return [measure_onnxruntime(model, workspace.timing_input, **settings) for model in models]


def retime_ort_baselines(workspace: Workspace, *, warmup: int, repeats: int, lock: CpuLock) -> dict:
    """ONNX Runtime float and ``quantize_static`` int8 timed again (``ort_float_ms``, ``ort_int8_ms`` and IQRs)."""
    ort_float, ort_int8 = _time_baselines(workspace, (workspace.model.proto, workspace.ort_int8_model),
                                          warmup=warmup, repeats=repeats, lock=lock)
    return {"ort_float_ms": ort_float.median_ms, "ort_float_iqr_ms": ort_float.iqr_ms,
            "ort_int8_ms": ort_int8.median_ms, "ort_int8_iqr_ms": ort_int8.iqr_ms}


def measure_ort_baselines(workspace: Workspace, metric: str, *, warmup: int, repeats: int, lock: CpuLock) -> dict:
    """ONNX Runtime float and int8 latency, and ORT int8's fidelity: every backend's baselines.

    ORT int8 is the user's model (``quantize_static`` defaults, per channel,
    optimized session); ORT running precsearch's Conv-only all-int8 QDQ model
    is kept beside it as ``ort_int8_conv_*``.
    """
    conv_only = workspace.qdq_model(Plan(frozenset()))
    user = workspace.ort_int8_model
    ort_float, ort_int8, ort_conv = _time_baselines(workspace, (workspace.model.proto, user, conv_only),
                                                    warmup=warmup, repeats=repeats, lock=lock)
    with lock.shared():
        int8_metrics = compute_metrics(workspace.reference, run_ort(user, workspace.eval_batches,
                                                                    optimized=True)).values
        conv_metrics = compute_metrics(workspace.reference, run_ort(conv_only, workspace.eval_batches,
                                                                    optimized=True)).values
    return {"ort_float_ms": ort_float.median_ms, "ort_float_iqr_ms": ort_float.iqr_ms,
            "ort_int8_ms": ort_int8.median_ms, "ort_int8_iqr_ms": ort_int8.iqr_ms,
            f"ort_int8_{metric}": int8_metrics[metric],
            "ort_int8_kind": "quantize_static",
            "ort_int8_conv_ms": ort_conv.median_ms, f"ort_int8_conv_{metric}": conv_metrics[metric],
            **measure_openvino_baselines(workspace, metric, warmup=warmup, repeats=repeats, lock=lock)}


def measure_openvino_baselines(workspace: Workspace, metric: str, *, warmup: int, repeats: int,
                               lock: CpuLock) -> dict:
    """OpenVINO's default and float32 builds of the float model: latency, ``metric`` against the ORT float
    reference and the precision each inferred in (``openvino_ms``, ``openvino_<metric>``, ``openvino_precision``,
    the same for ``openvino_f32``); empty, with one logged line, when OpenVINO is not installed."""
    missing = openvino_missing_reason()
    if missing:
        logger.warning("OpenVINO baselines skipped: %s", missing)
        return {}
    with lock.exclusive():  # the child times both builds: nothing else may run meanwhile
        builds = measure_openvino_builds(workspace.model.proto, workspace.timing_input, workspace.eval_batches,
                                         threads=workspace.options.threads, warmup=warmup, repeats=repeats)
    out = {}
    for name, build in builds.items():
        metrics = compute_metrics(workspace.reference, build["outputs"])
        out.update({f"{name}_ms": build["latency"].median_ms, f"{name}_iqr_ms": build["latency"].iqr_ms,
                    f"{name}_{metric}": metrics.values[metric], f"{name}_precision": build["precision"]})
    return out
