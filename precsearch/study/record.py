"""What a search backend returns for a plan, and the one method a backend has.

Kept apart from :mod:`precsearch.study.search` (the loop) and
:mod:`precsearch.study.evaluator` (the TVM backend) so that neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from precsearch.errors import PrecsearchError
from precsearch.plan import Plan

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
    """Scores a plan: the one thing the search needs from a backend (TVM here, a stand-in in tests)."""

    def evaluate(self, plan: Plan) -> PlanResult:
        ...
