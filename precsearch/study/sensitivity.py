"""Per-layer sensitivity: what each conv costs in fidelity and saves in latency when int8.

For every int8-capable conv it records the fidelity with only that layer int8
(all others float), the fidelity with only that layer float (all others int8),
where asked the fidelity with only that layer bf16 (all others float32: what
bf16 alone costs it, from ONNX Runtime on the bf16-rounded conv),
and, optionally, the latency saved by that layer being int8: the latency of the
plan with only it float minus the all-int8 latency, both TVM builds
(``latency_saved_ms``) or both ONNX Runtime sessions on ``quantize_static``
models, the layer in ``nodes_to_exclude`` (``ort_latency_saved_ms``), or both.

Fidelity comes from ONNX Runtime running each plan's QDQ model with graph
optimizations disabled: building 2·N TVM plans for it would take far longer, and
TVM builds reproduce that model up to rounding near-ties (see ``crosscheck``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from precsearch.errors import ConfigError
from precsearch.fidelity.metrics import METRICS, compute_metrics
from precsearch.fidelity.reference import run_ort
from precsearch.measure import measure_onnxruntime
from precsearch.study.ort_backend import DISABLED_OPTIMIZERS
from precsearch.model import LoadedModel
from precsearch.model.bf16 import bf16_reference_model
from precsearch.model.plan import Plan
from precsearch.tvm import measure_library
from precsearch.workspace import Workspace

logger = logging.getLogger(__name__)

CSV_NAME = "sensitivity.csv"


@dataclass(frozen=True)
class LayerSensitivity:
    """One conv's row of the sensitivity table."""

    id: str
    index: int
    macs: int
    only_int8: dict[str, float]  # metrics with only this layer int8
    only_float: dict[str, float]  # metrics with only this layer float
    latency_saved_ms: float | None  # latency(only this float) - latency(all int8), TVM builds
    ort_latency_saved_ms: float | None = None  # the same on ONNX Runtime (quantize_static, nodes_to_exclude)
    only_bf16: dict[str, float] | None = None  # metrics with only this layer bf16 (when asked)


def run_sensitivity(workspace: Workspace, *, measure_latency: bool = True,
                    progress: Callable[[int, int, str], None] | None = None,
                    backends: tuple[str, ...] = ("tvm",), bf16: bool = False) -> list[LayerSensitivity]:
    """Sensitivity of every int8-capable conv.

    Parameters
    ----------
    workspace : Workspace
        The model, its calibration, the evaluation inputs (not the calibration
        set) and their float reference outputs; its compile options and tuning
        database build the timed plans.
    measure_latency : bool
        Build and time ``1 + N`` plans on each of ``backends`` (minutes on a real model).
    backends : tuple of str
        ``"tvm"`` (TVM builds) and/or ``"ort"`` (optimized ONNX Runtime
        sessions on ``quantize_static`` models, timed as the search times them).
    progress : callable, optional
        Called as ``progress(done, total, layer_id)``.
    bf16 : bool
        Also score each layer alone in bf16 (one more ONNX Runtime run per layer).
    """
    model = workspace.model
    capable = model.capable_ids()
    if not capable:
        raise ConfigError(f"The model {model.source!r} has no int8-capable conv layers to rank.")
    all_ids = frozenset(capable)

    def fidelity(float_ids) -> dict[str, float]:
        qdq = workspace.qdq_model(Plan(frozenset(float_ids)))
        return compute_metrics(workspace.reference, run_ort(qdq, workspace.eval_batches)).values

    def bf16_fidelity(layer_id) -> dict[str, float]:
        rounded = bf16_reference_model(model.proto, {layer_id})
        return compute_metrics(workspace.reference, run_ort(rounded, workspace.eval_batches)).values

    def latency_ms(float_ids) -> float:
        built = workspace.build(Plan(frozenset(float_ids))).built
        return measure_library(built, workspace.timing_input, threads=workspace.options.threads).median_ms

    def ort_latency_ms(float_ids) -> float:
        proto = workspace.ort_model(Plan(frozenset(float_ids), "ort"))
        return measure_onnxruntime(proto, workspace.timing_input, threads=workspace.options.threads,
                                   disabled_optimizers=DISABLED_OPTIMIZERS).median_ms

    timers = {"tvm": latency_ms, "ort": ort_latency_ms}
    timed = [b for b in ("tvm", "ort") if b in backends] if measure_latency else []
    base = {b: timers[b](()) for b in timed}
    rows = []
    started = time.perf_counter()
    for done, layer_id in enumerate(capable, start=1):
        layer = model.layer(layer_id)
        saved = {b: timers[b]({layer_id}) - base[b] for b in timed}
        rows.append(LayerSensitivity(layer_id, layer.index, layer.macs, fidelity(all_ids - {layer_id}),
                                     fidelity({layer_id}), saved.get("tvm"), saved.get("ort"),
                                     bf16_fidelity(layer_id) if bf16 else None))
        logger.info("sensitivity %d/%d %s (%.0f s)", done, len(capable), layer_id, time.perf_counter() - started)
        if progress is not None:
            progress(done, len(capable), layer_id)
    return rows


def layer_noise(workspace: Workspace, batches: int = 8, *, precision: str = "int8") -> dict[str, float]:
    """Each int8-capable conv's output noise (``nmse`` of the main output) with only it int8 (or only it bf16,
    ``precision="bf16"``, every other conv float32).

    One ONNX Runtime run per layer, on the first ``batches`` evaluation
    batches: the guided estimate's prior, seconds on a small model.
    """
    model = workspace.model
    evaluation = workspace.eval_batches[:batches]
    reference = workspace.reference[:batches]
    all_ids = frozenset(model.capable_ids())
    out = {}
    started = time.perf_counter()
    for layer_id in model.capable_ids():
        if precision == "bf16":
            proto = bf16_reference_model(model.proto, {layer_id})
        else:
            proto = workspace.qdq_model(Plan(all_ids - {layer_id}))
        out[layer_id] = compute_metrics(reference, run_ort(proto, evaluation)).values["nmse"]
    logger.info("%s layer noise of %d convs on %d batches in %.1f s", precision, len(out), len(evaluation),
                time.perf_counter() - started)
    return out


def noise_from_table(workdir: Path, model: LoadedModel, precision: str = "int8") -> dict[str, float] | None:
    """``only_int8.nmse`` (or ``only_bf16.nmse``) of ``<workdir>/sensitivity.csv`` when it covers this model's
    convs, else None."""
    path = Path(workdir) / CSV_NAME
    if not path.is_file():
        return None
    frame = pd.read_csv(path)
    column = f"only_{precision}.nmse"
    if column not in frame or set(frame["id"]) != set(model.capable_ids()):
        return None
    return dict(zip(frame["id"], frame[column].astype(float)))


def to_frame(rows: list[LayerSensitivity], metric: str) -> pd.DataFrame:
    """The table, most sensitive first: worst ``metric`` with only that layer int8 (SQNR breaks ties)."""
    if metric not in METRICS:
        raise ConfigError(f"The 'metric' parameter of sensitivity must be one of {sorted(METRICS)}; "
                          f"got {metric!r} instead.")
    records = []
    for row in rows:
        record = {"id": row.id, "index": row.index, "macs": row.macs, "latency_saved_ms": row.latency_saved_ms}
        if row.ort_latency_saved_ms is not None:
            record["ort_latency_saved_ms"] = row.ort_latency_saved_ms
        record.update({f"only_int8.{k}": v for k, v in row.only_int8.items() if "/" not in k})
        record.update({f"only_float.{k}": v for k, v in row.only_float.items() if "/" not in k})
        if row.only_bf16 is not None:
            record.update({f"only_bf16.{k}": v for k, v in row.only_bf16.items() if "/" not in k})
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    # Top-k agreement ties easily on few samples; SQNR breaks the tie.
    keys = [metric] if metric == "sqnr_db" else [metric, "sqnr_db"]
    keys = [key for key in keys if f"only_int8.{key}" in frame]
    frame = frame.sort_values([f"only_int8.{key}" for key in keys] + ["index"],
                              ascending=[METRICS[key][1] for key in keys] + [True])
    frame.insert(0, "rank", range(1, len(frame) + 1))
    frame.attrs["metric"] = metric
    return frame.reset_index(drop=True)


def write_csv(frame: pd.DataFrame, workdir: Path) -> Path:
    """Write the table where the search looks for it: ``<workdir>/sensitivity.csv``."""
    path = Path(workdir) / CSV_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def most_sensitive(workdir: Path, model: LoadedModel, k: int) -> list[str]:
    """The ``k`` most sensitive layer ids from ``<workdir>/sensitivity.csv`` (the search's seeds).

    Ids the model does not have (a table from another model) are an error, not skipped.
    """
    path = Path(workdir) / CSV_NAME
    frame = pd.read_csv(path)
    known = set(model.capable_ids())
    unknown = [layer_id for layer_id in frame["id"] if layer_id not in known]
    if unknown:
        raise ConfigError(f"The sensitivity table {str(path)!r} names layers this model does not have: "
                          f"{unknown[:5]}; rerun 'precsearch sensitivity'.")
    return list(frame.sort_values("rank")["id"][:k])
