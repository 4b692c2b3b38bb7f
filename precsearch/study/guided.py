"""Model-guided proposals: a cheap estimate of every plan, and the plans along the estimate's front.

Before the samplers have learnt anything, the search already knows a lot about
a plan: how much quantization noise each conv adds on its own (one ONNX Runtime
run of the QDQ model per layer, or ``sensitivity.csv``), how many MACs each conv
has, and, once the seeds are measured, what the all-int8 and all-float plans
cost.  :class:`PlanEstimate` turns that into two cheap models of a plan ``x``
(``x_i = 1`` when conv ``i`` is int8):

* **latency** ``a + sum_i s_i x_i + c * boundaries(x)``: a per-layer change in
  latency when the conv is int8 (negative when int8 is faster), and a cost per
  int8/float boundary between neighbouring convs (a layout transform and a
  quantize/dequantize pair).  The prior puts ``s_i`` in proportion to the MACs,
  scaled to the measured all-int8 − all-float difference; every measured trial
  refits it (ridge regression towards that prior).
* **fidelity**: quantization noise adds up roughly independently, so the
  output's noise-to-signal ratio (``nmse``) of a plan is estimated as
  ``sum_i w_i x_i``, ``w_i`` starting from the layer's noise when it alone is
  int8 and refitted by non-negative least squares on the measured plans (which
  also absorbs the average interaction between layers).  A monotone map fitted
  on the measured trials (isotonic regression) turns noise into the metric.

Where the study's convs may also run bf16, a plan is two masks, ``x`` (int8)
and ``z`` (bf16, ``x_i + z_i <= 1``; the rest float32): latency gains
``sum_i t_i z_i`` (prior from the measured all-bf16 plan, by MACs, else 0) and
noise ``sum_i v_i z_i`` (``v_i`` from the layer's noise when it alone is bf16).
Boundaries stay those between int8 and the rest: a bf16 conv reads and writes
float32, so its own casts are in its ``t_i``.

:meth:`PlanEstimate.propose` solves the estimate's front exactly as an integer
program (HAWQ-V3 does the same for bit widths): minimum latency subject to a
noise budget, over a sweep of budgets, with the boundaries as variables, via
SciPy's HiGHS MILP.  Every other proposal is the solution at the budget that
meets the search's goal (the plan a user ships), the budget shrunk after each
such proposal that missed the goal and relaxed after each that met it, as long
as the estimate expects that plan faster than the fastest plan measured at the
goal (else the turn goes to the front).
Plans already measured are cut off, so every proposal is new.

The additive noise model misses how layers interact, so the metric it
predicts can be several dB off on a plan it has not seen.  A Gaussian process
on the masks (scikit-learn) learns the measured plans' residuals and says how
sure it is of each unseen plan; the next proposal is the candidate (the
integer program's solutions, one-conv changes of the measured front, or every
plan of a small space) with the largest *expected* hypervolume gain under that
error, and every other one is such a one-conv step from the measured front.

Written here because no library does it: Optuna's samplers know nothing of the
model's structure, and HAWQ-V3's ILP is code inside a PyTorch training repo.
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from precsearch.model import LoadedModel
from precsearch.model.plan import Plan

logger = logging.getLogger(__name__)

# Ridge weight of the latency prior, in units of one measured trial.
PRIOR_WEIGHT = 1.0
# The prior's noise of a layer counts as this many measured plans in the noise fit.
NOISE_PRIOR_WEIGHT = 0.5
# Budgets swept along the estimated front, besides the goal's.
FRONT_BUDGETS = 12
# A layer quantized alone that adds no measurable noise still costs this much (keeps log-noise finite).
NOISE_FLOOR = 1e-12
# A space with at most this many plans is scored whole for each proposal (3^7 three-state, 2^12 two-state).
EXHAUSTIVE_CANDIDATES = 4096
# The least error assumed of the estimate: latency relative, the metric as a share of its measured spread.
MIN_LATENCY_ERROR = 0.02
MIN_FIDELITY_ERROR = 0.02
# Draws of the estimate's error per candidate (fixed, so proposals are reproducible).
ERROR_DRAWS = 64
# Scored plans before the residual model is fitted.
MIN_RESIDUAL_PLANS = 4
# One proposal in this many is the goal's budget solved outright; the rest go by expected hypervolume gain.
GOAL_EVERY = 2
# The goal's noise budget shrinks by this after each goal proposal that missed the goal, grows by this after each
# one that met it, up to this multiple (see PlanEstimate.goal_budget_scale).  On the tiny model with its 45 dB
# goal (10 seeds, 26 plans), goal proposals meeting the goal: 36 of 62 against 21 of 66 with the budget fixed;
# with the check that a goal proposal may beat the fastest plan at the goal (PlanEstimate.propose), 10 of 22, the
# hypervolume 0.950 (0.945 before both), the fastest plan at the goal 1.052x the best (1.069x; the best found in 4
# runs of 10 against 2).
GOAL_SHRINK = 0.5
GOAL_GROW = 1.4
GOAL_SCALE_MAX = 2.0


def _normal_draws() -> np.ndarray:
    """``ERROR_DRAWS`` standard normal pairs (latency, metric), the same every call."""
    return np.random.default_rng(0).standard_normal((ERROR_DRAWS, 2))


def conv_edges(model: LoadedModel) -> list[tuple[int, int]]:
    """Pairs of int8-capable convs (indices into ``model.capable_ids()``) joined by a path without another conv.

    Where the two differ in precision the build puts a boundary (a layout
    transform and a quantize or dequantize) between them.
    """
    ids = model.capable_ids()
    position = {layer_id: i for i, layer_id in enumerate(ids)}
    nodes = list(model.proto.graph.node)
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    all_convs = {layer.id for layer in model.layers}
    edges = set()
    for node in nodes:
        if node.name not in position:
            continue
        frontier, seen = list(node.output), set()
        while frontier:
            tensor = frontier.pop()
            for consumer in consumers.get(tensor, []):
                if id(consumer) in seen:
                    continue
                seen.add(id(consumer))
                if consumer.name in all_convs:
                    if consumer.name in position:
                        edges.add((position[node.name], position[consumer.name]))
                    continue
                frontier.extend(consumer.output)
    return sorted(edges)


@dataclass
class Observation:
    """One measured plan of one backend: its mask (int8, then bf16 in a three-state space), latency, metric and
    noise."""

    int8: np.ndarray
    latency_ms: float
    fidelity: float
    nmse: float


@dataclass
class PlanEstimate:
    """The cheap latency and fidelity model of the plans of one backend (see the module docstring).

    Parameters
    ----------
    layer_ids : sequence of str
        The int8-capable convs, in the model's order (``model.capable_ids()``).
    macs : sequence of int
    layer_noise : sequence of float
        Each layer's output ``nmse`` when it alone is int8.
    edges : list of (int, int)
        :func:`conv_edges`.
    higher_is_better : bool
        The direction of the search's metric.
    bf16_noise : sequence of float, optional
        Each layer's ``nmse`` when it alone is bf16: given, the space is int8 / bf16 / float and a mask is
        ``[x, z]`` (``2n`` long).
    """

    layer_ids: tuple[str, ...]
    macs: np.ndarray
    layer_noise: np.ndarray
    edges: list[tuple[int, int]]
    higher_is_better: bool = True
    backend: str = "tvm"
    metric: str | None = None  # sqnr_db and nmse follow from the noise exactly; other metrics by a fitted map
    observations: list[Observation] = field(default_factory=list)
    latency_coef: np.ndarray | None = None  # [a, s_1..s_n, c]
    noise_coef: np.ndarray | None = None  # a factor per layer (on its prior noise), [per bf16 layer,] per edge
    bf16_noise: np.ndarray | None = None
    _residual: object = field(default=None, repr=False)  # the residual model (see fidelity_with_error)
    candidate_draws: int = 0  # how often _candidates ran: odd draws are local steps
    propose_calls: int = 0  # how often propose ran: every GOAL_EVERY-th call starts with the goal's budget
    goal_proposals: list = field(default_factory=list)  # the masks proposed at the goal's budget

    def __post_init__(self):
        self.layer_ids = tuple(self.layer_ids)
        self.macs = np.asarray(self.macs, dtype=np.float64)
        self.layer_noise = np.maximum(np.asarray(self.layer_noise, dtype=np.float64), NOISE_FLOOR)
        if self.bf16_noise is not None:
            self.bf16_noise = np.maximum(np.asarray(self.bf16_noise, dtype=np.float64), NOISE_FLOOR)

    # ---- the data

    @property
    def states(self) -> int:
        """Binary variables per conv: 1 (int8), or 2 (int8, bf16) in a three-state space."""
        return 1 if self.bf16_noise is None else 2

    def mask(self, plan: Plan) -> np.ndarray:
        """``x`` (1.0 for each int8 conv of ``plan``), followed in a three-state space by ``z`` (each bf16 one)."""
        int8 = np.array([0.0 if layer_id in plan.float_ids else 1.0 for layer_id in self.layer_ids])
        if self.states == 1:
            return int8
        return np.concatenate([int8, [1.0 if layer_id in plan.bf16_ids else 0.0 for layer_id in self.layer_ids]])

    def plan(self, mask: np.ndarray) -> Plan:
        int8, bf16 = self._split(mask)
        return Plan(frozenset(i for i, q in zip(self.layer_ids, int8) if q < 0.5), self.backend,
                    frozenset(i for i, q in zip(self.layer_ids, bf16) if q > 0.5))

    def _split(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.layer_ids)
        mask = np.asarray(mask, dtype=np.float64)
        return mask[:n], (mask[n:2 * n] if self.states == 2 else np.zeros(n))

    def boundaries(self, mask: np.ndarray) -> float:
        int8, _ = self._split(mask)
        return float(sum(abs(int8[u] - int8[v]) for u, v in self.edges))

    def full(self, precision_index: int = 0) -> np.ndarray:
        """The mask of every conv int8 (0) or, in a three-state space, every conv bf16 (1)."""
        n = len(self.layer_ids)
        mask = np.zeros(n * self.states)
        mask[precision_index * n:(precision_index + 1) * n] = 1.0
        return mask

    def observe(self, observations: Iterable[Observation]) -> None:
        """Replace the measured plans and refit both models."""
        self.observations = [o for o in observations if math.isfinite(o.latency_ms) and math.isfinite(o.nmse)]
        self._fit_latency()
        self._fit_noise()
        self._fit_residual()

    # ---- latency

    def _features(self, mask: np.ndarray) -> np.ndarray:
        return np.concatenate([[1.0], np.asarray(mask, dtype=np.float64), [self.boundaries(mask)]])

    def _prior(self) -> np.ndarray | None:
        n = len(self.layer_ids)
        by_mask = {tuple(o.int8): o for o in self.observations}
        all_float = by_mask.get(tuple(np.zeros(n * self.states)))
        if all_float is None:
            return None
        share = self.macs / self.macs.sum() if self.macs.sum() > 0 else np.full(n, 1.0 / n)
        steps = []
        for index in range(self.states):  # int8, then bf16: each measured all-one-precision plan, by MACs
            every = by_mask.get(tuple(self.full(index)))
            steps.append((every.latency_ms - all_float.latency_ms if every is not None else 0.0) * share)
        return np.concatenate([[all_float.latency_ms], *steps, [0.0]])

    def _fit_latency(self) -> None:
        prior = self._prior()
        if prior is None:
            self.latency_coef = None
            return
        features = np.array([self._features(o.int8) for o in self.observations])
        target = np.array([o.latency_ms for o in self.observations])
        # Ridge towards the prior: (F'F + λI) θ = F'y + λ θ0, solved in the offset θ - θ0.
        scale = PRIOR_WEIGHT * max(1.0, float(np.mean(features ** 2)))
        lhs = features.T @ features + scale * np.eye(features.shape[1])
        rhs = features.T @ (target - features @ prior)
        coef = prior + np.linalg.solve(lhs, rhs)
        coef[-1] = max(coef[-1], 0.0)  # a boundary never saves time
        self.latency_coef = coef

    def latency_ms(self, plan_or_mask) -> float:
        int8 = self.mask(plan_or_mask) if isinstance(plan_or_mask, Plan) else np.asarray(plan_or_mask, float)
        if self.latency_coef is None:
            return math.nan
        return float(self._features(int8) @ self.latency_coef)

    # ---- fidelity

    def _noise_features(self, mask: np.ndarray) -> np.ndarray:
        """Per layer its prior noise when int8 (and when bf16); per edge the pair's product (both int8), in the
        same units."""
        int8, _ = self._split(mask)
        pairs = [int8[u] * int8[v] * math.sqrt(self.layer_noise[u] * self.layer_noise[v]) for u, v in self.edges]
        return np.concatenate([np.asarray(mask, dtype=np.float64) * self._single_noise(), pairs])

    def _fit_noise(self) -> None:
        n, m = len(self.layer_ids) * self.states, len(self.edges)
        # Unknowns: a factor per layer on its prior noise (prior 1) and per edge on the pair's geometric mean
        # (prior 0): neighbours quantized together share the activation between them, so their noise is
        # less than the sum; these interactions are learnt from the measured plans.
        features, targets = [], []
        for o in self.observations:
            if o.int8.sum() == 0:
                continue
            scale = 1.0 / max(o.nmse, NOISE_FLOOR)  # relative error: plans of every noise level count alike
            features.append(self._noise_features(o.int8) * scale)
            targets.append(o.nmse * scale)
        prior = self._default_noise_coef()
        lhs = NOISE_PRIOR_WEIGHT * np.eye(n + m)
        rhs = np.zeros(n + m)
        if features:
            f, y = np.array(features), np.array(targets)
            lhs = lhs + f.T @ f
            rhs = f.T @ (y - f @ prior)
        self.noise_coef = prior + np.linalg.solve(lhs, rhs)

    def _single_noise(self) -> np.ndarray:
        """Each mask entry's prior noise: per int8 layer, then (three states) per bf16 layer."""
        return self.layer_noise if self.states == 1 else np.concatenate([self.layer_noise, self.bf16_noise])

    def _default_noise_coef(self) -> np.ndarray:
        return np.concatenate([np.ones(len(self.layer_ids) * self.states), np.zeros(len(self.edges))])

    def noise(self, plan_or_mask) -> float:
        int8 = self.mask(plan_or_mask) if isinstance(plan_or_mask, Plan) else np.asarray(plan_or_mask, float)
        coef = self.noise_coef if self.noise_coef is not None else self._default_noise_coef()
        return max(float(self._noise_features(int8) @ coef), 0.0)

    def fidelity(self, plan_or_mask) -> float:
        """The metric the estimate expects: the measured noise → metric relation at the estimated noise, plus
        what the residual model learnt of plans like this one."""
        mask = self.mask(plan_or_mask) if isinstance(plan_or_mask, Plan) else np.asarray(plan_or_mask, float)
        return float(self.fidelity_with_error(mask[None, :])[0][0])

    def _additive_fidelity(self, masks: np.ndarray) -> np.ndarray:
        return self._metric_of_noise(np.array([self.noise(mask) for mask in masks]))

    def fidelity_with_error(self, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Expected metric of each mask (rows) and its standard error (None before the residual model is fitted).

        The additive noise model misses how layers interact (two quantized neighbours' errors can cancel or
        compound); a Gaussian process on the masks learns that from the measured plans' residuals and says
        where it does not know, which is what the proposals explore.
        """
        base = self._additive_fidelity(masks)
        if self._residual is None:
            return base, None
        mean, std = self._residual.predict(np.asarray(masks, dtype=np.float64), return_std=True)
        return base + mean, std

    def _fit_residual(self) -> None:
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

        self._residual = None
        scored = self._scored()
        if len(scored) < MIN_RESIDUAL_PLANS:
            return
        masks = np.array([o.int8 for o in scored])
        residual = np.array([o.fidelity for o in scored]) - self._additive_fidelity(masks)
        if not np.isfinite(residual).all():
            return
        spread = max(float(np.std(residual)), 1e-9)
        # Length scale in conv flips: a plan a few convs away from a measured one shares its residual.
        kernel = ConstantKernel(spread ** 2, (1e-6 * spread ** 2 + 1e-12, 1e3 * spread ** 2 + 1e-12)) \
            * RBF(length_scale=2.0, length_scale_bounds=(0.5, 50.0)) \
            + WhiteKernel(0.01 * spread ** 2 + 1e-12, (1e-8 * spread ** 2 + 1e-14, spread ** 2 + 1e-12))
        model = GaussianProcessRegressor(kernel, normalize_y=False, random_state=0, n_restarts_optimizer=2)
        with warnings.catch_warnings():  # a bound reached is fine: the fit stays usable
            warnings.simplefilter("ignore")
            model.fit(masks, residual)
        self._residual = model

    def _metric_of_noise(self, noise: np.ndarray) -> np.ndarray:
        from sklearn.isotonic import IsotonicRegression

        floor = np.maximum(noise, NOISE_FLOOR)
        if self.metric == "sqnr_db":  # by definition, on the same output
            return -10.0 * np.log10(floor)
        if self.metric == "nmse":
            return np.asarray(noise, dtype=np.float64)

        points = [(o.nmse, o.fidelity) for o in self._scored()]
        if len(points) < 2:
            return np.full(len(noise), math.nan)
        x = np.log10(np.maximum([p[0] for p in points], NOISE_FLOOR))
        y = np.array([p[1] for p in points])
        # More noise never makes a plan more faithful.
        model = IsotonicRegression(increasing=not self.higher_is_better, out_of_bounds="clip")
        model.fit(x, y)
        return model.predict(np.log10(np.maximum(noise, NOISE_FLOOR)))

    def goal_budget(self, goal: float | None) -> float | None:
        """The largest noise whose expected metric still meets ``goal``; while no measured mix meets it, half the
        least noisy mix's noise (None without a goal or a fit)."""
        if goal is None or len(self.observations) < 2:
            return None
        grid = np.geomspace(max(self._single_noise().min(), NOISE_FLOOR) / 10, max(self.noise(self.full()), NOISE_FLOOR) * 10, 400)
        metric = self._metric_of_noise(grid)
        meets = self._meets(metric, goal)
        if meets.any():
            return float(grid[meets].max())
        # No measured mix meets the goal, so the map fitted on them never reaches it (all-float's exact output is
        # left out of the map: it says nothing of noise).  Aim below the least noisy mix measured instead, and
        # each goal proposal that misses shrinks that further (goal_budget_scale).  Returning None here left such a
        # search without goal proposals: PP-LCNet's guided search over TPE made none in 24 plans (3 seeds), its
        # mixes at 0.85-0.97 top-1 against the goal's 0.99.
        mixed = [noise for noise in (self.noise(o.int8) for o in self._scored()) if noise > 0]
        return GOAL_SHRINK * min(mixed) if mixed else None

    # ---- the front of the estimate

    def _noise_terms(self) -> tuple[np.ndarray, np.ndarray]:
        """The noise per int8 layer (then per bf16 layer) and per int8 pair of neighbours, in nmse units."""
        n = len(self.layer_ids) * self.states
        coef = self.noise_coef if self.noise_coef is not None else self._default_noise_coef()
        pair_scale = np.array([math.sqrt(self.layer_noise[u] * self.layer_noise[v]) for u, v in self.edges])
        return coef[:n] * self._single_noise(), coef[n:] * pair_scale

    def solve(self, budget: float, excluded: Sequence[np.ndarray] = ()) -> np.ndarray | None:
        """The fastest mask (by the estimate) whose estimated noise is at most ``budget``; None if none is left.

        Variables: ``x`` (int8 per conv, binary), in a three-state space ``z``
        (bf16 per conv, binary, ``x_i + z_i <= 1``), ``b`` (a boundary per edge,
        ``b >= |x_u - x_v|``) and ``y`` (both ends of an edge int8,
        ``y = x_u x_v`` linearized), so the integer program is exact for the
        estimate.
        """
        from scipy.optimize import Bounds, LinearConstraint, milp

        if self.latency_coef is None:
            return None
        layers, m = len(self.layer_ids), len(self.edges)
        n = layers * self.states  # the binary variables: x, then z
        single, pair = self._noise_terms()
        size = n + 2 * m
        cost = np.concatenate([self.latency_coef[1:n + 1], np.full(m, self.latency_coef[-1]), np.zeros(m)])
        noise_row = np.concatenate([single, np.zeros(m), pair])
        # In units of the budget: HiGHS drops matrix entries below 1e-9 and its feasibility tolerance is 1e-7
        # absolute, so a budget of 1e-7 nmse (a bf16 layer's noise) read as infeasible even for all-float.
        scale = budget if budget > 0 else 1.0
        rows, low, high = [noise_row / scale], [-np.inf], [budget / scale]

        def add(entries: dict[int, float], lo: float, hi: float) -> None:
            row = np.zeros(size)
            for index, value in entries.items():
                row[index] += value
            rows.append(row)
            low.append(lo)
            high.append(hi)

        for e, (u, v) in enumerate(self.edges):
            add({n + e: 1.0, u: -1.0, v: 1.0}, 0.0, np.inf)  # b >= x_u - x_v
            add({n + e: 1.0, u: 1.0, v: -1.0}, 0.0, np.inf)  # b >= x_v - x_u
            y = n + m + e
            add({y: 1.0, u: -1.0}, -np.inf, 0.0)  # y <= x_u
            add({y: 1.0, v: -1.0}, -np.inf, 0.0)  # y <= x_v
            add({y: 1.0, u: -1.0, v: -1.0}, -1.0, np.inf)  # y >= x_u + x_v - 1
        for i in range(layers if self.states == 2 else 0):
            add({i: 1.0, layers + i: 1.0}, -np.inf, 1.0)  # int8 or bf16, not both
        for mask in excluded:  # "no-good" cuts: not this mask again
            add({i: (1.0 if q > 0.5 else -1.0) for i, q in enumerate(mask)}, -np.inf, float((mask > 0.5).sum()) - 1.0)
        result = milp(cost, constraints=LinearConstraint(np.array(rows), low, high),
                      integrality=np.concatenate([np.ones(n), np.zeros(2 * m)]), bounds=Bounds(0, 1),
                      options={"time_limit": 10.0})
        if result.x is None:
            return None
        return np.round(result.x[:n])

    def budgets(self, goal: float | None) -> list[float]:
        """Noise budgets to solve, the goal's first, then a sweep from the least noisy layer to all-int8."""
        total = self.noise(self.full())
        single, _ = self._noise_terms()
        low = max(float(single[single > 0].min()) if (single > 0).any() else NOISE_FLOOR, NOISE_FLOOR)
        sweep = list(np.geomspace(low, max(total, low), FRONT_BUDGETS)) if total > 0 else [0.0]
        target = self.goal_budget(goal)
        if target is None:
            return sweep
        # Nearest the goal first: that is where the plan a user ships lies.
        return [target] + sorted(sweep, key=lambda b: abs(math.log(max(b, NOISE_FLOOR)) - math.log(target)))

    def propose(self, goal: float | None, measured: Sequence[Plan], count: int = 1) -> list[Plan]:
        """Up to ``count`` new plans.

        Every :data:`GOAL_EVERY`-th call, the goal's budget comes first (the plan
        a user ships lies there).  Otherwise, and for the rest of ``count``,
        the candidate with the largest *expected* hypervolume gain over the
        measured front, the expectation taken over the estimate's own error
        (:meth:`error_scales`): a plan the estimate puts just behind the front
        may well be on it, and the estimate is least sure exactly there.  The
        candidates are the integer program's solutions over the budget sweep,
        every one-conv change of a measured front plan, and in a small space
        (at most :data:`EXHAUSTIVE_CANDIDATES` plans) every plan.
        """
        from precsearch.study.pareto import hypervolume_gain

        excluded = [self.mask(p) for p in measured if p.backend == self.backend]
        proposals: list[Plan] = []
        target = self.goal_budget(goal)
        # The search asks for one plan at a time, so "the goal's budget first" at every call made every proposal
        # the goal's (the expected-gain scoring below never ran on a study with a goal), and the front away from
        # the goal was left to the sampler: on the tiny model with its 45 dB goal, 0.887 of the exhaustive
        # hypervolume at 26 plans (mean of 10 seeds); the goal's budget every 2nd call: 0.945, every 3rd: 0.956,
        # never: 0.969 (5 seeds), while the fastest plan at the goal came out 0.752 / 0.746 / 0.746 / 0.824 ms.
        # Every 2nd keeps half the proposals on the plan a user ships.
        goal_turn = self.propose_calls % GOAL_EVERY == 0
        self.propose_calls += 1
        if target is not None and goal_turn:
            mask = self.solve(target * self.goal_budget_scale(goal), excluded)
            # The turn is worth a trial only if its plan may beat the fastest plan measured at the goal: on PP-LCNet
            # on Zen 4 every mix near the goal measured slower than all-float (2.1-3.5 ms against 1.81), and goal
            # proposals the estimate already expected slower (2.0-2.6 ms) took half the proposals off the front.
            if mask is not None and self.latency_ms(mask) >= self._fastest_at_goal_ms(goal):
                mask = None
            if mask is not None:
                excluded.append(mask)
                self.goal_proposals.append(tuple(mask))
                proposals.append(self.plan(mask))
        points = [(o.latency_ms, o.fidelity) for o in self.observations if math.isfinite(o.fidelity)]
        budgets = self.budgets(goal)
        while len(proposals) < count:
            candidates = self._candidates(budgets, excluded)
            if not candidates:
                break
            masks = np.array(list(candidates.values()))
            latency = np.array([self.latency_ms(mask) for mask in masks])
            fidelity, fidelity_error = self.fidelity_with_error(masks)
            usable = bool(points) and np.isfinite(latency).all() and np.isfinite(fidelity).all()
            if usable:
                latency_sigma, fidelity_sigma = self.error_scales()
                if fidelity_error is not None:
                    fidelity_sigma = np.maximum(fidelity_error, MIN_FIDELITY_ERROR * self._spread())[:, None]
                draws = _normal_draws()
                every_latency = np.concatenate([[p[0] for p in points], latency * (1 + 3 * latency_sigma)])
                every_fidelity = np.concatenate([[p[1] for p in points], fidelity + 3 * np.ravel(fidelity_sigma) * (
                    -1 if self.higher_is_better else 1)])
                worst = (float(every_latency.max()) * 1.1,
                         float(every_fidelity.min() if self.higher_is_better else every_fidelity.max()))
                drawn_latency = (latency[:, None] * (1 + latency_sigma * draws[None, :, 0])).reshape(-1)
                drawn_fidelity = (fidelity[:, None] + fidelity_sigma * draws[None, :, 1]).reshape(-1)
                gain = hypervolume_gain(points, drawn_latency, drawn_fidelity, worst,
                                        higher_is_better=self.higher_is_better).reshape(len(masks), -1).mean(axis=1)
                best = int(np.argmax(gain))
            else:
                best = 0
            excluded.append(masks[best])
            points.append((float(latency[best]), float(fidelity[best])))
            proposals.append(self.plan(masks[best]))
        return proposals

    def _fastest_at_goal_ms(self, goal: float) -> float:
        met = [o.latency_ms for o in self.observations if math.isfinite(o.fidelity) and self._meets(o.fidelity, goal)]
        return min(met, default=math.inf)

    def _meets(self, metric, goal: float):
        """Whether ``metric`` (a number or an array) meets ``goal`` in this estimate's direction."""
        return metric >= goal if self.higher_is_better else metric <= goal

    def goal_budget_scale(self, goal: float) -> float:
        """The factor on the goal's noise budget, from the goal proposals measured so far, in order: each one
        that missed the goal multiplies it by :data:`GOAL_SHRINK`, each one that met it by :data:`GOAL_GROW`
        (at most :data:`GOAL_SCALE_MAX`).

        The integer program at the goal's budget picks the plans whose noise the additive estimate
        underestimates most: on the tiny model with its 45 dB goal most goal proposals measured 41-43 dB, and
        where the metric is top-1 agreement the map from noise is fitted on plans that mostly miss the goal.
        A miss says the budget is too loose for the plans the integer program finds there; a hit, that a
        looser one may hold a faster plan.  With these factors about two goal proposals in three meet the goal
        once the scale has settled.
        """
        measured = {tuple(o.int8): o.fidelity for o in self.observations if math.isfinite(o.fidelity)}
        scale = 1.0
        for key in self.goal_proposals:
            if key not in measured:
                continue
            scale = min(scale * GOAL_GROW, GOAL_SCALE_MAX) if self._meets(measured[key], goal) else scale * GOAL_SHRINK
        return scale

    def _candidates(self, budgets: Sequence[float], excluded: Sequence[np.ndarray]) -> dict[tuple, np.ndarray]:
        """Unmeasured masks to choose a proposal from (see :meth:`propose`)."""
        seen = {tuple(np.round(mask)) for mask in excluded}
        layers = len(self.layer_ids)
        candidates: dict[tuple, np.ndarray] = {}

        def add(mask: np.ndarray) -> None:
            key = tuple(np.round(mask))
            if key not in seen and key not in candidates:
                candidates[key] = np.asarray(key, dtype=np.float64)

        def with_state(mask: np.ndarray, i: int, state: int) -> np.ndarray:
            """``mask`` with conv ``i`` float (state 0), int8 (1) or bf16 (2)."""
            changed = mask.copy()
            changed[i::layers] = 0.0
            if state:
                changed[(state - 1) * layers + i] = 1.0
            return changed

        # Every other proposal is a local step, a one-conv change of a measured front plan: on the tiny chain
        # model the estimate's front and the true one part by single convs (neighbours' errors cancel or
        # compound), and the local steps find those points (0.957 → 0.971 of the exhaustive hypervolume at 26
        # plans, mean of 5 seeds).  With no unmeasured neighbour left it is a global step.  The draws alternate,
        # not the parity of the measured plans: with one sampler trial between proposals that parity is the same
        # at every proposal, so every step was local (3 seeds) or every one global (4); alternating: 0.975.
        def add_front_neighbours() -> None:
            for mask in self._measured_front():
                for i in range(layers):
                    for state in range(self.states + 1):
                        add(with_state(mask, i, state))

        self.candidate_draws += 1
        if self.candidate_draws % 2 == 1:
            add_front_neighbours()
            if candidates:
                return candidates
        for budget in budgets:
            mask = self.solve(budget, excluded)
            if mask is not None:
                add(mask)
        if (self.states + 1) ** layers <= EXHAUSTIVE_CANDIDATES:
            for choice in itertools.product(range(self.states + 1), repeat=layers):
                mask = np.zeros(layers * self.states)
                for i, state in enumerate(choice):
                    mask = with_state(mask, i, state)
                add(mask)
        else:
            add_front_neighbours()
        return candidates

    def _measured_front(self) -> list[np.ndarray]:
        """The masks of the measured plans no other measured plan dominates."""
        from precsearch.study.pareto import _non_dominated

        scored = [o for o in self.observations if math.isfinite(o.fidelity)]
        if not scored:
            return []
        sign = -1.0 if self.higher_is_better else 1.0
        losses = np.array([[o.latency_ms, sign * o.fidelity] for o in scored])
        return [o.int8 for o, keep in zip(scored, _non_dominated(losses)) if keep]

    def error_scales(self) -> tuple[float, float]:
        """How far the estimate may be off: relative latency and absolute metric, from its residuals on the
        measured plans (root mean square, widened for the parameters the fit spent), at least
        :data:`MIN_LATENCY_ERROR` and :data:`MIN_FIDELITY_ERROR` of the measured metric's spread."""
        latency = [(self.latency_ms(o.int8) - o.latency_ms) / o.latency_ms for o in self.observations
                   if o.latency_ms > 0]
        scored = self._scored()
        fidelity = (self.fidelity_with_error(np.array([o.int8 for o in scored]))[0]
                    - np.array([o.fidelity for o in scored])) if scored else []
        spread = self._spread()
        # In-sample residuals of a fit with about as many parameters as plans understate its error on new plans.
        widen = math.sqrt(1.0 + len(self.layer_ids) * self.states / max(len(self.observations), 1))
        latency_sigma = max(float(np.sqrt(np.mean(np.square(latency)))) * widen if latency else 0.0,
                            MIN_LATENCY_ERROR)
        fidelity_sigma = max(float(np.sqrt(np.mean(np.square(fidelity)))) * widen if len(fidelity) else 0.0,
                             MIN_FIDELITY_ERROR * spread)
        return latency_sigma, fidelity_sigma

    def _spread(self) -> float:
        scored = self._scored()
        return float(np.ptp([o.fidelity for o in scored])) if len(scored) > 1 else 0.0

    def _scored(self) -> list[Observation]:
        """Measured plans with a finite metric: an exact plan's +inf SQNR (stored clipped to 1e6) says nothing."""
        from precsearch.study.pareto import FINITE_LIMIT

        return [o for o in self.observations if o.int8.sum() > 0 and math.isfinite(o.fidelity)
                and abs(o.fidelity) < FINITE_LIMIT]

    def errors(self) -> dict[str, float]:
        """In-sample fit error on the measured plans: mean |relative latency error| and |metric error|."""
        if self.latency_coef is None or not self.observations:
            return {}
        latency = [abs(self.latency_ms(o.int8) - o.latency_ms) / o.latency_ms for o in self.observations
                   if o.latency_ms > 0]
        fidelity = [abs(self.fidelity(o.int8) - o.fidelity) for o in self._scored()]
        return {"latency_rel_error": float(np.mean(latency)) if latency else math.nan,
                "fidelity_abs_error": float(np.mean(fidelity)) if fidelity else math.nan,
                "plans": len(self.observations)}


# --------------------------------------------------------------------------- in a search

GUIDED_SEED = "guided"  # the ``seed`` attribute of a proposed trial
GOAL_PROPOSAL, FRONT_PROPOSAL = "goal", "front"  # its ``proposal_kind``


class Proposal(NamedTuple):
    """A plan the estimate proposes, what it expects of it, and which turn it was."""

    plan: Plan
    latency_ms: float
    fidelity: float
    kind: str  # GOAL_PROPOSAL or FRONT_PROPOSAL


class GuidedProposals:
    """One :class:`PlanEstimate` per backend of a study, and its proposals queued between the sampler's trials.

    After every finished trial the estimates are refitted on the measured
    plans; when the study's queue is empty and the proposals have not had
    their share (every other trial by default), the next plan of the
    estimate's front is queued with ``study.enqueue_trial``, so the study stays
    a plain Optuna study whose sampler also learns from the proposals.
    """

    def __init__(self, model: LoadedModel, layer_noise: dict[str, float], *, backends: Sequence[str],
                 higher_is_better: bool, metric: str | None = None, share: float = 0.5,
                 bf16_noise: dict[str, float] | None = None):
        ids = model.capable_ids()
        edges = conv_edges(model)
        macs = [model.layer(i).macs for i in ids]
        noise = [layer_noise.get(i, NOISE_FLOOR) for i in ids]
        # bf16 is TVM's alone (ONNX Runtime's quantizer has no bf16 convs)
        bf16 = [bf16_noise.get(i, NOISE_FLOOR) for i in ids] if bf16_noise is not None else None
        self.estimates = {b: PlanEstimate(ids, macs, noise, edges, higher_is_better, b, metric,
                                          bf16_noise=bf16 if b == "tvm" else None) for b in backends}
        self.share = share
        self._proposed: dict[str, int] = {}

    def refit(self, records: Sequence) -> None:
        """Refit every backend's estimate on completed trials: ``(TrialRecord, latency_ms, fidelity)`` tuples."""
        for backend, estimate in self.estimates.items():
            seen, observations = set(), []
            for record, latency_ms, fidelity in records:
                if record.backend != backend or record.plan_key in seen or record.result is None:
                    continue
                seen.add(record.plan_key)
                observations.append(Observation(estimate.mask(record.plan), latency_ms, fidelity,
                                                record.metrics.get("nmse", math.nan)))
            estimate.observe(observations)
            # From the study, not this process's memory: a resumed run or another worker's goal proposals count.
            estimate.goal_proposals = [tuple(estimate.mask(record.plan)) for record, _, _ in records
                                       if record.backend == backend and record.proposal_kind == GOAL_PROPOSAL
                                       and record.plan_key is not None]

    def due(self, records: Sequence) -> bool:
        """Whether the proposals are behind their share of the sampler's trials (``TrialRecord``s of the study)."""
        guided = sum(1 for r in records if r.seed == GUIDED_SEED)
        sampled = sum(1 for r in records if r.seed is None and r.plan_key is not None)
        if self.share >= 1:
            return True
        return guided <= self.share / (1 - self.share) * sampled

    def next_plan(self, goal: float | None, known: Sequence[Plan]) -> Proposal | None:
        """The next proposal, from the backend proposed least."""
        for backend in sorted(self.estimates, key=lambda b: self._proposed.get(b, 0)):
            estimate = self.estimates[backend]
            plans = estimate.propose(goal, known, count=1)
            if plans:
                self._proposed[backend] = self._proposed.get(backend, 0) + 1
                plan = plans[0]
                at_goal = bool(estimate.goal_proposals) and estimate.goal_proposals[-1] == tuple(estimate.mask(plan))
                return Proposal(plan, estimate.latency_ms(plan), estimate.fidelity(plan),
                                GOAL_PROPOSAL if at_goal else FRONT_PROPOSAL)
        return None

    def errors(self) -> dict[str, dict]:
        errors = {backend: estimate.errors() for backend, estimate in self.estimates.items()}
        return {backend: error for backend, error in errors.items() if error}
