"""Latency of TVM builds beside ONNX Runtime, measured in one run on the same input.

ONNX Runtime float (the model) and ONNX Runtime int8 as a user makes it
(``quantize_static`` with its defaults, per channel: every op ORT quantizes,
optimized session) are the baselines every ratio is taken against.  ORT running
precsearch's own Conv-only QDQ model is a second, informative row
(``ort_int8_conv_only``).  TVM builds the all-float plan, the all-int8 plan and
any given plans; with the ONNX Runtime backend, each given plan is also (or
only) measured as ``quantize_static`` with its float convs in
``nodes_to_exclude`` (rows ``ort_<name>``; ORT's all-int8 plan is ``ort_int8``).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from precsearch.fidelity.metrics import compute_metrics
from precsearch.fidelity.reference import run_ort
from precsearch.measure import Latency, measure_onnxruntime, measure_openvino_builds, openvino_missing_reason
from precsearch.model.plan import Plan
from precsearch.study.ort_backend import DISABLED_OPTIMIZERS, check_ort_plan
from precsearch.tvm import RpcTarget, measure_library, measure_remote
from precsearch.workspace import Workspace

logger = logging.getLogger(__name__)

ORT_FLOAT, ORT_INT8, TVM_FLOAT, TVM_INT8 = "ort_float", "ort_int8", "tvm_float", "tvm_int8"
ORT_INT8_CONV_ONLY = "ort_int8_conv_only"


@dataclass(frozen=True)
class BenchRow:
    """One measured build."""

    name: str
    backend: str
    plan: str
    int8_convs: int
    median_ms: float
    iqr_ms: float
    runs: int
    threads: int
    build_time_s: float
    vs_ort_float: float = math.nan
    vs_ort_int8: float = math.nan
    conv_backend: str = ""  # TVM rows: where float convs ran ("tir" or "onednn")
    onednn_convs: int = 0
    tvm_pool_threads: int | None = None  # TVM rows: TVM's own pool size the figure was measured with
    precision: str = ""  # OpenVINO rows: the precision it inferred in ("bf16" by default on a CPU with it)
    sqnr_db_vs_ort_float: float = math.nan  # OpenVINO rows: its outputs against ORT float, on the timing input


@dataclass
class BenchResult:
    """Every row of one bench run, with the settings they share."""

    rows: list[BenchRow]
    threads: int
    tuned: bool
    remote: str | None

    def row(self, name: str) -> BenchRow:
        return next(row for row in self.rows if row.name == name)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(row) for row in self.rows])

    def to_dict(self) -> dict:
        names = {row.name for row in self.rows}
        summary = {f"{name}_ms": self.row(name).median_ms if name in names else None
                   for name in (ORT_FLOAT, ORT_INT8, TVM_FLOAT, TVM_INT8)}
        summary.update(threads=self.threads, tuned=self.tuned, remote=self.remote,
                       rows=json_safe(self.to_frame().to_dict(orient="records")))
        return summary


def json_safe(records: list[dict]) -> list[dict]:
    """NaN → None, so the JSON is standard."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in records]


def bench(workspace: Workspace, *, plans: list[tuple[str, Plan]] = (), threads: int = 2, warmup: int = 10,
          repeats: int = 50, rpc: RpcTarget | None = None, progress=None,
          backends: tuple[str, ...] = ("tvm",), conv_backends: tuple[str, ...] | None = None) -> BenchResult:
    """Measure ORT float, ORT int8, OpenVINO (where installed), TVM float, TVM all-int8 and ``plans`` (name, plan) on
    the workspace's timing input.

    Parameters
    ----------
    workspace : Workspace
        The model, its calibration, the user's ORT int8 model
        (:func:`precsearch.model.quantize.user_int8_model`) and the tuning
        database applied to every TVM build (untuned builds are far slower).
    rpc : RpcTarget, optional
        Measure the TVM builds on a remote board; ONNX Runtime runs here either way.
    progress : callable, optional
        ``progress(message)`` before each build or measurement.
    backends : tuple of str
        ``"tvm"``: TVM float, TVM all-int8 and each plan built with TVM;
        ``"ort"``: each plan as ``quantize_static`` with its float convs in
        ``nodes_to_exclude``, in an optimized session (row ``ort_<name>``).
    conv_backends : tuple of str, optional
        Build every TVM row with each of these (``"tir"``, ``"onednn"``), side
        by side; rows of a backend other than the workspace's own are named
        ``<name>@<backend>``.  Default: the workspace's own only.
    """
    model = workspace.model
    inputs = workspace.timing_input
    say = progress or (lambda message: None)
    all_int8 = Plan(frozenset())
    rows: list[BenchRow] = []

    def add(name: str, latency: Latency, plan: str, int8_convs: int, build_time_s: float, conv_backend: str = "",
            onednn_convs: int = 0) -> None:
        rows.append(BenchRow(name=name, backend=latency.backend, plan=plan, int8_convs=int8_convs,
                             median_ms=latency.median_ms, iqr_ms=latency.iqr_ms, runs=latency.runs,
                             threads=latency.threads, build_time_s=round(build_time_s, 2), conv_backend=conv_backend,
                             onednn_convs=onednn_convs, tvm_pool_threads=latency.tvm_pool_threads))

    say("measuring ONNX Runtime float and int8...")
    settings = dict(threads=threads, warmup=warmup, repeats=repeats)
    add(ORT_FLOAT, measure_onnxruntime(model.proto, inputs, backend="ort", **settings), "float", 0, 0.0)
    add(ORT_INT8, measure_onnxruntime(workspace.ort_int8_model, inputs, backend="ort", **settings),
        "quantize_static", len(model.capable_ids()), 0.0)
    add(ORT_INT8_CONV_ONLY, measure_onnxruntime(workspace.qdq_model(all_int8), inputs, backend="ort", **settings),
        "int8 (Conv only)", len(model.capable_ids()), 0.0)
    missing = openvino_missing_reason()
    if missing:
        say(f"OpenVINO rows skipped: {missing}")
    else:
        say("measuring OpenVINO's default and f32 builds...")
        float_outputs = run_ort(model.proto, [inputs])
        builds = measure_openvino_builds(model.proto, inputs, [inputs], threads=threads, warmup=warmup,
                                         repeats=repeats)
        for name, build in builds.items():
            add(name, build["latency"], "float model", 0, 0.0)
            sqnr = compute_metrics(float_outputs, build["outputs"]).values["sqnr_db"]
            rows[-1] = replace(rows[-1], precision=build["precision"], sqnr_db_vs_ort_float=sqnr)
    every_float = Plan(frozenset(model.capable_ids()))
    for name, plan in plans if "ort" in backends else ():
        say(f"quantizing and measuring {name} on ONNX Runtime ({len(plan.float_layer_ids(model))} float convs)...")
        started = time.perf_counter()
        ort_plan = plan.on("ort")
        proto = workspace.ort_model(ort_plan)
        if ort_plan.int8_ids(model):
            check_ort_plan(model, proto, ort_plan)
        quantize_time_s = time.perf_counter() - started
        add(f"ort_{name}", measure_onnxruntime(proto, inputs, backend="ort", disabled_optimizers=DISABLED_OPTIMIZERS,
                                               **settings), ort_plan.key(),
            len(plan.int8_ids(model)), quantize_time_s)
    tvm_builds = [(TVM_FLOAT, every_float), (TVM_INT8, all_int8), *plans] if "tvm" in backends else []
    own = workspace.options.conv_backend
    if rpc is not None and "onednn" in (conv_backends or (own,)):
        # The library runs on the board, which has no oneDNN bridge registered: TIR kernels only.
        say("TVM builds for the RPC board keep every conv on TIR (the oneDNN bridge runs only in this process)")
        conv_backends, own = ("tir",), "tir"
    for (name, plan), conv_backend in ((build, cb) for build in tvm_builds for cb in (conv_backends or (own,))):
        int8_ids = plan.int8_ids(model)
        name = name if conv_backend == own else f"{name}@{conv_backend}"
        say(f"building and measuring {name} ({len(int8_ids)} int8 convs, float convs on {conv_backend})...")
        built = workspace.build(plan, options=replace(workspace.options, conv_backend=conv_backend)).built
        if rpc is None:
            latency = measure_library(built, inputs, **settings)
        else:
            with tempfile.TemporaryDirectory(prefix="precsearch-bench-") as scratch:
                library = built.export_library(Path(scratch) / "model.so")
                latency = measure_remote(library, built.input_names, inputs, rpc=rpc, **settings)
        add(name, latency, plan.key(), len(int8_ids), built.build_time_s, conv_backend, len(built.onednn_kernels))
    ort_float, ort_int8 = rows[0].median_ms, rows[1].median_ms  # ORT float, the user's ORT int8
    rows = [BenchRow(**{**asdict(row), "vs_ort_float": row.median_ms / ort_float,
                        "vs_ort_int8": row.median_ms / ort_int8}) for row in rows]
    return BenchResult(rows=rows, threads=threads, tuned=workspace.database is not None,
                       remote=rpc.address if rpc is not None else None)
