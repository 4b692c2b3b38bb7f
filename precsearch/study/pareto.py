"""The Pareto front of latency against fidelity, and its hypervolume.

Computed once into small values (compute, then draw): the search's progress
line, its final table and the reports all read these.  Dominance and the
hypervolume are written here for two objectives: Optuna's public API has no
hypervolume (only the private ``optuna._hypervolume``), and ``Study.best_trials``
works on a whole study, while the front is taken over one trial per plan,
feasible ones only, from trials already fetched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from precsearch.model.plan import Plan
from precsearch.study.record import TrialRecord

#: Objective values are clipped to this magnitude: SQNR of an exact plan is
#: +inf and a broken one -inf, and neither samplers nor hypervolume take infinities.
FINITE_LIMIT = 1e6


def finite_objective(value: float) -> float:
    """``value`` clipped to ±:data:`FINITE_LIMIT` (NaN becomes the worst, -limit)."""
    if math.isnan(value):
        return -FINITE_LIMIT
    return float(min(max(value, -FINITE_LIMIT), FINITE_LIMIT))


@dataclass(frozen=True)
class FrontPoint:
    """One plan on the front."""

    trial: int
    plan: str
    latency_ms: float
    fidelity: float
    float_layers: tuple[str, ...]  # every layer the plan does not run int8, bf16 ones included
    backend: str = "tvm"  # the runtime the plan was built for
    metrics: dict = field(default_factory=dict)  # every recorded metric (intervals, the tie-break)
    bf16_layers: tuple[str, ...] = ()

    def to_plan(self) -> Plan:
        """The :class:`~precsearch.model.plan.Plan` of this point (``plan`` is its key)."""
        return Plan(frozenset(self.float_layers), self.backend, frozenset(self.bf16_layers))

    def interval(self, metric: str) -> tuple[float, float] | None:
        """The 95 % interval of ``metric`` when it has one (top-k agreement)."""
        low, high = self.metrics.get(f"{metric}_low"), self.metrics.get(f"{metric}_high")
        return (low, high) if low is not None and high is not None else None


def front_points(trials, *, feasible_only: bool = True, higher_is_better: bool = True,
                 tie_break: str | None = None) -> list[FrontPoint]:
    """The non-dominated completed trials, one per plan, fastest first.

    Parameters
    ----------
    trials : sequence of optuna.trial.FrozenTrial
        Values ``(latency_ms, fidelity)``; user attribute ``plan``.
    feasible_only : bool
        Drop trials whose constraints are not all ``<= 0`` first.
    higher_is_better : bool
        Direction of the fidelity metric.
    tie_break : str, optional
        A recorded metric (lower is better, e.g. ``kl_div``) that orders plans
        of equal fidelity: of two such plans, the slower one stays on the front
        when it is closer to the reference by this metric.  A trial without it
        ranks last among its equals.
    """
    from optuna.trial import TrialState

    seen: dict[str, object] = {}
    for trial in trials:
        if trial.state != TrialState.COMPLETE or trial.values is None:
            continue
        if feasible_only and any(value > 0 for value in trial.constraints.values()):
            continue
        record = TrialRecord.from_trial(trial)
        seen.setdefault(record.plan_key or str(trial.number), (trial, record))  # duplicates share values
    unique = list(seen.values())
    if not unique:
        return []
    fidelity_loss = np.array([-t.values[1] if higher_is_better else t.values[1] for t, _ in unique], dtype=float)
    if tie_break is not None:
        ties = np.array([r.metrics.get(tie_break, math.inf) for _, r in unique], dtype=float)
        ties = np.where(np.isnan(ties), math.inf, ties)
        # Fidelity then tie-break, lexicographically, as one rank: the front stays two-dimensional.
        pairs = sorted(set(zip(fidelity_loss.tolist(), ties.tolist())))
        rank = {pair: index for index, pair in enumerate(pairs)}
        fidelity_loss = np.array([rank[pair] for pair in zip(fidelity_loss.tolist(), ties.tolist())], dtype=float)
    losses = np.column_stack([[t.values[0] for t, _ in unique], fidelity_loss])
    on_front = _non_dominated(losses)
    points = [FrontPoint(trial=t.number, plan=r.plan_key or "", latency_ms=t.values[0], fidelity=t.values[1],
                         float_layers=r.float_layers, backend=r.backend, metrics=r.metrics,
                         bf16_layers=r.bf16_layers)
              for (t, r), keep in zip(unique, on_front) if keep]
    return sorted(points, key=lambda p: (p.latency_ms, p.trial))


def _non_dominated(losses: np.ndarray) -> np.ndarray:
    """Mask of the rows no other row dominates (every loss <=, one <), both objectives minimized."""
    no_worse = (losses[None, :, :] <= losses[:, None, :]).all(axis=2)  # [i, j]: j is nowhere worse than i
    better = (losses[None, :, :] < losses[:, None, :]).any(axis=2)
    return ~(no_worse & better).any(axis=1)


def hypervolume(points: Sequence[tuple[float, float]], reference: tuple[float, float], *,
                higher_is_better: bool = True) -> float:
    """Area dominated by ``(latency_ms, fidelity)`` points up to ``reference`` (a worst latency and fidelity).

    Points that do not improve on the reference in both objectives add nothing.
    """
    sign = -1.0 if higher_is_better else 1.0
    ref = np.array([reference[0], sign * reference[1]], dtype=np.float64)
    losses = np.array([[lat, sign * fid] for lat, fid in points], dtype=np.float64).reshape(-1, 2)
    losses = losses[np.all(losses < ref, axis=1)]
    # Sweep in latency order: each point adds the strip between its loss and the best one so far.
    area, best = 0.0, ref[1]
    for latency, loss in losses[np.argsort(losses[:, 0], kind="stable")]:
        if loss < best:
            area += (ref[0] - latency) * (best - loss)
            best = loss
    return float(area)


def hypervolume_gain(points: Sequence[tuple[float, float]], latency_ms: np.ndarray, fidelity: np.ndarray,
                     reference: tuple[float, float], *, higher_is_better: bool = True) -> np.ndarray:
    """The hypervolume each candidate ``(latency_ms[i], fidelity[i])`` would add to ``points``, all at once.

    Vectorized because the guided search scores thousands of (candidate, error draw) pairs per proposal; equal
    to ``hypervolume(points + [c]) - hypervolume(points)`` for each candidate ``c``.
    """
    sign = -1.0 if higher_is_better else 1.0
    ref = np.array([reference[0], sign * reference[1]], dtype=np.float64)
    losses = np.array([[lat, sign * fid] for lat, fid in points], dtype=np.float64).reshape(-1, 2)
    losses = losses[np.all(losses < ref, axis=1)]
    losses = losses[np.argsort(losses[:, 0], kind="stable")]
    # The dominated region is a staircase: left of the fastest point nothing, then the best loss so far.
    edges = np.concatenate([[-np.inf], losses[:, 0], [ref[0]]])
    levels = np.concatenate([[ref[1]], np.minimum.accumulate(losses[:, 1]) if len(losses) else []])
    x = np.asarray(latency_ms, dtype=np.float64).reshape(-1, 1)
    y = sign * np.asarray(fidelity, dtype=np.float64).reshape(-1, 1)
    width = np.clip(edges[None, 1:] - np.maximum(edges[None, :-1], x), 0.0, None)
    height = np.clip(levels[None, :] - y, 0.0, None)
    return np.nan_to_num((width * height).sum(axis=1), nan=0.0)
