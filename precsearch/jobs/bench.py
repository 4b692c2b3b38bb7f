"""Latency of TVM builds beside ONNX Runtime, measured in one run on the same input.

ONNX Runtime float (the model) and ONNX Runtime int8 as a user makes it
(``quantize_static`` with its defaults, per channel: every op ORT quantizes,
optimized session) are the baselines every ratio is taken against.  ORT running
precsearch's own Conv-only QDQ model is a second, informative row
(``ort_int8_conv_only``).  TVM builds the all-float plan, the all-int8 plan and
any given plans; with the ONNX Runtime backend, each given plan is also (or
only) measured as ``quantize_static`` with its float convs in
``nodes_to_exclude`` (rows ``ort_<name>``; ORT's all-int8 plan is ``ort_int8``).
With ``profile``, each TVM build run here is then profiled kernel by kernel (as ``build --profile``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from precsearch.fidelity.metrics import compute_metrics
from precsearch.fidelity.reference import run_ort
from precsearch.errors import check_int
from precsearch.jobs.build import layer_table, profile_layers
from precsearch.measure import (CpuLoad, CpuLock, Latency, measure_openvino_builds, onnxruntime_session,
                               openvino_missing_reason, time_session)
from precsearch.model.plan import Plan
from precsearch.study.ort_backend import DISABLED_OPTIMIZERS, check_ort_plan
from precsearch.tvm import RpcTarget, measure_library, measure_remote
from precsearch.workspace import Workspace

logger = logging.getLogger(__name__)

ORT_FLOAT, ORT_INT8, TVM_FLOAT, TVM_INT8 = "ort_float", "ort_int8", "tvm_float", "tvm_int8"
ORT_INT8_CONV_ONLY = "ort_int8_conv_only"
# What a profiled TVM row keeps of build's per-layer table: its per-conv columns without the layout transforms.
PROFILE_LAYER_FIELDS = ("id", "dtype", "layout", "backend", "kernel", "kernel_us", "gmac_s")


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
    round_medians_ms: tuple[float, ...] = ()  # each timing round's median (see bench's ``rounds``)


@dataclass
class BenchResult:
    """Every row of one bench run, with the settings they share."""

    rows: list[BenchRow]
    threads: int
    tuned: bool
    remote: str | None
    rounds: int = 1
    profiles: dict[str, dict] = field(default_factory=dict)  # TVM row name → its ``kernels`` and ``layers``
    # Cores other processes kept busy on average while the rounds and the profile ran (the CPU lock keeps out
    # only precsearch's own): from LOADED_CORES up, the figures carry their load.
    others_busy_cores: float | None = None

    def row(self, name: str) -> BenchRow:
        return next(row for row in self.rows if row.name == name)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(row) for row in self.rows])

    def to_dict(self) -> dict:
        names = {row.name for row in self.rows}
        summary = {f"{name}_ms": self.row(name).median_ms if name in names else None
                   for name in (ORT_FLOAT, ORT_INT8, TVM_FLOAT, TVM_INT8)}
        records = json_safe(self.to_frame().to_dict(orient="records"))
        for record in records:
            record.update(self.profiles.get(record["name"], {}))
        summary.update(threads=self.threads, tuned=self.tuned, remote=self.remote, rounds=self.rounds,
                       others_busy_cores=self.others_busy_cores, rows=records)
        return summary


def json_safe(records: list[dict]) -> list[dict]:
    """NaN → None, so the JSON is standard."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in records]


def bench(workspace: Workspace, *, plans: list[tuple[str, Plan]] = (), threads: int = 2, warmup: int = 10,
          repeats: int = 50, rpc: RpcTarget | None = None, progress=None,
          backends: tuple[str, ...] = ("tvm",), conv_backends: tuple[str, ...] | None = None,
          rounds: int = 1, profile: bool = False, lock: CpuLock | None = None) -> BenchResult:
    """Measure ORT float, ORT int8, OpenVINO (where installed), TVM float, TVM all-int8 and ``plans`` (name, plan) on
    the workspace's timing input.

    Parameters
    ----------
    workspace : Workspace
        The model, its calibration, the user's ORT int8 model
        (:func:`precsearch.model.quantize.user_int8_model`) and the tuning
        database applied to every TVM build (untuned builds are far slower).
    rpc : RpcTarget, optional
        Measure the TVM builds on a board through RPC; ONNX Runtime runs here either way.
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
    rounds : int
        Everything is built first, then timed ``rounds`` times in turn, each
        time ``repeats / rounds`` runs per row in a rotated order; a row's
        figure is the median of its rounds' medians.  Why: on a shared 2-core
        machine the speed of the whole machine drifts by 20-30 % over minutes
        (the detector's TVM all-int8 19.6 ms in one bench run, 26.5 in the next,
        on Zen 4), so rows timed one after another compare different machines;
        interleaved, every row sees the same drift.  At most ``repeats // 3``
        rounds (``BenchResult.rounds`` says how many ran).
    profile : bool
        After the last round, time every kernel of each TVM build once (20 runs, the VM's per-call
        hook: :func:`precsearch.jobs.build.profile_layers`); ``BenchResult.profiles`` has, per TVM
        row, ``kernels`` (µs per part) and ``layers`` (per conv: dtype, backend, oneDNN kernel,
        ``kernel_us``, ``gmac_s``).  Builds measured on an RPC board are not profiled: the hook
        times calls in this process.
    """
    check_int(rounds, "rounds", "bench", 1)
    check_int(repeats, "repeats", "bench", 3)
    rounds = min(rounds, repeats // 3)  # at least 3 runs per round for a median; the result says how many
    model = workspace.model
    inputs = workspace.timing_input
    say = progress or (lambda message: None)
    all_int8 = Plan(frozenset())
    rows: list[dict] = []  # each row's fields and its timer, timed in the rounds below
    per_round = dict(threads=threads, warmup=warmup, repeats=repeats // rounds)

    def add(name: str, timer, plan: str, int8_convs: int, build_time_s: float, conv_backend: str = "",
            onednn_convs: int = 0, built=None, **extra) -> None:
        rows.append(dict(timer=timer, built=built, fields=dict(name=name, plan=plan, int8_convs=int8_convs,
                                                  build_time_s=round(build_time_s, 2), conv_backend=conv_backend,
                                                  onednn_convs=onednn_convs, **extra)))

    def ort_timer(proto, **options):
        session = onnxruntime_session(proto, threads=threads, **options)
        return lambda: time_session(session, inputs, backend="ort", **per_round)

    say("preparing ONNX Runtime float and int8...")
    add(ORT_FLOAT, ort_timer(model.proto), "float", 0, 0.0)
    add(ORT_INT8, ort_timer(workspace.ort_int8_model), "quantize_static", len(model.capable_ids()), 0.0)
    add(ORT_INT8_CONV_ONLY, ort_timer(workspace.qdq_model(all_int8)), "int8 (Conv only)", len(model.capable_ids()),
        0.0)
    missing = openvino_missing_reason()
    if missing:
        say(f"OpenVINO rows skipped: {missing}")
    else:
        say("measuring OpenVINO's default and f32 builds (and their outputs)...")
        float_outputs = run_ort(model.proto, [inputs])
        builds = measure_openvino_builds(model.proto, inputs, [inputs], threads=threads, warmup=warmup,
                                         repeats=per_round["repeats"])
        # Each later round compiles both builds again in a child (seconds): OpenVINO may not stay loaded here.
        timers = _openvino_timers(model, inputs, {name: build["latency"] for name, build in builds.items()}, threads,
                                  warmup, per_round["repeats"])
        for name, build in builds.items():
            sqnr = compute_metrics(float_outputs, build["outputs"]).values["sqnr_db"]
            add(name, timers[name], "float model", 0, 0.0, precision=build["precision"], sqnr_db_vs_ort_float=sqnr)
    every_float = Plan(frozenset(model.capable_ids()))
    for name, plan in plans if "ort" in backends else ():
        say(f"quantizing {name} for ONNX Runtime ({len(plan.float_layer_ids(model))} float convs)...")
        started = time.perf_counter()
        ort_plan = plan.on("ort")
        proto = workspace.ort_model(ort_plan)
        if ort_plan.int8_ids(model):
            check_ort_plan(model, proto, ort_plan)
        add(f"ort_{name}", ort_timer(proto, disabled_optimizers=DISABLED_OPTIMIZERS), ort_plan.key(),
            len(plan.int8_ids(model)), time.perf_counter() - started)
    tvm_builds = [(TVM_FLOAT, every_float), (TVM_INT8, all_int8), *plans] if "tvm" in backends else []
    own = workspace.options.conv_backend
    if rpc is not None and "onednn" in (conv_backends or (own,)):
        # The library runs on the board, which has no oneDNN bridge registered: TIR kernels only.
        say("TVM builds for the RPC board keep every conv on TIR (the oneDNN bridge runs only in this process)")
        conv_backends, own = ("tir",), "tir"
    if profile and rpc is not None:
        say("no kernel profile: the TVM builds run on the RPC board, the profiler times calls in this process")
    with tempfile.TemporaryDirectory(prefix="precsearch-bench-") as scratch:
        for index, ((name, plan), conv_backend) in enumerate(
                (build, cb) for build in tvm_builds for cb in (conv_backends or (own,))):
            int8_ids = plan.int8_ids(model)
            name = name if conv_backend == own else f"{name}@{conv_backend}"
            say(f"building {name} ({len(int8_ids)} int8 convs, float convs on {conv_backend})...")
            built = workspace.build(plan, options=replace(workspace.options, conv_backend=conv_backend)).built
            if rpc is None:
                timer = _tvm_timer(built, inputs, per_round)
            else:
                library = built.export_library(Path(scratch) / f"model{index}.so")
                timer = (lambda library=library, names=built.input_names:
                         measure_remote(library, names, inputs, rpc=rpc, **per_round))
            add(name, timer, plan.key(), len(int8_ids), built.build_time_s, conv_backend, len(built.onednn_kernels),
                built=built if rpc is None else None)
        measured: list[list[Latency]] = [[] for _ in rows]
        # The machine's CPU lock, as the search takes it to time: a search building on this machine waits, and
        # this waits for its builds (a profile taken beside another process read 4 ms per kernel, a time slice).
        exclusive = (lock or CpuLock()).exclusive if rpc is None else contextlib.nullcontext
        with exclusive():
            load = CpuLoad()
            for round_index in range(rounds):
                order = list(range(len(rows)))
                order = order[round_index % len(order):] + order[:round_index % len(order)]
                say(f"timing round {round_index + 1}/{rounds}: {len(rows)} rows, {per_round['repeats']} runs each...")
                for row_index in order:
                    measured[row_index].append(rows[row_index]["timer"]())
            # Only now, every round done: profiling between rounds would put its runs into the drift the rounds
            # share.
            profiles = _profile_rows(workspace, rows, measured, threads, say) if profile else {}
            others_busy_cores = round(load.others_busy_cores(), 2)
    results = [BenchRow(**row["fields"], **_combine(latencies)) for row, latencies in zip(rows, measured)]
    ort_float, ort_int8 = results[0].median_ms, results[1].median_ms  # ORT float, the user's ORT int8
    results = [replace(row, vs_ort_float=row.median_ms / ort_float, vs_ort_int8=row.median_ms / ort_int8)
               for row in results]
    return BenchResult(rows=results, threads=threads, tuned=workspace.database is not None,
                       remote=rpc.address if rpc is not None else None, rounds=rounds, profiles=profiles,
                       others_busy_cores=others_busy_cores)


def _profile_rows(workspace: Workspace, rows: list[dict], measured: list[list[Latency]], threads: int,
                  say) -> dict[str, dict]:
    """Each TVM build kept for it (those run here) profiled once, with the TVM pool size its figure was timed with:
    a build with oneDNN convs may have been fastest with TVM's pool at one thread (see ``measure_library``)."""
    profiles = {}
    for row, latencies in zip(rows, measured):
        if row["built"] is None:
            continue
        name = row["fields"]["name"]
        say(f"timing every kernel of {name} (20 runs)...")
        profiles[name] = _profile_build(workspace, row["built"], threads=latencies[-1].tvm_pool_threads or threads)
    return profiles


def _profile_build(workspace: Workspace, built, *, threads: int) -> dict:
    """``kernels`` (µs per part, as ``build --profile``) and ``layers`` (per conv: ``PROFILE_LAYER_FIELDS``) of
    ``built`` on the workspace's timing input; a conv with no kernel of its own has ``kernel_us`` None."""
    model = workspace.model
    layers = layer_table(model, built, tuned=workspace.database is not None)
    kernels = profile_layers(model, built, workspace.timing_input, layers, threads=threads)
    return {"kernels": kernels, "layers": [{key: row.get(key) for key in PROFILE_LAYER_FIELDS} for row in layers]}


def _tvm_timer(built, inputs, per_round: dict):
    """Times a TVM build; the first call picks TVM's pool size (see ``measure_library``), later ones keep it."""
    chosen: list[int] = []

    def timer() -> Latency:
        latency = measure_library(built, inputs, pool_sizes=tuple(chosen) or None, **per_round)
        chosen[:] = [latency.tvm_pool_threads] if latency.tvm_pool_threads else []
        return latency

    return timer


def _openvino_timers(model, inputs, first: dict[str, Latency], threads: int, warmup: int, repeats: int) -> dict:
    """A timer per OpenVINO build.  The first round's figures are the ones measured with the outputs; after that,
    the first of the builds to be asked for times them all again in one child and the others take theirs from it."""
    pending = dict(first)

    def timer(name: str) -> Latency:
        if name not in pending:
            pending.update((other, build["latency"]) for other, build in measure_openvino_builds(
                model.proto, inputs, [], threads=threads, warmup=warmup, repeats=repeats).items())
        return pending.pop(name)

    return {name: (lambda name=name: timer(name)) for name in first}


def _combine(latencies: list[Latency]) -> dict:
    """A row's figure over its rounds: the median of the rounds' medians, their median IQR, every run counted."""
    medians = [latency.median_ms for latency in latencies]
    return dict(backend=latencies[0].backend, median_ms=float(np.median(medians)),
                iqr_ms=float(np.median([latency.iqr_ms for latency in latencies])),
                runs=sum(latency.runs for latency in latencies), threads=latencies[0].threads,
                tvm_pool_threads=latencies[-1].tvm_pool_threads,
                round_medians_ms=tuple(round(m, 4) for m in medians))
