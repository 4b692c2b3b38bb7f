"""A search backend for tests: real ONNX Runtime fidelity, deterministic stand-in latency."""

from precsearch.errors import CompileError
from precsearch.fidelity.reference import run_ort
from precsearch.fidelity.metrics import compute_metrics
from precsearch.model.bf16 import bf16_reference_model
from precsearch.model.plan import Plan
from precsearch.study.record import COMPILER_PROBLEM, PlanResult
from precsearch.workspace import Workspace

MISCOMPILED = "compiler problem: image 0 diverges at conv1.out_q after conv1 (Conv), 0.25 steps from a tie"


def standin_latency_ms(model, plan: Plan) -> float:
    """A deterministic latency per backend.

    TVM: an int8 conv costs a quarter of a float one, a bf16 one half, each boundary between int8 and the
    rest costs extra.
    ONNX Runtime: float convs are cheaper than TVM's (0.8), int8 ones dearer (0.5), boundaries free.
    So TVM wins the mostly-int8 plans and ORT the mostly-float ones.
    """
    ids = model.capable_ids()
    float_cost, int8_cost, boundary_cost = (0.8, 0.5, 0.0) if plan.backend == "ort" else (1.0, 0.25, 0.05)
    cost = sum(model.layer(i).macs * (0.5 if i in plan.bf16_ids else float_cost if i in plan.float_ids else int8_cost)
               for i in ids) * 1e-6
    boundaries = sum((a in plan.float_ids) != (b in plan.float_ids) for a, b in zip(ids, ids[1:]))
    return cost + boundary_cost * boundaries


class StandInEvaluator:
    """Real ORT fidelity, deterministic latency: int8 convs cost a quarter of float, boundaries cost extra.

    Builds nothing, so checks nothing (verdict None), except that ``miscompiled_plans``
    come back with a compiler-problem verdict, as a TVM build that fails its cross-check.
    """

    def __init__(self, model, ranges, batches, reference, fail_plans=(), miscompiled_plans=()):
        self.model, self.ranges, self.batches, self.reference = model, ranges, batches, reference
        # The search's own path from a plan to its QDQ model; nothing is built or cached.
        self.workspace = Workspace.in_memory(model, None, [], batches, ranges=ranges, reference=reference)
        self.fail_plans = {plan.key() for plan in fail_plans}
        self.miscompiled_plans = {plan.key() for plan in miscompiled_plans}
        self.calls: list[str] = []
        self._fidelity: dict[str, dict] = {}

    def latency_ms(self, plan: Plan) -> float:
        return standin_latency_ms(self.model, plan)

    def fidelity(self, plan: Plan) -> dict:
        if plan.key() not in self._fidelity:
            qdq = self.workspace.qdq_model(plan)
            if plan.bf16_ids:  # what a bf16 build gives: ONNX Runtime on the bf16-rounded convs
                qdq = bf16_reference_model(qdq, plan.bf16_ids)
            metrics = compute_metrics(self.reference, run_ort(qdq, self.batches)).values
            self._fidelity[plan.key()] = {k: v for k, v in metrics.items() if "/" not in k}
        return self._fidelity[plan.key()]

    def evaluate(self, plan: Plan) -> PlanResult:
        self.calls.append(plan.key())
        if plan.key() in self.fail_plans:
            raise CompileError("relax.add: shapes [1,2,8,8,4] and [1,16,1,1] are not broadcastable",
                               pass_name="ConvertLayout", layer_id="conv1")
        if plan.key() in self.miscompiled_plans:
            return PlanResult(latency_ms=self.latency_ms(plan), latency_iqr_ms=0.0, metrics=self.fidelity(plan),
                              verdict=COMPILER_PROBLEM, verdict_detail=MISCOMPILED)
        return PlanResult(latency_ms=self.latency_ms(plan), latency_iqr_ms=0.0, metrics=self.fidelity(plan))

    def measure_baselines(self):
        return None  # no ONNX Runtime timing: reports show no baseline rows

    def remeasure(self, plan: Plan, repeats: int):
        return None  # a stand-in latency is exact: nothing to time again

    def remeasure_baselines(self, repeats: int):
        return None
