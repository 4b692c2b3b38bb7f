"""Fidelity of one plan against the float reference, on a small subset first.

Multi-fidelity: a plan is scored on the first few batches; when that already
shows it cannot meet the fidelity goal (the search's ``--max-drop``
constraint), evaluation stops there, and only plans that can matter pay for the
full evaluation set.  For top-k agreement the stop is exact (an upper bound on
the full-set value); for the other metrics it is a margin on the subset value.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from precsearch.errors import ConfigError
from precsearch.fidelity.metrics import METRICS, PROPORTION_METRICS, MetricResults, compute_metrics, wilson_interval

logger = logging.getLogger(__name__)

# Non-top-k metrics stop early only when the subset misses the goal by this much
# (their full-set value has no bound from a subset).
MARGINS = {"sqnr_db": 3.0, "cosine": 0.02, "nmse": 0.5, "max_abs_error": 0.5, "kl_div": 0.5}
#: What a goal is compared with: the metric's value, or (top-k agreement) its 95 % interval's lower bound.
GOAL_ON = ("value", "lower_bound")


@dataclass(frozen=True)
class Fidelity:
    """A plan's metrics and how much of the evaluation set produced them."""

    metrics: MetricResults
    batches_used: int
    batches_total: int
    stopped_early: bool
    time_s: float
    outputs: tuple[dict, ...] = ()  # the candidate's outputs on the first ``keep`` batches, when asked to keep them

    @property
    def values(self) -> dict[str, float]:
        return self.metrics.values


def goal_value(values: dict[str, float], metric: str, goal_on: str = "value") -> float:
    """The number a goal is compared with: ``values[metric]``, or its interval's lower bound."""
    if goal_on == "lower_bound":
        return values[f"{metric}_low"]
    return values[metric]


def check_goal_on(goal_on: str, metric: str | None, owner: str) -> None:
    """Refuse an unknown ``goal_on``, or ``lower_bound`` for a metric without an interval."""
    if goal_on not in GOAL_ON:
        raise ConfigError(f"The 'goal_on' parameter of {owner} must be one of {list(GOAL_ON)}; got {goal_on!r} instead.")
    if goal_on == "lower_bound" and metric is not None and metric not in PROPORTION_METRICS:
        raise ConfigError(f"The 'goal_on' parameter of {owner} can be 'lower_bound' only for the metrics "
                          f"{list(PROPORTION_METRICS)} (they have an interval); got it with {metric!r}.")


def _cannot_reach(metric: str, subset_value: float, goal: float, used: int, total: int,
                  goal_on: str = "value") -> bool:
    higher_is_better = METRICS[metric][1]
    if metric in PROPORTION_METRICS:
        # Even if every remaining sample agreed, the full-set fraction (or its lower bound) stays below the goal.
        best_hits = subset_value * used + (total - used)
        best_case = best_hits / total if goal_on == "value" else wilson_interval(best_hits, total)[0]
        return best_case < goal
    margin = MARGINS.get(metric, 0.0)
    if metric in ("nmse", "max_abs_error", "kl_div"):
        return subset_value > goal * (1 + margin)
    return subset_value < goal - margin if higher_is_better else subset_value > goal + margin


def evaluate_plan(run: Callable[[Sequence[dict]], list[dict]], reference: Sequence[dict], batches: Sequence[dict],
                  metric: str, goal: float | None = None, first_batches: int = 4, keep: int = 0,
                  goal_on: str = "value") -> Fidelity:
    """Score a plan, stopping after ``first_batches`` when it cannot reach ``goal``.

    Parameters
    ----------
    run : callable
        Candidate outputs for a list of batches (a TVM build's ``run`` mapped over them, or ORT).
    reference : list of dict
        Float reference outputs for ``batches``.
    metric : str
        The objective; ``goal`` is in its units (e.g. 0.99 top-1 agreement).
    goal : float, optional
        The least acceptable value; None evaluates every batch.
    first_batches : int
        Size of the first stage.
    keep : int
        Keep the candidate's outputs on the first ``keep`` batches in
        :attr:`Fidelity.outputs` (fewer when the plan stopped early before
        them), so a caller can check them further without running them again.
    goal_on : {"value", "lower_bound"}
        Compare ``goal`` with the metric, or with its 95 % interval's lower bound (top-k agreement only).
    """
    if metric not in METRICS:
        raise ConfigError(f"The 'metric' parameter of evaluate_plan must be one of {sorted(METRICS)}; "
                          f"got {metric!r} instead.")
    check_goal_on(goal_on, metric, "evaluate_plan")
    if len(reference) != len(batches) or not batches:
        raise ConfigError(f"The 'reference' parameter of evaluate_plan must match the {len(batches)} batches; "
                          f"got {len(reference)} instead.")
    started = time.perf_counter()
    total = len(batches)
    first = min(max(1, first_batches), total)
    outputs = list(run(batches[:first]))
    if goal is not None and first < total:
        subset = compute_metrics(reference[:first], outputs)
        value = subset.values[metric]
        # Samples, not batches: a batch may hold several (the reference's leading axis).
        used_samples = sum(next(iter(r.values())).shape[0] for r in reference[:first])
        total_samples = sum(next(iter(r.values())).shape[0] for r in reference)
        if _cannot_reach(metric, value, goal, used_samples, total_samples, goal_on):
            logger.info("fidelity: %s = %.4g on %d/%d batches cannot reach %.4g; stopping", metric, value, first,
                        total, goal)
            return Fidelity(subset, first, total, True, time.perf_counter() - started, tuple(outputs[:keep]))
    if first < total:
        outputs += list(run(batches[first:]))
    return Fidelity(compute_metrics(reference, outputs), total, total, False, time.perf_counter() - started,
                    tuple(outputs[:keep]))
