"""Is the search worth running? A full search and five strategies at equal budgets, on one real model.

One command per model re-creates ``results/<name>/``:

    python experiments/compare_strategies.py mobilenetv3-textcls
    python experiments/compare_strategies.py pplcnet-orientation
    python experiments/compare_strategies.py efficientnet-lite0      # exports the model through torch first

What it runs, in ``--workdir`` (default ``precsearch-work/experiments/<name>``):

1. ``precsearch tune`` (resumes; skipped with ``--no-tune``) and the full search, ``precsearch search`` with the
   default sampler (multivariate TPE, the tool's default), ``--trials``, ``--seed``: the same commands a user
   runs.  Its report is copied to ``results/<name>/search/``.
2. ``precsearch sensitivity --no-latency`` (ONNX Runtime only) for the two rankings below.
3. Five strategies with the same budget of ``--budget`` distinct plans, each built and timed with TVM exactly
   as the search does:

   - ``tpe``: the first ``--budget`` plans of the full search;
   - ``nsga2``: Optuna's NSGA-II (population 8, so that a small budget still sees generations), same seeds;
   - ``random``: Optuna's random sampler, same seeds (all-int8, all-float, first and last conv float);
   - ``greedy-revert``: NNCF accuracy control's scheme. Start all-int8; rank layers by the fidelity gained
     when only that layer returns to float; return them to float in that order, one build per step, until
     top-1 reaches ``--goal``;
   - ``sensitivity-topk``: the k most sensitive layers float (ranked by fidelity with only that layer int8,
     as ``precsearch sensitivity`` ranks them), k = 0, 1, 2, ...

   A plan already measured by an earlier strategy is not built again: its measurement is reused, so every
   strategy sees the same number for the same plan.  Two strategy processes run side by side; they compile
   in parallel and take turns to time (precsearch's machine-wide CPU lock).
4. A reference for the hypervolume: an additive kernel bound on the fastest any plan can be (every conv in
   its faster precision, per-kernel times of the all-int8 and all-float builds, scaled to end-to-end time)
   at top-1 1.0.  It is an estimate, not a proof: fusion and layout transforms make kernel times only
   roughly additive.

Writes ``results/<name>/strategies/`` (``steps.csv``: every strategy's plans in order; ``summary.csv``;
``hypervolume.png``: normalized hypervolume and fastest plan meeting the goal against trials) and
``results/<name>/headline.json`` (the README table's row: ``python experiments/headline_table.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from precsearch.study.record import StudyAttrs, TrialRecord

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("tpe", "nsga2", "random", "greedy-revert", "sensitivity-topk")
# Which strategies each of the two side-by-side processes runs: about equal numbers of new builds.
PROCESS_SHARES = (("nsga2", "greedy-revert"), ("random", "sensitivity-topk"))
EFFNET_ONNX = ROOT / "precsearch-work" / "models" / "efficientnet_lite0.onnx"
METRIC = "top1"
# Per model, what the committed results were made with (tuning stops starting kernels after the timeout).
MODEL_DEFAULTS = {
    "mobilenetv3-textcls": {"search_trials": 60, "workers": 1, "tune_timeout": "1h", "budget": 16},
    "pplcnet-orientation": {"search_trials": 32, "workers": 2, "tune_timeout": "20m", "budget": 16},
    "efficientnet-lite0": {"search_trials": 24, "workers": 2, "tune_timeout": "25m", "budget": 12},
}

logger = logging.getLogger("compare_strategies")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    model: str  # what the precsearch CLI takes: a packaged name or an ONNX path
    cli_extra: tuple[str, ...] = ()
    preset: str | None = None


def model_spec(name: str) -> ModelSpec:
    if name == "efficientnet-lite0":
        if not EFFNET_ONNX.is_file():
            subprocess.run([sys.executable, str(ROOT / "experiments" / "export_efficientnet_lite0.py"),
                            str(EFFNET_ONNX)], check=True)
        return ModelSpec(name, str(EFFNET_ONNX), ("--preset", "imagenet"), "imagenet")
    return ModelSpec(name, name)


def precsearch(*args: str) -> None:
    command = [sys.executable, "-m", "precsearch", *args]
    logger.info("$ %s", " ".join(command[1:]))
    subprocess.run(command, check=True)


# --------------------------------------------------------------------------- plans measured once


class CachingEvaluator:
    """A TvmEvaluator that measures each plan once across strategies (one JSON file per plan in ``cache_dir``)."""

    def __init__(self, evaluator, cache_dir: Path):
        self.evaluator = evaluator
        self.cache_dir = cache_dir
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.fresh: set[str] = set()  # plans this process built and timed itself

    def _path(self, key: str) -> Path:
        return self.cache_dir / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".json")

    def lookup(self, key: str):
        from precsearch.study.record import PlanResult

        path = self._path(key)
        if not path.is_file():
            return None
        payload = json.loads(path.read_text())
        return PlanResult(**{k: v for k, v in payload.items() if k != "plan"})

    def store(self, key: str, result) -> None:
        path = self._path(key)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"plan": key, **dataclasses.asdict(result)}))
        tmp.replace(path)

    def evaluate(self, plan):
        cached = self.lookup(plan.key())
        if cached is not None:
            return cached
        result = self.evaluator.evaluate(plan)
        self.fresh.add(plan.key())
        self.store(plan.key(), result)
        return result

    def measure_baselines(self):
        return self.evaluator.measure_baselines() if self.evaluator is not None else None

    def remeasure(self, plan, repeats: int):
        return self.evaluator.remeasure(plan, repeats) if self.evaluator is not None else None

    def remeasure_baselines(self, repeats: int):
        return self.evaluator.remeasure_baselines(repeats) if self.evaluator is not None else None


def result_from_trial(trial):
    """The PlanResult a finished search trial recorded (to seed the cache)."""
    from precsearch.study.record import TrialRecord

    return TrialRecord.from_trial(trial).result


# --------------------------------------------------------------------------- one process's strategies


def _search_study(workdir: Path):
    import optuna

    from precsearch.study.storage import open_storage

    storage = open_storage(f"sqlite:///{workdir / 'study.db'}")
    (name,) = optuna.study.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def _step_row(strategy: str, step: int, plan, result, reused: bool) -> dict:
    return {"strategy": strategy, "step": step, "plan": plan.key(), "float_count": len(plan.float_ids),
            "latency_ms": result.latency_ms, "latency_iqr_ms": result.latency_iqr_ms,
            "top1": result.metrics.get("top1"), "sqnr_db": result.metrics.get("sqnr_db"),
            "cost_s": round(result.build_time_s + result.eval_time_s + result.measure_time_s, 2), "reused": reused}


def _ranking(workdir: Path, column: str, ascending: bool) -> list[str]:
    frame = pd.read_csv(workdir / "sensitivity.csv")
    frame = frame.sort_values([f"{column}.top1", f"{column}.sqnr_db", "index"],
                              ascending=[ascending, ascending, True])
    return list(frame["id"])


def run_ranked(strategy: str, ranking: list[str], evaluator: CachingEvaluator, budget: int, goal: float | None
               ) -> list[dict]:
    """Return layers to float in ``ranking`` order, one build per step; stop at the goal when one is given."""
    from precsearch.model.plan import Plan

    rows = []
    for step in range(min(budget, len(ranking) + 1)):
        plan = Plan(frozenset(ranking[:step]))
        result = evaluator.evaluate(plan)
        reused = plan.key() not in evaluator.fresh
        rows.append(_step_row(strategy, step, plan, result, reused))
        logger.info("%s step %d: %d float, %.3f ms, top1 %.4f%s", strategy, step, step, result.latency_ms,
                    result.metrics["top1"], " (reused)" if reused else "")
        if goal is not None and result.metrics["top1"] >= goal:
            break
    return rows


def run_optuna(strategy: str, sampler, model, config, evaluator: CachingEvaluator, budget: int,
               workdir: Path) -> list[dict]:
    from precsearch.study.search import open_study, run_worker, seed_plans
    from precsearch.study.storage import open_storage

    url = f"sqlite:///{workdir / 'strategies' / f'{strategy}.db'}"
    storage = open_storage(url, heartbeat_interval_s=config.heartbeat_interval_s,
                           grace_period_s=config.grace_period_s, max_retry=config.max_retry)
    study_config = config.replace(sampler=strategy, trials=budget, workers=1, timeout_s=None)
    handle = open_study(study_config, model, storage, url, f"{strategy}-seed{config.seed}", METRIC)
    run_worker(handle, model, evaluator, seeds=seed_plans(model), sampler=sampler)
    rows = []
    for trial in _distinct_trials(handle.study)[:budget]:
        record = TrialRecord.from_trial(trial)
        rows.append(_step_row(strategy, len(rows), record.plan, record.result, record.plan_key not in evaluator.fresh))
    return rows


def _distinct_trials(study) -> list:
    """Finished trials in trial order, one per plan (a repeat copies its owner's values and costs nothing)."""
    from optuna.trial import TrialState

    seen, trials = set(), []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        record = TrialRecord.from_trial(trial)
        key = record.plan_key
        if trial.state == TrialState.COMPLETE and key not in seen and record.duplicate_of is None:
            seen.add(key)
            trials.append(trial)
    return trials


def search_evaluator(spec: ModelSpec, workdir: Path):
    """The model, the full search's settings and a TvmEvaluator made from them, as the search's own trials used."""
    from precsearch.study.config import SearchConfig
    from precsearch.study.evaluator import TvmEvaluator
    from precsearch.model import open_model

    config = SearchConfig.from_dict(StudyAttrs(_search_study(workdir)).config)
    model, preset = open_model(spec.model, config.input_shapes)
    return model, config, TvmEvaluator.from_config(config, model, workdir, spec.preset or preset, METRIC)


def run_strategies(spec: ModelSpec, names: list[str], workdir: Path, budget: int, goal: float) -> None:
    import optuna

    model, config, tvm_evaluator = search_evaluator(spec, workdir)
    evaluator = CachingEvaluator(tvm_evaluator, workdir / "plan-cache")
    for name in names:
        started = time.perf_counter()
        if name == "nsga2":
            rows = run_optuna(name, optuna.samplers.NSGAIISampler(seed=config.seed, population_size=8), model,
                              config, evaluator, budget, workdir)
        elif name == "random":
            rows = run_optuna(name, optuna.samplers.RandomSampler(seed=config.seed), model, config, evaluator,
                              budget, workdir)
        elif name == "greedy-revert":
            rows = run_ranked(name, _ranking(workdir, "only_float", ascending=False), evaluator, budget, goal)
        elif name == "sensitivity-topk":
            rows = run_ranked(name, list(pd.read_csv(workdir / "sensitivity.csv")["id"]), evaluator, budget, None)
        else:
            raise ValueError(name)
        pd.DataFrame(rows).to_csv(workdir / "strategies" / f"{name}.csv", index=False)
        logger.info("%s: %d plans in %.1f min", name, len(rows), (time.perf_counter() - started) / 60)


# --------------------------------------------------------------------------- the bound and the analysis


def kernel_bound_ms(spec: ModelSpec, workdir: Path) -> dict:
    """Additive kernel estimate of the fastest any plan can be (see the module docstring)."""
    from precsearch.tvm import measure_library, profile_kernels
    from precsearch.model.plan import Plan

    model, config, evaluator = search_evaluator(spec, workdir)
    per_build = {}
    for precision, plan in (("int8", Plan(frozenset())), ("float", Plan(frozenset(model.capable_ids())))):
        with evaluator.lock.shared():
            built = evaluator.build(plan).built
        with evaluator.lock.exclusive():
            kernels = profile_kernels(built, evaluator.batches[0], threads=config.threads, runs=30)
            latency = measure_library(built, evaluator.batches[0], threads=config.threads, warmup=20, repeats=200)
        conv_us: dict[int, float] = {}
        other_us = 0.0
        for entry in kernels:
            if entry.layer_index is not None:
                conv_us[entry.layer_index] = conv_us.get(entry.layer_index, 0.0) + entry.median_us
            else:
                other_us += entry.median_us
        per_build[precision] = {"conv_us": conv_us, "other_us": other_us, "latency_ms": latency.median_ms,
                                "profiled_us": sum(conv_us.values()) + other_us}
    layers = set(per_build["int8"]["conv_us"]) | set(per_build["float"]["conv_us"])
    best_us = sum(min(per_build[p]["conv_us"].get(i, np.inf) for p in per_build) for i in layers)
    best_us += min(per_build[p]["other_us"] for p in per_build)
    # Kernel timestamps add per-call overhead; scale by the smaller measured/profiled ratio of the two builds.
    scale = min(per_build[p]["latency_ms"] * 1e3 / per_build[p]["profiled_us"] for p in per_build)
    return {"bound_ms": round(best_us * scale / 1e3, 4), "tvm_int8_ms": per_build["int8"]["latency_ms"],
            "tvm_float_ms": per_build["float"]["latency_ms"],
            "faster_in_int8": sum(per_build["int8"]["conv_us"].get(i, np.inf) < per_build["float"]["conv_us"].get(i, np.inf)
                                  for i in layers), "convs": len(layers)}


def _cached_bound(spec: ModelSpec, workdir: Path, out: Path) -> dict:
    """The kernel bound, measured once per workdir (an earlier headline.json's counts as measured)."""
    path = workdir / "kernel-bound.json"
    if not path.is_file():
        earlier = out / "headline.json"
        bound = json.loads(earlier.read_text())["kernel_bound"] if earlier.is_file() else kernel_bound_ms(spec, workdir)
        path.write_text(json.dumps(bound, default=float))
    return json.loads(path.read_text())


def hypervolume_curves(steps: pd.DataFrame, budget: int, goal: float, ideal_ms: float) -> tuple[pd.DataFrame, dict]:
    """Per strategy and trial: hypervolume of (latency, top-1) as a fraction of the rectangle up to the ideal point.

    Every strategy is followed up to ``budget`` trials; ``tpe`` up to the end of the full search.
    """
    from precsearch.study.pareto import hypervolume

    reference = (float(steps["latency_ms"].max()), float(steps["top1"].min()))
    area = (reference[0] - ideal_ms) * (1.0 - reference[1])
    rows = []
    for strategy in STRATEGIES:
        own = steps[steps["strategy"] == strategy].sort_values("step")
        horizon = max(budget, len(own)) if strategy == "tpe" else budget
        points, best = [], np.inf
        for trials in range(1, horizon + 1):
            if trials <= len(own):
                row = own.iloc[trials - 1]
                points.append((row["latency_ms"], row["top1"]))
                if row["top1"] >= goal:
                    best = min(best, row["latency_ms"])
            rows.append({"strategy": strategy, "trials": trials, "spent": min(trials, len(own)),
                         "hypervolume": hypervolume(points, reference) / area,
                         "fastest_meeting_goal_ms": best if np.isfinite(best) else None})
    return pd.DataFrame(rows), {"reference_latency_ms": reference[0], "reference_top1": reference[1],
                                "ideal_latency_ms": ideal_ms}


def plot_curves(curves: pd.DataFrame, out: Path, title: str, goal: float, bound_note: str, baselines: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = ("-", "--", ":", "-.", (0, (5, 1)))  # curves that coincide stay visible
    for (strategy, own), style in zip(curves.groupby("strategy", sort=False), styles):
        left.plot(own["trials"], own["hypervolume"], marker=".", linestyle=style, label=strategy)
        right.plot(own["trials"], own["fastest_meeting_goal_ms"].astype(float), marker=".", linestyle=style,
                   label=strategy)
    right.axhline(baselines["ort_float_ms"], color="grey", linestyle="--", linewidth=1)
    right.annotate("ORT float", (1, baselines["ort_float_ms"]), fontsize=8, color="grey")
    right.axhline(baselines["ort_int8_ms"], color="grey", linestyle=":", linewidth=1)
    right.annotate("ORT int8", (1, baselines["ort_int8_ms"]), fontsize=8, color="grey")
    left.set(xlabel="trials (distinct plans built and timed)", ylabel=f"hypervolume / {bound_note}",
             title=f"{title}: hypervolume of latency vs top-1", ylim=(0, 1.02))
    right.set(xlabel="trials (distinct plans built and timed)", ylabel="ms",
              title=f"fastest plan with top-1 >= {goal:g}")
    left.grid(alpha=0.3)
    right.grid(alpha=0.3)
    left.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def collect_steps(workdir: Path) -> pd.DataFrame:
    from precsearch.model.plan import Plan

    frames = [pd.read_csv(workdir / "strategies" / f"{name}.csv") for name in STRATEGIES if name != "tpe"]
    # The full search's plans, all of them: its curve goes on past the equal budget.
    tpe = [_step_row("tpe", step, Plan(frozenset(trial.user_attrs["float_layers"])), result_from_trial(trial), False)
           for step, trial in enumerate(_distinct_trials(_search_study(workdir)))]
    return pd.concat([pd.DataFrame(tpe), *frames], ignore_index=True)


def side_by_side(spec: ModelSpec, workdir: Path, plans: list[str]) -> dict:
    """``precsearch bench`` with ``plans`` (plan keys): ORT float and int8, TVM float and all-int8 and the plans,
    measured in one run with 200 runs each, once per workdir.

    The search's own baselines are timed once at its start, and its plans one at a time over hours; the
    headline's ratios come from this run, where every number was measured under the same conditions.
    """
    path = workdir / "side-by-side.json"
    if not path.is_file():
        command = [sys.executable, "-m", "precsearch", "bench", spec.model, *spec.cli_extra, "--workdir", str(workdir),
                   "--repeats", "200", "--json"]
        for key in plans:
            command += ["--plan", key.removeprefix("float:")]
        logger.info("$ %s", " ".join(command[1:]))
        path.write_text(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    return json.loads(path.read_text())


def headline(spec: ModelSpec, workdir: Path, goal: float, bound: dict) -> dict:
    """The README row: baselines, TVM all-int8, the fastest front plan meeting the goal, cost of the search."""
    study = _search_study(workdir)
    attrs = StudyAttrs(study)
    trials = _distinct_trials(study)
    convs = len(attrs.layer_ids)
    baselines = attrs.baselines
    remeasured = attrs.remeasured
    pareto = pd.read_csv(workdir / "report" / "pareto.csv")
    meeting = pareto[pareto[METRIC] >= goal].sort_values("latency_ms")
    by_plan = {TrialRecord.from_trial(t).plan_key: TrialRecord.from_trial(t) for t in trials}
    starts = [t.datetime_start for t in trials]
    ends = [t.datetime_complete for t in trials]
    candidates = pd.concat([meeting[:1], pareto.sort_values("latency_ms")[:1]])
    headline_plans = list(dict.fromkeys(candidates.loc[(candidates["float_count"] > 0)
                                                       & (candidates["float_count"] < convs), "plan"]))
    bench = side_by_side(spec, workdir, headline_plans)
    rows = {row["name"]: row for row in bench["rows"]}
    by_key = {row["plan"]: row for row in bench["rows"] if not row["name"].startswith("ort_")}
    ort_float, ort_int8 = rows["ort_float"]["median_ms"], rows["ort_int8"]["median_ms"]

    def plan_entry(row) -> dict:
        key = row["plan"]
        measured = by_key.get(key) or (rows["tvm_float"] if int(row["float_count"]) == convs else rows["tvm_int8"])
        return {"trial": int(row["trial"]), "plan": key, "latency_ms": round(measured["median_ms"], 4),
                "latency_iqr_ms": round(measured["iqr_ms"], 4),
                "search_latency_ms": round(float(remeasured.get(int(row["trial"]), {}).get("median_ms",
                                                                                             row["latency_ms"])), 4),
                METRIC: float(row[METRIC]), "float_convs": int(row["float_count"]),
                "speedup_vs_ort_float": round(ort_float / measured["median_ms"], 3),
                "speedup_vs_ort_int8": round(ort_int8 / measured["median_ms"], 3)}

    all_int8 = by_plan.get("float:")
    return {"model": spec.name, "convs": convs, "goal_top1": goal,
            "ort_float_ms": round(ort_float, 4), "ort_int8_ms": round(ort_int8, 4),
            "ort_int8_top1": baselines.get(f"ort_int8_{METRIC}"),
            "tvm_all_int8_ms": round(rows["tvm_int8"]["median_ms"], 4),
            "tvm_all_int8_top1": all_int8.metrics.get("top1") if all_int8 else None,
            "tvm_all_float_ms": round(rows["tvm_float"]["median_ms"], 4),
            "fastest_meeting_goal": plan_entry(meeting.iloc[0]) if len(meeting) else None,
            "fastest_on_front": plan_entry(pareto.sort_values("latency_ms").iloc[0]),
            "front": [{"trial": int(r["trial"]), "latency_ms": round(float(remeasured.get(int(r["trial"]), {}).get(
                "median_ms", r["latency_ms"])), 4), METRIC: float(r[METRIC]), "float_convs": int(r["float_count"])}
                      for _, r in pareto.iterrows()],
            "search_trials": len(trials), "search_wall_min": round((max(ends) - min(starts)).total_seconds() / 60, 1),
            "search_baselines": {k: round(v, 4) for k, v in baselines.items()},
            "search_settings": {k: attrs.config[k] for k in ("sampler", "seed", "trials", "eval_batches",
                                                                           "repeats")},
            "side_by_side_runs": rows["ort_float"]["runs"], "tuned": bench["tuned"], "kernel_bound": bound}


def copy_report(workdir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("report.html", "pareto.csv", "pareto.png", "trials.csv"):
        shutil.copy2(workdir / "report" / name, out / name)
    if (workdir / "sensitivity.csv").is_file():
        shutil.copy2(workdir / "sensitivity.csv", out / "sensitivity.csv")
    for name in ("side-by-side.json", "kernel-bound.json"):  # the raw figures behind headline.json
        if (workdir / name).is_file():
            shutil.copy2(workdir / name, out.parent / name)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["mobilenetv3-textcls", "pplcnet-orientation", "efficientnet-lite0"])
    parser.add_argument("--budget", type=int, help="distinct plans per strategy (default: per model)")
    parser.add_argument("--search-trials", type=int, help="distinct plans of the full search (default: per model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--goal", type=float, default=0.99, help="top-1 agreement the plans must reach")
    parser.add_argument("--tune-trials", type=int, default=8)
    parser.add_argument("--tune-timeout", help="default: per model")
    parser.add_argument("--no-tune", action="store_true", help="use the tuning database as it is")
    parser.add_argument("--workers", type=int, help="worker processes of the full search (default: per model)")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--analyze-only", action="store_true",
                        help="rewrite results/<name>/ from the workdir; no search or strategy runs (the side-by-side "
                             "bench and the bound are measured only if the workdir has none)")
    parser.add_argument("--run-strategies", help=argparse.SUPPRESS)  # internal: one side-by-side process
    args = parser.parse_args()
    for name, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    spec = model_spec(args.model)
    workdir = (args.workdir or ROOT / "precsearch-work" / "experiments" / spec.name).resolve()
    out = (args.out or ROOT / "results" / spec.name).resolve()
    (workdir / "strategies").mkdir(parents=True, exist_ok=True)

    if args.run_strategies:
        run_strategies(spec, args.run_strategies.split(","), workdir, args.budget, args.goal)
        return

    if not args.analyze_only:
        common = (*spec.cli_extra, "--workdir", str(workdir))
        if not args.no_tune:
            precsearch("tune", spec.model, "--trials", str(args.tune_trials), "--timeout", args.tune_timeout, *common)
        precsearch("search", spec.model, "--trials", str(args.search_trials), "--seed", str(args.seed),
                   "--workers", str(args.workers), *common)
        if not (workdir / "sensitivity.csv").is_file():
            precsearch("sensitivity", spec.model, "--no-latency", *common)
        cache = CachingEvaluator(None, workdir / "plan-cache")
        for trial in _distinct_trials(_search_study(workdir)):
            cache.store(TrialRecord.from_trial(trial).plan_key, result_from_trial(trial))

        children = [subprocess.Popen([sys.executable, __file__, args.model, "--budget", str(args.budget),
                                      "--goal", str(args.goal), "--workdir", str(workdir), "--run-strategies",
                                      ",".join(share)]) for share in PROCESS_SHARES]
        if any(child.wait() for child in children):
            sys.exit("a strategy process failed")
    bound = _cached_bound(spec, workdir, out)
    logger.info("kernel bound: %s", bound)

    steps = collect_steps(workdir)
    ideal_ms = min(bound["bound_ms"], float(steps["latency_ms"].min()))
    curves, reference = hypervolume_curves(steps, args.budget, args.goal, ideal_ms)
    strategies_out = out / "strategies"
    strategies_out.mkdir(parents=True, exist_ok=True)
    steps.to_csv(strategies_out / "steps.csv", index=False)
    curves.to_csv(strategies_out / "hypervolume.csv", index=False)
    last = curves[curves["trials"] == args.budget].set_index("strategy")
    summary = pd.DataFrame([{
        "strategy": name, "trials": int(last.loc[name, "spent"]),
        "hypervolume": round(float(last.loc[name, "hypervolume"]), 4),
        "fastest_meeting_goal_ms": last.loc[name, "fastest_meeting_goal_ms"],
        "cost_min": round(steps.loc[(steps["strategy"] == name) & (steps["step"] < args.budget), "cost_s"].sum() / 60,
                          1)} for name in STRATEGIES])
    full = curves[curves["strategy"] == "tpe"].iloc[-1]
    if int(full["trials"]) > args.budget:
        summary.loc[len(summary)] = {"strategy": "tpe (full search)", "trials": int(full["spent"]),
                                     "hypervolume": round(float(full["hypervolume"]), 4),
                                     "fastest_meeting_goal_ms": full["fastest_meeting_goal_ms"],
                                     "cost_min": round(steps.loc[steps["strategy"] == "tpe", "cost_s"].sum() / 60, 1)}
    summary.to_csv(strategies_out / "summary.csv", index=False)
    plot_curves(curves, strategies_out / "hypervolume.png", spec.name, args.goal, "kernel-bound rectangle",
                StudyAttrs(_search_study(workdir)).baselines)
    copy_report(workdir, out / "search")
    row = headline(spec, workdir, args.goal, bound)
    row["strategies"] = {"budget": args.budget, "reference": reference, "summary": summary.to_dict("records")}
    (out / "headline.json").write_text(json.dumps(row, indent=1, default=float) + "\n")
    print(summary.to_string(index=False))
    print(json.dumps({k: v for k, v in row.items() if k != "strategies"}, indent=1, default=float))


if __name__ == "__main__":
    main()
