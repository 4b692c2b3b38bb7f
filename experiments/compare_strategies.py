"""Strategies compared honestly: the guided search, four Optuna samplers and two rankings, over seeds, at equal budgets.

One command per model re-creates ``results/<model>/strategies/`` (``results/tiny-8conv/strategies/`` for the tiny
model); each resumes from its ``--workdir`` if it is killed:

    python experiments/compare_strategies.py tiny-8conv                  # 5 seeds, 16/26/48 of 256 plans, minutes
    python experiments/compare_strategies.py tiny-8conv --no-study-goal  # the same searches without the goal
    nice -n 15 python experiments/compare_strategies.py pplcnet-orientation --seeds 0 1 2 --budgets 16 24 --jobs 2
    nice -n 15 python experiments/compare_strategies.py mobilenetv3-textcls --seeds 0 1 2 --budgets 16 24 --jobs 2
    nice -n 15 python experiments/compare_strategies.py efficientnet-lite0=PATH --seeds 0 1 2 --budgets 16 24 --jobs 2
    nice -n 15 python experiments/compare_strategies.py ddddocr-det --seeds 0 1 2 --budgets 16 --jobs 2  # SQNR >= 25 dB

(``gp`` needs PyTorch: ``pip install torch``, the CPU build is enough; without it ``--strategies`` leaves it out.)

Strategies, each run once per seed with the largest budget; its curve gives every smaller budget:

- ``guided``: the tool's default search where PyTorch is not installed (``precsearch search``): multivariate TPE
  with the guided estimate's proposals every other trial (:class:`precsearch.study.guided.GuidedProposals`, prior from each conv's noise
  alone, measured once with ONNX Runtime as the search measures it; on the tiny model, where 256 plans would make
  ``exhaustive`` the default sampler, with TPE, as ``tests/test_search.py`` runs it);
- ``guided-gp``: the same proposals between Gaussian-process trials (``precsearch search --sampler gp``, the
  default where PyTorch is installed);
- ``tpe``, ``nsga2``, ``gp``, ``random``: ``precsearch search --no-guided --sampler S`` (the tool's own sampler
  settings: TPE multivariate with 10 startup trials, NSGA-II population 16);
- ``greedy-revert`` (deterministic, one run): NNCF accuracy control's scheme. Start all-int8, rank the convs by the
  fidelity gained when only that conv returns to float, return them to float in that order until the goal is met;
- ``sensitivity-topk`` (deterministic, one run): the k convs that hurt most alone in int8 stay float, k = 0, 1, ...

The five Optuna strategies start from the search's three seed plans (all int8, all float, first and last conv
float) and count distinct plans, as the search does.  Real models: every plan is built untuned with TVM (oneDNN
convs) and timed exactly as ``precsearch search --untuned`` does, two-state (int8/float, ``--bf16 off``) unless
``--bf16 auto``; a plan measured once is stored in ``<workdir>/plan-cache/`` and reused by every strategy and seed,
so the same plan has the same number everywhere.  Each plan is timed only once the machine is quiet (processes
other than this experiment's keep fewer than ``--quiet-below`` cores busy, waiting at most ``--quiet-wait``; every
measurement's wait and load in ``<workdir>/timing-gate.jsonl``): on a shared machine a niced measurement taken
under load is mostly the other processes' load.  ``--jobs 2`` runs the strategy runs in two processes that compile
side by side and take turns to time (precsearch's CPU lock).  The tiny model (``tests/models.py``'s 8-conv chain, as
``tests/test_search.py`` builds it) has real ONNX Runtime fidelity (SQNR) and ``tests/standin.py``'s deterministic
latency, so all 256 plans are evaluated and the exhaustive front is known.

Hypervolume of (latency, fidelity) with one reference point per model: the worst latency and the worst fidelity of
every plan measured by any strategy (real models) or of all 256 plans (tiny model).  It is normalized by the
hypervolume of the best front: the non-dominated set of every plan any strategy measured (real models; an upper
bound on what each strategy reached, not the true front) or the exhaustive front (tiny model).

The goal: top-1 agreement >= 1 - ``--max-drop`` (0.99) on the classifiers; on the detector, whose outputs have no
top-1, an output SQNR >= ``--goal`` (25 dB, the headline's).  "Fastest at the goal": the fastest plan meeting the fidelity goal among every plan measured (exhaustive for the
tiny model); per run, the trials it took to measure that very plan (and to come within 5 % of its latency).

Writes ``<out>/`` (default ``results/<model>/strategies/``, ``.../strategies-three-state/`` with ``--bf16 auto``):
``summary.csv`` (strategy, budget, runs; mean, min, max of the normalized hypervolume; the fastest plan at the goal
found, and the trials until it was found), ``curves.csv`` (every run, every trial count), ``steps.csv`` (every
run's plans in order), ``hypervolume.png`` (mean and min-max band against trials) and ``summary.json`` (the
reference point, the best front, settings, wall time, CPU).  ``--analyze-only`` rewrites them from the workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
TINY = "tiny-8conv"
SAMPLED = ("guided", "tpe", "nsga2", "gp", "random", "guided-gp")
RANKED = ("greedy-revert", "sensitivity-topk")
STRATEGIES = SAMPLED + RANKED
REAL_MODELS = ("pplcnet-orientation", "mobilenetv3-textcls", "ddddocr-det")
DETECTOR_GOAL_DB = 25.0  # experiments/headline.py's goal for ddddocr-det
TINY_GOAL_DB = 45.0  # 30 of the tiny model's 256 plans meet it
WITHIN = 0.05  # "close to the fastest plan at the goal": within 5 % of its latency

logger = logging.getLogger("compare_strategies")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------- plans measured once


class CachingEvaluator:
    """A TvmEvaluator that measures each plan once across strategies and seeds (one JSON file per plan)."""

    def __init__(self, evaluator, cache_dir: Path):
        self.evaluator = evaluator
        self.cache_dir = cache_dir
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.fresh = 0

    @property
    def workspace(self):
        return self.evaluator.workspace

    def _path(self, key: str) -> Path:
        return self.cache_dir / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".json")

    def lookup(self, key: str):
        from precsearch.study.record import PlanResult

        path = self._path(key)
        if not path.is_file():
            return None
        payload = json.loads(path.read_text())
        if "error" in payload:
            return payload["error"]
        return PlanResult(**{k: v for k, v in payload.items() if k != "plan"})

    def _store(self, key: str, payload: dict) -> None:
        path = self._path(key)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"plan": key, **payload}))
        tmp.replace(path)

    def evaluate(self, plan):
        import fcntl

        # One process measures a plan; another that wants it meanwhile waits and reads the stored result.
        with open(self._path(plan.key()).with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._evaluate(plan)

    def _evaluate(self, plan):
        from precsearch.errors import CompileError
        from precsearch.study.record import PlanRejected

        cached = self.lookup(plan.key())
        if isinstance(cached, str):
            raise CompileError(cached)  # failed once: fails the same way for every strategy, without a rebuild
        if cached is not None:
            if cached.verdict == "compiler problem":
                raise PlanRejected(cached)
            return cached
        started = time.perf_counter()
        try:
            result = self.evaluator.evaluate(plan)
        except PlanRejected as exc:
            self._store(plan.key(), dataclasses.asdict(exc.result))
            raise
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a build that fails: recorded once, the same failure for everyone
            from precsearch.errors import first_line

            self._store(plan.key(), {"error": first_line(exc, with_type=True)})
            raise
        self.fresh += 1
        self._store(plan.key(), dataclasses.asdict(result))
        logger.info("measured plan %d of this process in %.1f s: %d float, %.3f ms", self.fresh,
                    time.perf_counter() - started, len(plan.float_ids), result.latency_ms)
        return result

    def measure_baselines(self):
        return None  # measured once per workdir by the experiment itself (baselines.json)

    def remeasure(self, plan, repeats: int):
        return None

    def remeasure_baselines(self, repeats: int):
        return None


# --------------------------------------------------------------------------- timing on a shared machine


def _own_pids() -> set[int]:
    """This experiment's processes: the parent of --jobs processes, its children, this one."""
    import psutil

    parent = os.getppid() if "--job" in sys.argv else os.getpid()
    try:
        children = {child.pid for child in psutil.Process(parent).children()}
    except psutil.Error:
        children = set()
    return {os.getpid(), parent} | children


def _busy_cores(window_s: float = 1.0, pids=None) -> float:
    """Cores kept busy over ``window_s`` by processes other than ``pids`` (default: this experiment's)."""
    from precsearch.measure import CpuLoad

    load = CpuLoad(_own_pids() if pids is None else pids)
    time.sleep(window_s)
    return load.others_busy_cores()


# A timing whose interquartile range exceeds this share of its median is taken again (at most this many times).
WIDE_IQR_SHARE = 0.25
MAX_SPREAD_RETIMES = 2


def install_quiet_gate(log_path: Path, max_busy_cores: float, max_wait_s: float) -> None:
    """Time a plan only once the machine is quiet: wraps ``TvmEvaluator._time`` (the search's timing step).

    The search times each plan holding precsearch's CPU lock exclusively (no precsearch build or measurement
    runs then), but processes outside precsearch still take the cores, and this experiment runs under
    ``nice``, so a measurement taken while they run is mostly their load (PP-LCNet plans timed at 7-11 ms
    against 1.2-2 ms on a quiet machine in this session).  Before taking the lock, each measurement waits until
    processes other than this experiment's keep fewer than ``max_busy_cores`` cores busy (1 s windows), then
    checks again holding the lock, at most ``max_wait_s`` in all; a measurement during which any other process,
    the sibling jobs included, kept that many cores busy is taken again, and so is one whose runs spread wider
    than :data:`WIDE_IQR_SHARE` of their median (at most :data:`MAX_SPREAD_RETIMES` times).  Every measurement's
    wait, load and spread go to ``log_path`` (JSON lines; ``quiet`` false: timed after the wait ran out).
    """
    from precsearch.measure import CpuLoad
    from precsearch.study.evaluator import TvmEvaluator
    from precsearch.tvm import measure_library

    def timed(self, built, repeats):
        started = time.perf_counter()
        busy = _busy_cores()
        retimed = spread_retimes = 0
        while True:
            while busy >= max_busy_cores and time.perf_counter() - started < max_wait_s:
                busy = _busy_cores()
            with self.lock.exclusive():
                busy = _busy_cores(0.5, {os.getpid()})  # the sibling jobs too: the lock does not stop their samplers
                if busy < max_busy_cores or time.perf_counter() - started >= max_wait_s:
                    # The lock keeps the sibling job from building, not from its sampler (a GP fit, the guided
                    # estimate's refit) or the rankings' ONNX Runtime runs: a timing they overlapped is taken
                    # again (EfficientNet-Lite0 plans read 8-162 ms against 2-5 before this check).
                    during = CpuLoad({os.getpid()})
                    latency = measure_library(built, self.workspace.timing_input, threads=self.options.threads,
                                              warmup=self.warmup, repeats=repeats)
                    busy_during = during.others_busy_cores()
                    wide = latency.iqr_ms > WIDE_IQR_SHARE * latency.median_ms
                    if wide and spread_retimes < MAX_SPREAD_RETIMES:
                        # A quiet gate that ran out, or a burst the load check missed, leaves a timing whose
                        # runs disagree: one such plan (EfficientNet-Lite0, only the stem float, 6.75 ms with an
                        # IQR of 105 ms) misled the guided estimate's latency fit and set the hypervolume's
                        # reference latency.  Take it again, on a fresh wait for quiet.
                        spread_retimes += 1
                        retimed += 1
                        started, busy = time.perf_counter(), busy_during
                        continue
                    if busy_during < max_busy_cores or time.perf_counter() - started >= max_wait_s:
                        break
                    retimed += 1
                    busy = busy_during
        with open(log_path, "a") as log:
            log.write(json.dumps({"time": time.time(), "pid": os.getpid(),
                                  "waited_s": round(time.perf_counter() - started, 1),
                                  "busy_cores_before": round(busy, 2), "busy_cores_during": round(busy_during, 2),
                                  "retimed": retimed, "quiet": busy < max_busy_cores and busy_during < max_busy_cores,
                                  "median_ms": latency.median_ms, "iqr_ms": latency.iqr_ms}) + "\n")
        return latency

    TvmEvaluator._time = timed


# --------------------------------------------------------------------------- the two kinds of model


@dataclasses.dataclass
class Context:
    name: str
    model: object
    config: object  # SearchConfig, resolved
    evaluator: object
    metric: str
    goal: float | None
    noise: dict
    workdir: Path
    precisions: tuple
    rankings: object  # () -> {strategy: conv ids in order}, computed when first asked
    universe: dict | None = None  # tiny: every plan's (latency, fidelity)


def tiny_context(args, workdir: Path) -> Context:
    sys.path.insert(0, str(ROOT / "tests"))
    import models  # tests/models.py
    from standin import StandInEvaluator  # tests/standin.py

    from precsearch.fidelity.reference import run_ort
    from precsearch.model import load_model
    from precsearch.model.data import image_batches
    from precsearch.model.plan import Plan
    from precsearch.model.quantize import calibrate
    from precsearch.study.config import SearchConfig, resolve_settings
    from precsearch.study.pareto import finite_objective
    from precsearch.study.search import TWO_STATES

    workdir.mkdir(parents=True, exist_ok=True)
    # Exactly tests/test_search.py's eight_convs fixture.
    path = models.save(models.chain_model(channels=(8, 16, 16, 16, 16, 16, 16, 16, 16), size=8, seed=11),
                       workdir, "eight")
    model = load_model(path)
    ranges = calibrate(model, image_batches(model, None, 8))
    batches = image_batches(model, None, 8, offset=8)
    evaluator = StandInEvaluator(model, ranges, batches, run_ort(model.proto, batches))
    metric = "sqnr_db"
    ids = list(model.capable_ids())
    every = frozenset(ids)
    universe = {}
    for r in range(len(ids) + 1):
        for chosen in itertools.combinations(ids, r):
            plan = Plan(frozenset(chosen))
            # clipped as the search clips its objectives (all-float's SQNR is +inf)
            universe[plan.key()] = (evaluator.latency_ms(plan), finite_objective(evaluator.fidelity(plan)[metric]))
    noise = {i: evaluator.fidelity(Plan(every - {i}))["nmse"] for i in ids}  # as the test's _standin_noise
    only_int8 = {i: evaluator.fidelity(Plan(every - {i}))[metric] for i in ids}
    only_float = {i: evaluator.fidelity(Plan(frozenset({i})))[metric] for i in ids}
    rankings = {"greedy-revert": sorted(ids, key=lambda i: (-only_float[i], ids.index(i))),
                "sensitivity-topk": sorted(ids, key=lambda i: (only_int8[i], ids.index(i)))}
    # --no-study-goal: the studies run without a goal, as tests/test_search.py's do (the goal still picks the
    # fastest plan at the goal afterwards)
    goal = TINY_GOAL_DB if args.goal is None else args.goal
    config = resolve_settings(model, SearchConfig(model=str(model.source), metric=metric,
                                                  goal=None if args.no_study_goal else goal))
    return Context(TINY, model, config, evaluator, metric, goal, noise, workdir, TWO_STATES, lambda: rankings,
                   universe)


def real_context(args, workdir: Path) -> Context:
    from precsearch.fidelity.metrics import default_metric
    from precsearch.jobs.search import search_precisions
    from precsearch.model import open_model
    from precsearch.study.config import SearchConfig, resolve_settings
    from precsearch.study.evaluator import TvmEvaluator
    from precsearch.study.sensitivity import layer_noise, run_sensitivity, to_frame

    workdir.mkdir(parents=True, exist_ok=True)
    model, preset = open_model(args.model_path)
    # A detector's outputs have no top-1 to hold at 1 - max_drop: its goal is an output SQNR, as in the headline.
    top1 = default_metric(model.output_shapes) == "top1"
    config = resolve_settings(model, SearchConfig(model=args.model_path, untuned=True, bf16=args.bf16,
                                                  **({"max_drop": args.max_drop} if top1 else
                                                     {"goal": DETECTOR_GOAL_DB if args.goal is None else args.goal})))
    metric = config.metric
    tvm = TvmEvaluator.from_config(config, model, workdir, preset, metric)
    install_quiet_gate(workdir / "timing-gate.jsonl", args.quiet_below, args.quiet_wait)
    evaluator = CachingEvaluator(tvm, workdir / "plan-cache")
    # The guided estimate's prior, as the search measures it without a sensitivity table (one ORT run per conv).
    noise_path = workdir / "layer-noise.json"
    if not noise_path.is_file():
        noise_path.write_text(json.dumps(layer_noise(tvm.workspace)))
    noise = json.loads(noise_path.read_text())

    def rankings() -> dict:
        # `precsearch sensitivity --no-latency`'s table (ONNX Runtime only), kept out of the workdir's top level
        # so that the search's seeds stay the three a fresh workdir gets.
        table = workdir / "rankings" / "sensitivity.csv"
        if not table.is_file():
            table.parent.mkdir(exist_ok=True)
            started = time.perf_counter()
            to_frame(run_sensitivity(tvm.workspace, measure_latency=False), metric).to_csv(table, index=False)
            logger.info("sensitivity (ONNX Runtime) in %.1f min", (time.perf_counter() - started) / 60)
        frame = pd.read_csv(table)
        keys = [metric, "sqnr_db"] if metric != "sqnr_db" else [metric]
        greedy = frame.sort_values([f"only_float.{k}" for k in keys] + ["index"],
                                   ascending=[False] * len(keys) + [True])
        return {"greedy-revert": list(greedy["id"]), "sensitivity-topk": list(frame["id"])}

    return Context(args.model, model, config, evaluator, metric, config.fidelity_goal(metric), noise, workdir,
                   search_precisions(config), rankings)


# --------------------------------------------------------------------------- one run


def run_sampled(ctx: Context, strategy: str, seed: int, budget: int) -> None:
    """One Optuna study of ``budget`` distinct plans in ``<workdir>/studies/<strategy>-seed<seed>.db`` (resumes)."""
    from precsearch.study.guided import GuidedProposals
    from precsearch.study.search import open_study, run_worker, seed_plans
    from precsearch.study.storage import open_storage

    folder = ctx.workdir / "studies"
    folder.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{folder / f'{strategy}-seed{seed}.db'}"
    guided = strategy.startswith("guided")
    sampler = {"guided": "tpe", "guided-gp": "gp"}.get(strategy, strategy)
    config = ctx.config.replace(sampler=sampler, seed=seed, trials=budget, guided=guided)
    storage = open_storage(url, heartbeat_interval_s=config.heartbeat_interval_s,
                           grace_period_s=config.grace_period_s, max_retry=config.max_retry)
    handle = open_study(config, ctx.model, storage, url, f"{strategy}-seed{seed}", ctx.metric,
                        precisions=ctx.precisions)
    guide = GuidedProposals(ctx.model, ctx.noise, backends=config.backends, higher_is_better=handle.higher_is_better,
                            metric=ctx.metric) if guided else None
    started = time.perf_counter()
    summary = run_worker(handle, ctx.model, ctx.evaluator, seeds=seed_plans(ctx.model, precisions=handle.precisions),
                         guide=guide)
    logger.info("%s seed %d: %d plans (%d failed) in %.1f min", strategy, seed, summary.completed, summary.failed,
                (time.perf_counter() - started) / 60)


def run_ranked(ctx: Context, strategy: str, budget: int) -> None:
    """Return convs to float in the ranking's order, one plan per step; greedy-revert stops at the goal."""
    from precsearch.model.plan import Plan

    ranking = ctx.rankings()[strategy]
    rows = []
    for step in range(min(budget, len(ranking) + 1)):
        plan = Plan(frozenset(ranking[:step]))
        row = {"plan": plan.key(), "latency_ms": None, "fidelity": None, "failed": None}
        try:
            result = ctx.evaluator.evaluate(plan)
            row.update(latency_ms=result.latency_ms, fidelity=result.metrics[ctx.metric])
        except Exception as exc:  # noqa: BLE001 - one failing plan is a spent step, as in the search
            row["failed"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        rows.append(row)
        if strategy == "greedy-revert" and ctx.goal is not None and row["fidelity"] is not None \
                and row["fidelity"] >= ctx.goal:
            break
    folder = ctx.workdir / "ranked"
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / f"{strategy}.csv", index=False)


# --------------------------------------------------------------------------- reading the runs back


def sampled_steps(ctx: Context, strategy: str, seed: int) -> pd.DataFrame | None:
    """The run's distinct plans in trial order: plan, latency, fidelity (None when the plan failed)."""
    import optuna
    from optuna.trial import TrialState

    from precsearch.study.record import TrialRecord
    from precsearch.study.search import INTERRUPTED
    from precsearch.study.storage import open_storage

    path = ctx.workdir / "studies" / f"{strategy}-seed{seed}.db"
    if not path.is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=f"{strategy}-seed{seed}", storage=open_storage(f"sqlite:///{path}"))
    seen, rows = set(), []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        record = TrialRecord.from_trial(trial)
        key = record.plan_key
        if key is None or key in seen or record.duplicate_of is not None:
            continue
        if trial.state == TrialState.COMPLETE:
            rows.append({"plan": key, "latency_ms": trial.values[0], "fidelity": trial.values[1], "failed": None,
                         "seed_plan": record.seed})
        elif trial.state == TrialState.FAIL and record.fail_reason not in (None, INTERRUPTED):
            rows.append({"plan": key, "latency_ms": None, "fidelity": None, "failed": record.fail_reason,
                         "seed_plan": record.seed})
        else:
            continue
        seen.add(key)
    return pd.DataFrame(rows)


def collect_steps(ctx: Context, strategies, seeds) -> pd.DataFrame:
    frames = []
    for strategy in strategies:
        if strategy in RANKED:
            path = ctx.workdir / "ranked" / f"{strategy}.csv"
            runs = [(None, pd.read_csv(path))] if path.is_file() else []
        else:
            runs = [(seed, sampled_steps(ctx, strategy, seed)) for seed in seeds]
        for seed, frame in runs:
            if frame is None or frame.empty:
                continue
            frame = frame.copy()
            frame.insert(0, "trial", range(1, len(frame) + 1))
            frame.insert(0, "seed", -1 if seed is None else seed)
            frame.insert(0, "strategy", strategy)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def non_dominated(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Latency minimized, fidelity maximized."""
    return sorted({p for p in points if not any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in points)})


def analyze(ctx: Context, steps: pd.DataFrame, budgets: list[int], out: Path, meta: dict) -> pd.DataFrame:
    from precsearch.study.pareto import hypervolume

    measured = steps.dropna(subset=["latency_ms", "fidelity"])
    if ctx.universe is not None:  # the tiny model: every plan is known
        values = dict(ctx.universe)
        best_label = "exhaustive front (256 plans)"
    else:
        values = {row.plan: (float(row.latency_ms), float(row.fidelity)) for row in measured.itertuples()}
        best_label = f"front of every plan measured by any strategy ({len(values)} plans)"
    reference = (max(v[0] for v in values.values()), min(v[1] for v in values.values()))
    best_front = non_dominated(list(values.values()))
    best_hv = hypervolume(best_front, reference)
    feasible = {k: v for k, v in values.items() if ctx.goal is None or v[1] >= ctx.goal}
    target_key = min(feasible, key=lambda k: feasible[k][0]) if feasible else None
    target_ms = feasible[target_key][0] if target_key else math.nan
    horizon = max(budgets)
    curves = []
    for (strategy, seed), run in steps.groupby(["strategy", "seed"], sort=False):
        run = run.sort_values("trial")
        points, fastest, found, close = [], math.inf, None, None
        for t in range(1, horizon + 1):
            if t <= len(run):
                row = run.iloc[t - 1]
                if pd.notna(row["latency_ms"]) and pd.notna(row["fidelity"]):
                    point = (float(row["latency_ms"]), float(row["fidelity"]))
                    points.append(point)
                    if ctx.goal is None or point[1] >= ctx.goal:
                        fastest = min(fastest, point[0])
                    if found is None and row["plan"] == target_key:
                        found = t
                    if close is None and math.isfinite(fastest) and fastest <= target_ms * (1 + WITHIN):
                        close = t
            curves.append({"strategy": strategy, "seed": seed, "trials": t, "spent": min(t, len(run)),
                           "hypervolume": hypervolume(points, reference) / best_hv if points else 0.0,
                           "fastest_at_goal": fastest if math.isfinite(fastest) else None,
                           "found_target": found is not None and found <= t,
                           "trials_to_target": found, "trials_within_5pct": close})
    curves = pd.DataFrame(curves)
    lengths = steps.groupby(["strategy", "seed"])["trial"].max()
    curves["complete"] = [strategy in RANKED or lengths[(strategy, seed)] >= horizon
                          for strategy, seed in zip(curves["strategy"], curves["seed"])]
    rows = []
    order = [s for s in STRATEGIES if s in set(curves["strategy"])]
    for strategy in order:
        own = curves[curves["strategy"] == strategy]
        for budget in budgets:
            at = own[own["trials"] == budget]
            if strategy in SAMPLED:  # a run cut short before this budget does not count at it
                at = at[at["spent"] >= budget]
            if at.empty:
                continue
            hv = at["hypervolume"]
            fastest = at["fastest_at_goal"].dropna().astype(float)
            to_target = at["trials_to_target"].dropna()
            to_target = to_target[to_target <= budget]
            close = at["trials_within_5pct"].dropna()
            close = close[close <= budget]
            rows.append({"strategy": strategy, "budget": budget, "runs": len(at),
                         "plans_spent_mean": round(float(at["spent"].mean()), 1),
                         "hv_mean": round(float(hv.mean()), 4), "hv_min": round(float(hv.min()), 4),
                         "hv_max": round(float(hv.max()), 4),
                         "fastest_at_goal_ms_mean": round(float(fastest.mean()), 4) if len(fastest) else None,
                         "runs_meeting_goal": len(fastest),
                         "runs_found_target": len(to_target),
                         "trials_to_target_mean": round(float(to_target.mean()), 1) if len(to_target) else None,
                         "runs_within_5pct": len(close),
                         "trials_within_5pct_mean": round(float(close.mean()), 1) if len(close) else None})
    summary = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    steps.to_csv(out / "steps.csv", index=False)
    curves.to_csv(out / "curves.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    info = {**meta, "metric": ctx.metric, "goal": ctx.goal, "reference_point": {"latency_ms": reference[0],
                                                                                 ctx.metric: reference[1]},
            "normalized_by": best_label, "best_hypervolume": best_hv,
            "best_front": [{"latency_ms": p[0], ctx.metric: p[1]} for p in best_front],
            "fastest_at_goal": {"plan": target_key, "latency_ms": target_ms,
                                ctx.metric: values[target_key][1] if target_key else None},
            "plans_measured": len(values) if ctx.universe is None else int(steps["plan"].nunique()),
            "summary": summary.to_dict("records")}
    (out / "summary.json").write_text(json.dumps(info, indent=1, default=float) + "\n")
    plot(curves, order, out / "hypervolume.png", ctx, budgets, target_ms, best_label)
    return summary


def plot(curves: pd.DataFrame, order, path: Path, ctx: Context, budgets, target_ms: float, best_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = dict(zip(STRATEGIES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for strategy in order:
        own = curves[(curves["strategy"] == strategy) & curves["complete"]]
        if own.empty:
            continue
        grouped = own.groupby("trials")
        hv = grouped["hypervolume"]
        runs = own["seed"].nunique()
        label = f"{strategy} ({runs} seeds)" if strategy in SAMPLED else f"{strategy} (deterministic)"
        style = "-" if strategy in SAMPLED else "--"
        x = np.array(sorted(own["trials"].unique()))
        left.plot(x, hv.mean().to_numpy(), style, color=colors[strategy], label=label, linewidth=1.6)
        if runs > 1:
            left.fill_between(x, hv.min().to_numpy(), hv.max().to_numpy(), color=colors[strategy], alpha=0.15)
        fastest = grouped["fastest_at_goal"].apply(lambda s: s.astype(float).mean() if s.notna().all() else np.nan)
        right.plot(x, fastest.to_numpy(), style, color=colors[strategy], label=label, linewidth=1.6)
        if runs > 1:
            lo = grouped["fastest_at_goal"].apply(lambda s: s.astype(float).min())
            hi = grouped["fastest_at_goal"].apply(lambda s: s.astype(float).max() if s.notna().all() else np.nan)
            right.fill_between(x, lo.to_numpy(), hi.to_numpy(), color=colors[strategy], alpha=0.12)
    for budget in budgets:
        left.axvline(budget, color="grey", linewidth=0.6, linestyle=":")
        right.axvline(budget, color="grey", linewidth=0.6, linestyle=":")
    if math.isfinite(target_ms):
        right.axhline(target_ms, color="black", linewidth=0.8, linestyle=":")
    goal = "" if ctx.goal is None else f" >= {ctx.goal:g}"
    left.set(xlabel="trials (distinct plans)", ylabel="hypervolume / best front's",
             title=f"{ctx.name}: hypervolume, mean and min-max", ylim=(None, 1.01))
    right.set(xlabel="trials (distinct plans)", ylabel="ms" if ctx.universe is None else "stand-in latency",
              title=f"fastest plan with {ctx.metric}{goal} (mean; band min-max)")
    left.grid(alpha=0.3)
    right.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")
    fig.text(0.01, 0.005, f"normalized by the {best_label}", fontsize=7, color="grey")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help=f"{TINY}, a packaged model ({', '.join(REAL_MODELS)}) or NAME=PATH (an ONNX "
                                      "file, results under results/NAME/)")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0-4 (tiny model), 0-2 (real models)")
    parser.add_argument("--budgets", type=int, nargs="+",
                        help="distinct plans; each run goes to the largest (default: 16 26 48 tiny, 16 24 real)")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--max-drop", type=float, default=0.01, help="real models: the goal is top-1 >= 1 - this")
    parser.add_argument("--goal", type=float,
                        help="an SQNR goal in dB: the tiny model's (default 45: 30 of the 256 plans meet it) or a "
                             "detector's (default 25, the headline's), whose outputs have no top-1")
    parser.add_argument("--no-study-goal", action="store_true",
                        help="tiny model: search without the goal (as tests/test_search.py); it is used afterwards only")
    parser.add_argument("--bf16", choices=("off", "auto"), default="off",
                        help="off: int8/float per conv (default); auto: int8/bf16/float where the CPU has bf16")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--analyze-only", action="store_true", help="rewrite the results from the workdir")
    parser.add_argument("--quiet-below", type=float, default=0.5,
                        help="real models: time a plan once other processes keep fewer cores than this busy")
    parser.add_argument("--quiet-wait", type=float, default=900.0, help="... waiting at most this many seconds")
    parser.add_argument("--jobs", type=int, default=1, help="strategy runs in this many processes at once")
    parser.add_argument("--job", type=int, help=argparse.SUPPRESS)  # internal: one of the --jobs processes
    parser.add_argument("--prepare-only", action="store_true",
                        help="real models: calibration, reference, layer noise and rankings only (nothing is timed)")
    args = parser.parse_args()
    args.model, _, args.model_path = args.model.partition("=")
    args.model_path = args.model_path or args.model
    if args.model not in (TINY, *REAL_MODELS) and not Path(args.model_path).is_file():
        parser.error(f"model must be {TINY}, one of {', '.join(REAL_MODELS)} or NAME=PATH to an ONNX file; "
                     f"got {args.model!r}")
    tiny = args.model == TINY
    args.seeds = args.seeds or ([0, 1, 2, 3, 4] if tiny else [0, 1, 2])
    args.budgets = sorted(args.budgets or ([16, 26, 48] if tiny else [16, 24]))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("precsearch").setLevel(logging.WARNING)
    logging.getLogger("precsearch.study.search").setLevel(logging.WARNING if tiny else logging.INFO)
    logger.setLevel(logging.INFO)
    suffix = "-three-state" if args.bf16 != "off" else "-no-study-goal" if args.no_study_goal else ""
    workdir = (args.workdir or ROOT / "precsearch-work" / "experiments" / f"strategies-{args.model}{suffix}").resolve()
    out = (args.out or ROOT / "results" / args.model / f"strategies{suffix}").resolve()
    if {"gp", "guided-gp"} & set(args.strategies):
        try:
            import torch

            torch.set_num_threads(1)
        except ImportError:
            sys.exit("the gp strategy needs PyTorch (pip install torch); or leave it out with --strategies")

    started = time.perf_counter()
    ctx = tiny_context(args, workdir) if tiny else real_context(args, workdir)
    budget = max(args.budgets)
    if not tiny and not args.analyze_only and args.job is None and set(args.strategies) & set(RANKED):
        ctx.rankings()  # ONNX Runtime runs for minutes: here, not in a job beside another job's timings
    if args.prepare_only:
        return
    # Seed by seed, so a cut-short run still compares every sampled strategy; the deterministic ones last.
    runs = [(strategy, seed) for seed in args.seeds for strategy in args.strategies if strategy in SAMPLED]
    runs += [(strategy, None) for strategy in args.strategies if strategy in RANKED]
    if args.job is not None:  # one of --jobs processes: every --jobs-th run
        for strategy, seed in runs[args.job::args.jobs]:
            if seed is None:
                run_ranked(ctx, strategy, budget)
            else:
                run_sampled(ctx, strategy, seed, budget)
        return
    if not args.analyze_only:
        if args.jobs == 1:
            for strategy, seed in runs:
                run_ranked(ctx, strategy, budget) if seed is None else run_sampled(ctx, strategy, seed, budget)
        else:
            # Parallel processes compile side by side and take turns to time (precsearch's machine-wide CPU
            # lock); a plan two of them want is measured once (a lock per plan in the cache).
            import subprocess

            children = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--job", str(job)])
                        for job in range(args.jobs)]
            if any(child.wait() for child in children):
                sys.exit("a strategy process failed")
    wall_path = workdir / "wall.json"
    wall = json.loads(wall_path.read_text()) if wall_path.is_file() else {"runs_min": 0.0}
    if not args.analyze_only:
        wall["runs_min"] = round(wall["runs_min"] + (time.perf_counter() - started) / 60, 1)
        wall_path.write_text(json.dumps(wall))
    meta = {"model": args.model, "seeds": args.seeds, "budgets": args.budgets, "strategies": args.strategies,
            "precisions": list(ctx.precisions), "cpu": cpu_name(), "wall_min_all_runs": wall["runs_min"],
            "command": "python experiments/compare_strategies.py " + " ".join(
                a for a in sys.argv[1:] if a not in ("--analyze-only", "--prepare-only"))}
    if not tiny:
        meta.update(untuned=True, eval_batches=ctx.config.eval_batches, repeats=ctx.config.repeats,
                    plans_built=len(list((workdir / "plan-cache").glob("*.json"))))
        gate_path = workdir / "timing-gate.jsonl"
        gate = [json.loads(line) for line in gate_path.read_text().splitlines()] if gate_path.is_file() else []
        meta["timing_gate"] = {"measurements": len(gate), "quiet": sum(g["quiet"] for g in gate),
                               "quiet_below_cores": args.quiet_below,
                               "wait_s_total": round(sum(g["waited_s"] for g in gate), 1),
                               "wait_s_max": max((g["waited_s"] for g in gate), default=0.0)}
    steps = collect_steps(ctx, args.strategies, args.seeds)
    summary = analyze(ctx, steps, args.budgets, out, meta)
    print(summary.to_string(index=False))


if __name__ == "__main__":
    main()
