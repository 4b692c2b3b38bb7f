"""What a search backend returns for a plan, and the one method a backend has.

Kept apart from :mod:`precsearch.search` (the loop) and
:mod:`precsearch.evaluator` (the TVM backend) so that neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .plan import Plan


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


class PlanEvaluator(Protocol):
    """Scores a plan: the one thing the search needs from a backend (TVM here, a stand-in in tests)."""

    def evaluate(self, plan: Plan) -> PlanResult:
        ...
