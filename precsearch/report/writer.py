"""Reports a model owner can act on: which plan to ship, what it costs, what it buys.

Compute, then draw: :func:`collect` turns a study into a :class:`ReportData`
(tables as pandas frames, the front, the baselines, the hypervolume history,
the recommended plan); :func:`write_report` renders it as ``trials.csv``,
``pareto.csv``, ``pareto.png`` (matplotlib), ``pareto.html`` (plotly) and one
self-contained ``report.html``.  Every file is written to a temporary name and
renamed, so a job killed mid-write leaves the previous report whole.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from precsearch.study.pareto import finite_objective, front_points, hypervolume
from precsearch.study.record import AGREES, COMPILER_PROBLEM, NEAR_TIES, StudyAttrs, TrialRecord
from precsearch.files import atomic_write
from precsearch.model.plan import CONV_QDQ, QUANTIZE_STATIC

logger = logging.getLogger(__name__)
# ORT int8 is the user's model (quantize_static defaults, per channel), not precsearch's Conv-only QDQ.
_BASELINE_LABELS = {"ort_float": "ORT float", "ort_int8": "ORT int8 (quantize_static)",
                    "openvino": "OpenVINO default", "openvino_f32": "OpenVINO f32"}
# OpenVINO has a fidelity of its own (its default build infers bf16 where the CPU has it): a point, not a line.
_POINT_BASELINES = (("openvino", "P"), ("openvino_f32", "X"))

REPORT_DIR = "report"
# How each runtime's plans are drawn and named.
_BACKEND_STYLE = {"tvm": ("o", "tab:blue", "circle"), "ort": ("^", "tab:purple", "triangle-up")}
_RUNTIME = {"tvm": "TVM", "ort": "ONNX Runtime"}


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows, computed once from the study."""

    study_name: str
    model: str
    metric: str
    higher_is_better: bool
    goal: float | None
    trials: pd.DataFrame  # every trial
    front: pd.DataFrame  # the non-dominated feasible trials, one per plan, fastest first
    baselines: dict  # ort_float_ms, ort_int8_ms (+ their metrics), from the study
    hv_history: pd.DataFrame  # trial, hypervolume of the feasible front so far
    layer_ids: tuple[str, ...]
    sensitivity: pd.DataFrame | None
    recommended: dict | None  # a row of ``front`` plus why it was chosen
    commands: dict[str, str]
    ship_baseline: str | None = None  # "ONNX Runtime float"/"... int8" when it beats every plan on the front


def _trial_row(trial) -> dict:
    record = TrialRecord.from_trial(trial)
    result = record.result
    has_plan = record.plan_key is not None
    row = {"trial": trial.number, "state": trial.state.name, "plan": record.plan_key,
           "backend": record.backend if has_plan else None,
           "float_count": len(record.float_layers) if has_plan else None,
           "float_layers": json.dumps(list(record.float_layers)) if has_plan else None,
           "bf16_count": len(record.bf16_layers) if has_plan else None,
           "bf16_layers": json.dumps(list(record.bf16_layers)) if has_plan else None,
           "latency_ms": trial.values[0] if trial.values else (result.latency_ms if result else None),
           "fidelity": trial.values[1] if trial.values else None,
           "latency_iqr_ms": result.latency_iqr_ms if result else None,
           "feasible": all(v <= 0 for v in trial.constraints.values()) if trial.values else None}
    row.update(record.metrics)
    for name in ("build_time_s", "eval_time_s", "measure_time_s", "fidelity_batches"):
        row[name] = getattr(result, name) if result else None
    row["check_time_s"] = result.details.get("check_time_s") if result else None
    row["int8_convs"] = record.int8_convs
    row["tuned_kernels"] = result.details.get("tuned_kernels") if result else None
    # Other processes' load while the plan was timed (after one retake): high means its latency is theirs too.
    row["timing_others_busy_cores"] = result.details.get("timing_others_busy_cores") if result else None
    row["verdict"] = result.verdict if result else None
    row["verdict_detail"] = (result.verdict_detail or None) if result and result.verdict else None
    for name in ("duplicate_of", "reruns", "seed", "proposal_kind", "worker", "fail_reason", "skipped"):
        row[name] = getattr(record, name)
    row["started"] = trial.datetime_start
    row["finished"] = trial.datetime_complete
    return row


def knee_point(latency_ms: np.ndarray, fidelity: np.ndarray, higher_is_better: bool = True) -> int:
    """Index of the knee of a front: the point farthest from the line through its two ends, in normalized units.

    With one or two points, the fastest one.  Latency is minimized; fidelity
    maximized when ``higher_is_better``.
    """
    if len(latency_ms) <= 2:
        return int(np.argmin(latency_ms))
    x = (latency_ms - latency_ms.min()) / max(np.ptp(latency_ms), 1e-12)
    fidelity = np.asarray(fidelity, dtype=np.float64)
    finite = fidelity[np.isfinite(fidelity)]
    if finite.size:
        # An exact plan's SQNR is +inf: as far along the fidelity axis as the best finite plan, not infinitely
        # far (which would make every other point's normalized fidelity 0, or NaN).
        fidelity = np.clip(np.nan_to_num(fidelity, nan=finite.min()), finite.min(), finite.max())
    f = fidelity if higher_is_better else -fidelity
    y = (f - f.min()) / max(np.ptp(f), 1e-12)
    a, b = np.argmin(x), np.argmax(x)
    direction = np.array([x[b] - x[a], y[b] - y[a]])
    direction /= max(np.linalg.norm(direction), 1e-12)
    offsets = np.stack([x - x[a], y - y[a]], axis=1)
    distance = np.abs(offsets[:, 0] * direction[1] - offsets[:, 1] * direction[0])
    return int(np.argmax(distance))


def _hv_history(trials, higher_is_better: bool, reference) -> pd.DataFrame:
    from optuna.trial import TrialState

    points, rows = [], []
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.state == TrialState.COMPLETE and trial.values and all(v <= 0 for v in trial.constraints.values()):
            points.append(tuple(trial.values))
        if trial.state == TrialState.COMPLETE:
            rows.append({"trial": trial.number, "hypervolume": hypervolume(points, reference,
                                                                           higher_is_better=higher_is_better)})
    return pd.DataFrame(rows, columns=["trial", "hypervolume"])


def collect(study, *, workdir: str | Path | None = None, layer_ids=(), command_prefix: str = "precsearch") -> ReportData:
    """Gather a precsearch study into report data (no I/O but ``<workdir>/sensitivity.csv`` when present)."""
    from precsearch.study.config import SearchConfig
    from precsearch.fidelity.metrics import METRICS, TIE_BREAK
    attrs = StudyAttrs(study)
    config = SearchConfig.from_dict(attrs.config)
    metric = config.metric
    higher_is_better = METRICS[metric][1]
    trials = study.get_trials(deepcopy=False)
    layer_ids = tuple(layer_ids) or attrs.layer_ids
    frame = pd.DataFrame([_trial_row(t) for t in trials])
    # Latencies timed again around the front's re-measurement replace the first ones (same machine, same minutes).
    again = attrs.remeasured_baselines
    baselines = {**attrs.baselines, **{k: v for k, v in again.items() if k.startswith("ort_")}}
    remeasured = attrs.remeasured
    points = front_points(trials, higher_is_better=higher_is_better, tie_break=TIE_BREAK.get(metric))
    front_rows = []
    by_number = {t.number: t for t in trials}
    for point in points:
        result = TrialRecord.from_trial(by_number[point.trial]).result
        row = {"trial": point.trial, "plan": point.plan, "backend": point.backend,
               "float_layers": json.dumps(list(point.float_layers)),
               "float_count": len(point.float_layers), "bf16_layers": json.dumps(list(point.bf16_layers)),
               "bf16_count": len(point.bf16_layers), "latency_ms": point.latency_ms,
               "latency_iqr_ms": result.latency_iqr_ms, metric: point.fidelity}
        row.update(result.metrics)
        row["verdict"] = result.verdict
        row["verdict_detail"] = result.verdict_detail if result.verdict else None
        again = remeasured.get(point.trial)
        row["remeasured_median_ms"] = again["median_ms"] if again else None
        row["remeasured_iqr_ms"] = again["iqr_ms"] if again else None
        best_ms = row["remeasured_median_ms"] or point.latency_ms
        for name in ("ort_float", "ort_int8", "openvino"):
            if f"{name}_ms" in baselines:
                row[f"speedup_vs_{name}"] = baselines[f"{name}_ms"] / best_ms
        front_rows.append(row)
    front = pd.DataFrame(front_rows)
    completed = frame[frame["state"] == "COMPLETE"] if len(frame) else frame
    if len(completed):
        worst_fidelity = completed["fidelity"].min() if higher_is_better else completed["fidelity"].max()
        reference = (float(completed["latency_ms"].max()) * 1.05, float(worst_fidelity))
        history = _hv_history(trials, higher_is_better, reference)
    else:
        history = pd.DataFrame(columns=["trial", "hypervolume"])
    sensitivity = None
    if workdir is not None and (Path(workdir) / "sensitivity.csv").is_file():
        sensitivity = pd.read_csv(Path(workdir) / "sensitivity.csv")
    recommended = None
    beats, ship_baseline = beats_baselines(front, baselines, metric, higher_is_better,
                                           same_as=_baseline_plans(front, len(layer_ids), config),
                                           goal=config.fidelity_goal(metric))
    if beats.any():
        # The knee only among plans that beat what the user already has.
        candidates = front[beats]
        index = knee_point(candidates["latency_ms"].to_numpy(float), candidates[metric].to_numpy(float),
                           higher_is_better)
        recommended = dict(candidates.iloc[index])
        recommended["ort_model"] = config.ort_model  # what an ONNX Runtime plan's model is
    commands = _commands(config, study.study_name, workdir, recommended, command_prefix)
    return ReportData(study_name=study.study_name, model=config.model, metric=metric,
                      higher_is_better=higher_is_better, goal=config.fidelity_goal(metric), trials=frame, front=front,
                      baselines=baselines, hv_history=history, layer_ids=layer_ids, sensitivity=sensitivity,
                      recommended=recommended, commands=commands, ship_baseline=ship_baseline)


_FLOAT_BASELINE, _INT8_BASELINE = "ONNX Runtime float", "ONNX Runtime int8 (quantize_static)"
_OPENVINO_BASELINE, _OPENVINO_F32_BASELINE = "OpenVINO (its default build)", "OpenVINO f32"


def _baseline_plans(front: pd.DataFrame, layer_count: int, config) -> dict[str, np.ndarray]:
    """Front plans that are a baseline itself: ONNX Runtime's all-float plan is ORT float, and its all-int8 plan
    (MinMax calibration, ``quantize_static``'s default) is the user's ``quantize_static`` model, unless the ORT
    plans are precsearch's Conv-only QDQ models (``--ort-model conv-qdq``)."""
    if not len(front) or "backend" not in front:
        return {}
    ort = (front["backend"] == "ort").to_numpy(bool)
    floats = front["float_count"].to_numpy(int)
    same = {_FLOAT_BASELINE: ort & (floats == layer_count)}
    if config.calibration == "minmax" and config.ort_model == QUANTIZE_STATIC:
        same[_INT8_BASELINE] = ort & (floats == 0)
    return same


def beats_baselines(front: pd.DataFrame, baselines: dict, metric: str, higher_is_better: bool, *,
                    same_as: dict[str, np.ndarray] | None = None, goal: float | None = None):
    """Which front plans no baseline (ONNX Runtime, OpenVINO) beats, and the baseline to ship when none is left.

    A baseline beats a plan when it is at least as fast and at least as faithful, or at least as fast and it
    meets the fidelity ``goal`` itself: the user asked for the goal, and a faster runtime that meets it is the
    better answer than a slower plan with fidelity to spare (on the detector, OpenVINO's bf16 build at 36 dB
    and 8 ms against a TVM all-float plan at 22 ms, goal 25 dB).
    ORT float is the reference itself, so it is faithful to every metric; ORT
    int8's and OpenVINO's fidelity are the ones measured on the same evaluation set.  A plan that
    *is* a baseline (``same_as``: baseline name → mask over the front, e.g. the
    ONNX Runtime backend's all-int8 plan, which is ``quantize_static``) counts
    as beaten by it whatever its own timing says: it offers nothing new.
    Returns ``(mask over front, ship)`` where ``ship`` names the baseline that
    beats every plan (None when some plan survives or the front is empty).
    """
    if not len(front):
        return np.zeros(0, dtype=bool), None
    latency = (front["remeasured_median_ms"].fillna(front["latency_ms"]) if "remeasured_median_ms" in front
               else front["latency_ms"]).to_numpy(float)
    fidelity = front[metric].to_numpy(float)
    beaten_by = {}
    if "ort_float_ms" in baselines:
        beaten_by[_FLOAT_BASELINE] = latency >= baselines["ort_float_ms"]
    for name, label in (("ort_int8", _INT8_BASELINE), ("openvino", _OPENVINO_BASELINE),
                        ("openvino_f32", _OPENVINO_F32_BASELINE)):
        own_fidelity = baselines.get(f"{name}_{metric}")
        if f"{name}_ms" in baselines and own_fidelity is not None:
            faithful = fidelity <= own_fidelity if higher_is_better else fidelity >= own_fidelity
            if goal is not None and (own_fidelity >= goal if higher_is_better else own_fidelity <= goal):
                faithful = np.ones(len(front), dtype=bool)
            beaten_by[label] = (latency >= baselines[f"{name}_ms"]) & faithful
    for name, mask in (same_as or {}).items():
        beaten_by[name] = beaten_by.get(name, np.zeros(len(front), dtype=bool)) | mask
    beaten = np.zeros(len(front), dtype=bool)
    for mask in beaten_by.values():
        beaten |= mask
    if not beaten.all():
        return ~beaten, None
    whole = [name for name, mask in beaten_by.items() if mask.all()]
    return ~beaten, whole[0] if whole else " or ".join(beaten_by)


def _commands(config, study_name: str, workdir, recommended, prefix: str) -> dict[str, str]:
    where = ["--workdir", str(workdir)] if workdir is not None else []
    search = [prefix, "search", config.model, *where, "--study", study_name, "--metric", config.metric]
    if config.backend != "tvm":
        search += ["--backend", config.backend]
    if config.backend != "tvm" and config.ort_model != QUANTIZE_STATIC:
        search += ["--ort-model", config.ort_model]
    if config.goal_on != "value":
        search += ["--goal-on", config.goal_on.replace("_", "-")]
    for flag, value in (("--max-drop", config.max_drop), ("--goal", config.goal), ("--trials", config.trials),
                        ("--sampler", config.sampler), ("--seed", config.seed), ("--data", config.data),
                        ("--eval-batches", config.eval_batches), ("--threads", config.threads),
                        ("--bf16", None if config.bf16 == "auto" else config.bf16),
                        ("--activation-layout", None if config.activation_layout == "auto" else config.activation_layout)):
        if value is not None:
            search += [flag, str(value)]
    commands = {"reproduce": shlex.join(search)}
    if recommended is not None:
        trial = int(recommended["trial"])
        commands["export"] = shlex.join([prefix, "export", *where, "--study", study_name, "--trial", str(trial),
                                         "--out", f"export-trial-{trial}"])
        floats = ",".join(json.loads(recommended["float_layers"])) or "none"
        bf16 = _bf16_of(recommended)
        if recommended.get("backend", "tvm") == "tvm":
            layout = [] if config.activation_layout == "auto" else ["--activation-layout", config.activation_layout]
            commands["build"] = shlex.join([prefix, "build", config.model, "--float", floats,
                                            *(["--bf16", ",".join(bf16)] if bf16 else []), *layout, *where,
                                            "--out", f"build-trial-{trial}", "--check"])
        else:
            commands["bench"] = shlex.join([prefix, "bench", config.model, *where, "--backend", "ort",
                                            "--plan", floats])
    return commands


# --------------------------------------------------------------------------- drawing


def _spread_ms(front: pd.DataFrame) -> pd.Series:
    """Latency IQR of each front plan: the re-measurement's where there is one (more runs), else the trial's."""
    spread = front["latency_iqr_ms"].astype(float)
    if "remeasured_iqr_ms" in front:
        spread = front["remeasured_iqr_ms"].astype(float).fillna(spread)
    return spread.fillna(0.0)


def pareto_png(data: ReportData) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    done = data.trials[data.trials["state"] == "COMPLETE"] if len(data.trials) else data.trials
    backends = _backends(data)
    if len(done):
        feasible = done["feasible"].fillna(True).astype(bool)
        for backend in backends:
            mine = _of_backend(done, backend)
            marker = _BACKEND_STYLE[backend][0]
            name = f"{_RUNTIME[backend]} " if len(backends) > 1 else ""
            ax.scatter(done.loc[feasible & mine, "latency_ms"], done.loc[feasible & mine, "fidelity"], s=14,
                       marker=marker, color="0.6", label=f"{name}feasible trials")
            if (~feasible & mine).any():
                ax.scatter(done.loc[~feasible & mine, "latency_ms"], done.loc[~feasible & mine, "fidelity"], s=14,
                           marker=marker, facecolors="none", edgecolors="0.6", label=f"{name}infeasible trials")
    if len(data.front):
        front = data.front
        ax.plot(front["latency_ms"], front[data.metric], "-", color="0.3", linewidth=1)
        for backend in backends:
            mine = _of_backend(front, backend)
            if mine.any():
                marker, color, _ = _BACKEND_STYLE[backend]
                ax.errorbar(front.loc[mine, "latency_ms"], front.loc[mine, data.metric],
                            xerr=_spread_ms(front)[mine] / 2, fmt=marker, color=color, ms=6, capsize=2,
                            label=f"Pareto front, {_RUNTIME[backend]} (bars: latency IQR)")
    if data.recommended is not None:
        ax.scatter([data.recommended["latency_ms"]], [data.recommended[data.metric]], s=160, marker="*",
                   color="tab:red", zorder=5, label=f"recommended (trial {int(data.recommended['trial'])})")
    for name, style in (("ort_float", "--"), ("ort_int8", ":")):
        if f"{name}_ms" in data.baselines:
            ax.axvline(data.baselines[f"{name}_ms"], color="tab:green", linestyle=style,
                       label=f"{_BASELINE_LABELS[name]} ({data.baselines[f'{name}_ms']:.3f} ms)")
    for name, marker in _POINT_BASELINES:
        if f"{name}_ms" in data.baselines and f"{name}_{data.metric}" in data.baselines:
            ax.scatter([data.baselines[f"{name}_ms"]], [finite_objective(data.baselines[f"{name}_{data.metric}"])],
                       s=90, marker=marker, color="tab:green", zorder=5,
                       label=f"{_BASELINE_LABELS[name]} ({data.baselines.get(f'{name}_precision', '')}, "
                             f"{data.baselines[f'{name}_ms']:.3f} ms)")
    for seed, marker in (("all-float", "s"), ("all-int8", "D")):
        for backend in backends:
            rows = done[(done["seed"] == seed) & _of_backend(done, backend)] if len(done) and "seed" in done else []
            if len(rows):
                ax.scatter(rows["latency_ms"], rows["fidelity"], s=60, marker=marker,
                           color="tab:orange" if backend == "tvm" else "tab:pink", zorder=4,
                           label=f"{_RUNTIME[backend].replace('ONNX Runtime', 'ORT')} {seed}")
    if data.goal is not None:
        ax.axhline(data.goal, color="tab:red", linewidth=0.8, label=f"goal {data.metric} = {data.goal:g}")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("latency, median ms (lower is better)")
    ax.set_ylabel(f"{data.metric} vs ONNX Runtime float ({'higher' if data.higher_is_better else 'lower'} is better)")
    ax.set_title(f"{data.study_name}: latency against fidelity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _backends(data: ReportData) -> list[str]:
    """The runtimes the study's plans ran on, TVM first (a study made before there was a choice: TVM)."""
    seen = set(data.trials["backend"].dropna()) if len(data.trials) and "backend" in data.trials else set()
    return [b for b in _BACKEND_STYLE if b in seen] or ["tvm"]


def _of_backend(frame: pd.DataFrame, backend: str) -> pd.Series:
    if "backend" not in frame:
        return pd.Series(backend == "tvm", index=frame.index)
    return frame["backend"].fillna("tvm") == backend


def pareto_figure(data: ReportData):
    import plotly.graph_objects as go

    fig = go.Figure()
    done = data.trials[data.trials["state"] == "COMPLETE"] if len(data.trials) else data.trials
    hover = "trial %{customdata[0]} (%{customdata[2]})<br>%{x:.3f} ms, " + data.metric + \
            " %{y:.4g}<br>float: %{customdata[1]}<extra></extra>"
    backends = _backends(data)

    def custom(frame):
        runtime = (frame["backend"].fillna("tvm") if "backend" in frame else pd.Series("tvm", index=frame.index))
        return np.stack([frame["trial"].astype(int).astype(str),
                         frame["float_layers"].map(lambda s: ", ".join(json.loads(s)) or "none (all int8)"),
                         runtime.map(_RUNTIME)], axis=1)

    for backend in backends:
        rows = done[_of_backend(done, backend)] if len(done) else done
        if len(rows):
            name = f"{_RUNTIME[backend]} trials" if len(backends) > 1 else "trials"
            fig.add_trace(go.Scatter(x=rows["latency_ms"], y=rows["fidelity"], mode="markers", name=name,
                                     marker=dict(color="lightgray", size=7, symbol=_BACKEND_STYLE[backend][2]),
                                     customdata=custom(rows), hovertemplate=hover))
    if len(data.front):
        front = data.front
        fig.add_trace(go.Scatter(x=front["latency_ms"], y=front[data.metric], mode="lines", name="Pareto front",
                                 line=dict(color="gray"), hoverinfo="skip"))
        for backend in backends:
            mine = _of_backend(front, backend)
            if mine.any():
                rows = front[mine]
                fig.add_trace(go.Scatter(
                    x=rows["latency_ms"], y=rows[data.metric], mode="markers", name=f"front: {_RUNTIME[backend]}",
                    marker=dict(symbol=_BACKEND_STYLE[backend][2], size=10,
                                color=_BACKEND_STYLE[backend][1].removeprefix("tab:")),
                    customdata=custom(rows), hovertemplate=hover,
                    error_x=dict(type="data", array=(_spread_ms(front)[mine] / 2).tolist())))
    for seed, symbol in (("all-float", "square"), ("all-int8", "diamond")):
        for backend in backends:
            rows = done[(done["seed"] == seed) & _of_backend(done, backend)] if len(done) and "seed" in done \
                else done.iloc[:0]
            if len(rows):
                label = f"{_RUNTIME[backend].replace('ONNX Runtime', 'ORT')} {seed}"
                fig.add_trace(go.Scatter(x=rows["latency_ms"], y=rows["fidelity"], mode="markers", name=label,
                                         marker=dict(symbol=symbol, size=12,
                                                     color="darkorange" if backend == "tvm" else "hotpink"),
                                         customdata=custom(rows), hovertemplate=hover))
    if data.recommended is not None:
        rec = pd.DataFrame([data.recommended])
        fig.add_trace(go.Scatter(x=rec["latency_ms"], y=rec[data.metric], mode="markers", name="recommended",
                                 marker=dict(symbol="star", size=16, color="crimson"), customdata=custom(rec),
                                 hovertemplate=hover))
    for name, dash, where in (("ort_float", "dash", "top right"), ("ort_int8", "dot", "bottom right")):
        if f"{name}_ms" in data.baselines:
            fig.add_vline(x=data.baselines[f"{name}_ms"], line_dash=dash, line_color="green",
                          annotation_text=_BASELINE_LABELS[name], annotation_position=where)
    for name, symbol in (("openvino", "cross"), ("openvino_f32", "x")):
        if f"{name}_ms" in data.baselines and f"{name}_{data.metric}" in data.baselines:
            fig.add_trace(go.Scatter(x=[data.baselines[f"{name}_ms"]],
                                     y=[finite_objective(data.baselines[f"{name}_{data.metric}"])], mode="markers",
                                     name=f"{_BASELINE_LABELS[name]} ({data.baselines.get(f'{name}_precision', '')})",
                                     marker=dict(symbol=symbol, size=14, color="green")))
    fig.update_layout(title=f"{data.study_name}: latency against {data.metric}", xaxis_title="latency, median ms",
                      yaxis_title=data.metric, template="plotly_white", height=520)
    return fig


def _history_figure(data: ReportData):
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=data.hv_history["trial"], y=data.hv_history["hypervolume"], mode="lines+markers"))
    fig.update_layout(title="hypervolume of the feasible front after each trial", xaxis_title="trial",
                      yaxis_title="hypervolume (ms × metric)", template="plotly_white", height=360)
    return fig


def _layer_map_figure(data: ReportData):
    import plotly.graph_objects as go

    layers = list(data.layer_ids) or sorted({i for s in data.front["float_layers"] for i in json.loads(s)})
    columns = [f"trial {int(t)}" for t in data.front["trial"]]
    plans = [(set(json.loads(floats)), set(_bf16_of(row))) for floats, (_, row) in
             zip(data.front["float_layers"], data.front.iterrows())]
    # 0 int8, 1 bf16, 2 float: bf16 is the middle rung
    matrix = [[(1 if layer in bf16 else 2) if layer in floats else 0 for floats, bf16 in plans] for layer in layers]
    has_bf16 = any(bf16 for _, bf16 in plans)
    colors = [[0, "#dbe9f6"], [0.5, "#ff9f40"], [1, "#d62728"]]
    fig = go.Figure(go.Heatmap(z=matrix, x=columns, y=layers, colorscale=colors, zmin=0, zmax=2, showscale=False,
                               hovertemplate="%{y} in %{x}: %{z}<extra>0 = int8, 1 = bf16, 2 = float</extra>"))
    fig.update_layout(title=("which layers run bf16 (orange) or stay float (red) in each front plan, fastest plan "
                             "first") if has_bf16 else
                      "which layers stay float (red) in each front plan, fastest plan first",
                      template="plotly_white", height=max(300, 14 * len(layers) + 120), yaxis=dict(autorange="reversed"))
    return fig


def _sensitivity_figure(data: ReportData):
    import plotly.graph_objects as go

    frame = data.sensitivity
    column = next((c for c in (f"only_int8.{data.metric}", "only_int8.sqnr_db") if c in frame), None)
    if column is None:
        return None
    fig = go.Figure(go.Bar(x=frame["id"], y=frame[column]))
    fig.update_layout(title=f"sensitivity: {column.split('.')[1]} with only that layer int8 (most sensitive first)",
                      template="plotly_white", height=360)
    return fig


def _table(frame: pd.DataFrame, columns) -> str:
    present = [c for c in columns if c in frame]
    return frame[present].to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0,
                                  classes="table")


def _verdict_counts(trials: pd.DataFrame) -> str:
    """One sentence: how the evaluated plans' builds compared with ONNX Runtime on their own QDQ models."""
    counts = trials[trials["duplicate_of"].isna()]["verdict"].value_counts() if len(trials) else {}
    parts = [f"{int(counts[v])} {v}" for v in (AGREES, NEAR_TIES, COMPILER_PROBLEM) if v in counts]
    ort_note = ""
    if len(trials) and "backend" in trials and (trials["backend"] == "ort").any():
        ort_note = (" ONNX Runtime plans are scored in the session that ships, so they have no cross-check; "
                    "their graphs are checked to keep exactly the planned convs float.")
    if not parts:
        return "Cross-check with ONNX Runtime: no trial was checked." + ort_note
    return (f"Cross-check of each trial's build with ONNX Runtime on the same QDQ model: {', '.join(parts)} "
            "(a compiler problem fails its trial)." + ort_note)


def _bf16_of(row) -> list[str]:
    """A trials/front row's bf16 layers (a study without them, or a report made before bf16, has none)."""
    value = row.get("bf16_layers") if hasattr(row, "get") else None
    return json.loads(value) if isinstance(value, str) and value else []


def ship_line(recommended: dict) -> str:
    """What to ship, naming the runtime: the TVM library or the ``quantize_static`` model for ONNX Runtime."""
    trial = int(recommended["trial"])
    floats = json.loads(recommended["float_layers"])
    if recommended.get("backend", "tvm") == "ort" and recommended.get("ort_model") == CONV_QDQ:
        return (f"Ship trial {trial} with ONNX Runtime: precsearch's Conv-only QDQ model with float convs "
                f"{json.dumps(floats)} (export writes model.int8.onnx)")
    if recommended.get("backend", "tvm") == "ort":
        return (f"Ship trial {trial} with ONNX Runtime: quantize_static with nodes_to_exclude={json.dumps(floats)} "
                "(export writes model.int8.onnx)")
    return f"Ship trial {trial}, the TVM library (export writes model.so)"


def report_html(data: ReportData, png: bytes) -> str:
    figures = [pareto_figure(data), _history_figure(data)]
    if len(data.front):
        figures.append(_layer_map_figure(data))
    if data.sensitivity is not None:
        sensitivity = _sensitivity_figure(data)
        if sensitivity is not None:
            figures.append(sensitivity)
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0), default_width="100%")
             for i, fig in enumerate(figures)]
    done = data.trials[data.trials["state"] == "COMPLETE"] if len(data.trials) else data.trials
    failed = data.trials[data.trials["state"] == "FAIL"] if len(data.trials) else data.trials
    rec = data.recommended
    if rec is not None:
        latency = rec["remeasured_median_ms"] if rec.get("remeasured_median_ms") else rec["latency_ms"]
        speedups = ", ".join(f"{rec[k]:.2f}× vs {k.removeprefix('speedup_vs_').replace('_', ' ')}"
                             for k in ("speedup_vs_ort_float", "speedup_vs_ort_int8") if k in rec and rec[k])
        bf16 = _bf16_of(rec)
        floats = [layer for layer in json.loads(rec["float_layers"]) if layer not in bf16]
        bf16_part = f"; {len(bf16)} bf16 conv{'s' if len(bf16) != 1 else ''}: {html.escape(', '.join(bf16))}" \
            if bf16 else ""
        summary = (f"<p class='rec'><b>{html.escape(ship_line(rec))}</b>: {latency:.3f} ms "
                   f"({speedups or 'no ORT baseline measured'}), {data.metric} {rec[data.metric]:.4g}"
                   f"{f' (goal {data.goal:g})' if data.goal is not None else ''}; "
                   f"{len(floats)} float conv{'s' if len(floats) != 1 else ''}: "
                   f"{html.escape(', '.join(floats) or ('none' if bf16 else 'none (all int8)'))}{bf16_part}. "
                   f"It is the knee of the feasible front: "
                   f"the plan where more speed starts to cost the most fidelity.</p>")
    elif data.ship_baseline is not None:
        which = "TVM plan" if _backends(data) == ["tvm"] else "plan"
        summary = (f"<p class='rec'><b>Ship {html.escape(data.ship_baseline)}; no {which} beats it here.</b> "
                   f"Every plan on the front is slower than it at equal or worse {data.metric}"
                   f"{', or slower while it meets the goal' if data.goal is not None else ''}.</p>")
    else:
        summary = "<p class='rec'><b>No feasible plan yet.</b></p>"
    commands = "".join(f"<dt>{html.escape(k)}</dt><dd><code>{html.escape(v)}</code></dd>"
                       for k, v in data.commands.items())
    baselines = ", ".join(f"{k.removesuffix('_ms').replace('_', ' ')} {v:.3f} ms" for k, v in data.baselines.items()
                          if k.endswith("_ms") and not k.endswith("iqr_ms")) or "not measured"
    for name in ("ort_int8", "openvino", "openvino_f32"):
        fidelity = data.baselines.get(f"{name}_{data.metric}")
        if fidelity is not None:
            baselines += f" ({_BASELINE_LABELS[name]} {data.metric} {fidelity:.4g})"
    metric_columns = [c for c in ("top1", "top5", "cosine", "sqnr_db", "nmse", "max_abs_error") if c in data.front]
    table = (_table(data.front, ["trial", "backend", "latency_ms", "latency_iqr_ms", "remeasured_median_ms", "remeasured_iqr_ms",
                                *metric_columns, "speedup_vs_ort_float", "speedup_vs_ort_int8",
                                "speedup_vs_openvino", "verdict",
                                "float_count", "float_layers", "bf16_count", "bf16_layers"])
             if len(data.front) else "<p>empty</p>")
    failures = _table(failed, ["trial", "backend", "plan", "verdict", "fail_reason"]) if len(failed) else "<p>none</p>"
    checked = _verdict_counts(data.trials)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>precsearch: {html.escape(data.study_name)}</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1200px}} .rec{{font-size:1.15em;background:#eef6ee;
padding:10px}} code{{background:#f4f4f4;padding:2px 4px}} .table{{border-collapse:collapse;font-size:0.85em}}
.table td,.table th{{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right}} dt{{font-weight:bold}}</style>
</head><body>
<h1>precsearch report: {html.escape(data.study_name)}</h1>
<p>model <code>{html.escape(data.model)}</code>; runtimes: {html.escape(", ".join(_RUNTIME[b] for b in _backends(data)))}; fidelity metric <b>{html.escape(data.metric)}</b> against ONNX
Runtime float; {len(done)} completed trials ({done['plan'].nunique() if len(done) else 0} distinct plans),
{len(failed)} failed; baselines: {html.escape(baselines)}.</p>
<p>{html.escape(checked)}</p>
{summary}
<h2>Commands</h2><dl>{commands}</dl>
<h2>Latency against fidelity</h2>
<img alt="Pareto front" src="data:image/png;base64,{base64.b64encode(png).decode()}">
{''.join(f'<div class="figure">{part}</div>' for part in parts)}
<h2>The Pareto front</h2>{table}
<h2>Failed trials</h2>{failures}
</body></html>
"""


def write_report(data: ReportData, out_dir: str | Path) -> dict[str, Path]:
    """Write every report file into ``out_dir``; returns them by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in ("trials.csv", "pareto.csv", "pareto.png", "pareto.html", "report.html")}
    atomic_write(files["trials.csv"], data.trials.to_csv(index=False))
    atomic_write(files["pareto.csv"], data.front.to_csv(index=False))
    png = pareto_png(data)
    atomic_write(files["pareto.png"], png)
    atomic_write(files["pareto.html"], pareto_figure(data).to_html(include_plotlyjs=True, full_html=True))
    atomic_write(files["report.html"], report_html(data, png))
    logger.info("report: %d trials, %d on the front, written to %s", len(data.trials), len(data.front), out)
    return files
