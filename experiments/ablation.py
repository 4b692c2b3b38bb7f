"""Each speed lever on its own, off and on, against ONNX Runtime float measured in the same process.

Levers measured (batch 1, 2 threads, the packaged image the search times on):

* ``conv_backend``: float convs on TIR kernels vs on oneDNN primitives (bias and
  activation fused), all-float plan and all-int8 plan;
* ``parallel_fallback``: kernels without a tuning record as TVM leaves them (one
  serial loop nest) vs with their outer spatial loops parallel;
* ``tvm_threads``: the oneDNN all-float build with TVM's own pool at 1 vs 2 threads;
* ``onednn_int8``: all-int8 convs on TIR vs on oneDNN's u8 × s8 primitives (requantization inside);
* ``fallback_inline``: the fallback schedule with each op of a fused kernel in its own loop nest vs
  producers inlined (one pass over memory);
* ``activation_layout``: activations blocked (NCHW<b>c, oneDNN's int8 kernels behind two reorders each) vs NHWC
  (every conv in oneDNN's native layout; the default where every conv runs on oneDNN);
* ``onednn_int8_activation``: the dequantize → activation → quantize after each int8 conv as TIR kernels vs as
  post-ops of the conv's oneDNN primitive;
* ``fast_sigmoid``: sigmoids left to TIR through libm ``expf`` per element vs TVM's ``fast_exp``;
* ``onednn_bf16_chains`` (all-bf16 plan, on a CPU with native bf16): every bf16 conv reads and writes float32
  vs bf16 handed from bf16 convs to bf16 convs, through ops that only move values (no float32 tensor, no rounding
  pass between them);
* ``onednn_residual_add`` (all-float and all-bf16 plans, NHWC): a residual ``+ r`` after a conv as its own TIR
  pass vs as a binary post-op of the conv's oneDNN primitive;
* ``onednn_fold_zero_points`` (all-int8): int8 convs with oneDNN's own zero points vs, where oneDNN then runs another kernel,
  without them (input padded with its zero point, compensation in the bias, output zero point as
  post-ops), which oneDNN 3.2 runs on its brgconv kernels;
* ``fallback_partition_selects`` (models with a concat): a concat's vector loop picking its source per element
  vs cut where its inputs meet (each piece a plain vector loop);
* ``onednn_dense`` (models with a MatMul or Gemm of at least 2^18 multiply-adds, e.g. a classifier): the dense layer
  as a TIR matmul vs as a oneDNN primitive (a 1×1 conv on a 1×1 image);
* ``separable_max_pool``: max-pools looping over their whole k×k window vs 1×k then k×1, an SPP block's
  5/9/13 pools as SPPF's chain of 5s (models with a max-pool only);
* environment levers, each setting in a child process (read once, when libgomp
  loads or TVM's pool starts), with ORT float measured in that same process after
  the TVM build ran (threads left spinning would slow it):
  ``omp_wait`` (how oneDNN's OpenMP threads wait between calls), ``tir_thread_pool`` (TIR's parallel loops on
  TVM's own pool vs on oneDNN's OpenMP threads, see ``precsearch/tvm/_openmp_loops.py``), ``tvm_pool_spin``
  (how long TVM's workers spin after a parallel loop), ``tvm_pool_size`` (TVM's
  default pool of half the hardware threads, which ``config_threadpool`` cannot
  enlarge, vs all cores).

Machines differ and this one's speed drifts between processes, so every row holds
the ratio to ORT float measured interleaved with it (rounds of ORT, TVM, ORT, ...;
the median of each side's per-round medians).  TIR kernels use the workdir's
tuning database when there is one (``tuned`` column), else TVM's default schedules.

    python experiments/ablation.py [--models ddddocr-det pplcnet-orientation mobilenetv3-textcls]
                                   [--levers separable_max_pool ...]

``--levers`` measures only the named levers (in-process ones each off, against the default build; environment
ones in their child processes, for the ``--wait-models``).

Writes results/latency/ablation.csv and prints it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2
ROUNDS = 5
# Child-process levers: environment variables read once, when libgomp loads or TVM's pool starts.
ENV_LEVERS = {
    "omp_wait": {"sleep (OMP_WAIT_POLICY=PASSIVE)": {"OMP_WAIT_POLICY": "PASSIVE"},
                 "short spin (GOMP_SPINCOUNT=10000, precsearch's default)": {"GOMP_SPINCOUNT": "10000"},
                 "spin forever (OMP_WAIT_POLICY=ACTIVE)": {"OMP_WAIT_POLICY": "ACTIVE"}},
    "tvm_pool_spin": {"TVM default (300000 rounds)": {"TVM_THREAD_POOL_SPIN_COUNT": "300000"},
                      "1000 rounds (precsearch's default)": {"TVM_THREAD_POOL_SPIN_COUNT": "1000"}},
    "tir_thread_pool": {"TVM's own pool (PRECSEARCH_TIR_POOL=tvm)": {"PRECSEARCH_TIR_POOL": "tvm"},
                        "oneDNN's OpenMP threads (precsearch's default)": {}},
    "tvm_pool_size": {"TVM default (TVM_NUM_THREADS unset: half the hardware threads)": {"TVM_NUM_THREADS": ""},
                      "all cores (precsearch's default)": {}},
}
ENV_NAMES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "TVM_THREAD_POOL_SPIN_COUNT", "TVM_NUM_THREADS", "PRECSEARCH_TIR_POOL")


def _workspace(name: str, workdir: Path):
    from precsearch.model import open_model
    from precsearch.tvm import CompileOptions
    from precsearch.workspace import DataSettings, Workspace

    model, preset = open_model(name)
    return Workspace(model, workdir, DataSettings(data="samples", preset=preset or "imagenet", calibration_batches=8,
                                                  eval_batches=1), CompileOptions(threads=THREADS))


def _interleaved(workspace, built, tvm_threads: int = THREADS, repeats: int = 50) -> tuple[float, float]:
    """(ORT float ms, TVM ms): medians over ROUNDS alternating measurements."""
    from precsearch.measure import measure_onnxruntime
    from precsearch.tvm import measure_library

    inputs = workspace.timing_input
    # An untuned TIR build of the detector runs seconds per inference: fewer runs, same rounds.
    probe_ms = measure_library(built, inputs, threads=tvm_threads, warmup=1, repeats=3).median_ms
    tvm_repeats = int(min(repeats, max(5, 4000 / probe_ms)))
    ort_ms, tvm_ms = [], []
    for _ in range(ROUNDS):
        ort_ms.append(measure_onnxruntime(workspace.model.proto, inputs, backend="ort", threads=THREADS,
                                          repeats=repeats).median_ms)
        tvm_ms.append(measure_library(built, inputs, threads=tvm_threads, warmup=min(10, tvm_repeats),
                                      repeats=tvm_repeats).median_ms)
    return float(np.median(ort_ms)), float(np.median(tvm_ms))


def _row(model: str, lever: str, setting: str, plan: str, ort_ms: float, tvm_ms: float, built, tuned: bool) -> dict:
    return {"model": model, "lever": lever, "setting": setting, "plan": plan, "tvm_ms": round(tvm_ms, 3),
            "ort_float_ms": round(ort_ms, 3), "vs_ort_float": round(tvm_ms / ort_ms, 3),
            "onednn_convs": len(built.onednn_kernels), "tuned": tuned}


def in_process_levers(name: str, workdir: Path, only: set[str] | None = None) -> list[dict]:
    """Every in-process lever of ``name``'s all-float, all-int8 and (on a bf16 CPU) all-bf16 builds, or just those
    in ``only``."""
    from precsearch.model.plan import Plan
    from precsearch.tvm import bf16_unsupported_reason

    workspace = _workspace(name, workdir)
    model = workspace.model
    tuned = workspace.database is not None
    rows = []
    plans = {"all-float": Plan(frozenset(model.capable_ids())), "all-int8": Plan(frozenset())}
    if not bf16_unsupported_reason(workspace.options):  # bf16 convs are oneDNN's: no TIR row for them
        plans["all-bf16"] = Plan(frozenset(model.capable_ids()), bf16_ids=frozenset(model.capable_ids()))
    for plan_name, plan in plans.items():
        tir = plan_name != "all-bf16" and (only is None or "conv_backend" in only)
        for conv_backend in ("tir", "onednn") if tir else ("onednn",):
            print(f"  {name} {plan_name} conv_backend={conv_backend}: building...", flush=True)
            built = workspace.build(plan, options=replace(workspace.options, conv_backend=conv_backend)).built
            ort_ms, tvm_ms = _interleaved(workspace, built)
            rows.append(_row(name, "conv_backend", conv_backend, plan_name, ort_ms, tvm_ms, built, tuned))
            if conv_backend == "onednn" and (only is None or "parallel_fallback" in only):
                # untuned TIR kernels: serial (TVM's default) vs parallel outer loops
                serial = workspace.build(plan, options=replace(workspace.options, parallel_fallback=False)).built
                ort_ms, tvm_ms = _interleaved(workspace, serial)
                rows.append(_row(name, "parallel_fallback", "off (TVM's serial default)", plan_name, ort_ms, tvm_ms,
                                 serial, tuned))
            if conv_backend == "onednn":  # each lever off, the rest as precsearch builds by default
                levers = {"fallback_inline": {"fallback_inline": False}, "fast_sigmoid": {"fast_sigmoid": False},
                          "activation_layout": {"activation_layout": "blocked"}}
                if any(node.op_type == "Concat" for node in model.proto.graph.node):
                    levers["fallback_partition_selects"] = {"fallback_partition_selects": False}
                if plan_name == "all-int8":
                    levers["onednn_int8"] = {"onednn_int8": False}
                    levers["onednn_int8_activation"] = {"onednn_int8_activation": False}
                    levers["onednn_fold_zero_points"] = {"onednn_fold_zero_points": False}
                if plan_name == "all-bf16":
                    levers["onednn_bf16_chains"] = {"onednn_bf16_chains": False}
                if plan_name != "all-int8":
                    levers["onednn_residual_add"] = {"onednn_residual_add": False}
                if any(node.op_type == "MaxPool" for node in model.proto.graph.node):
                    levers["separable_max_pool"] = {"separable_max_pool": False}
                if any(node.op_type in ("MatMul", "Gemm") for node in model.proto.graph.node):
                    levers["onednn_dense"] = {"onednn_dense": False}
                levers = {lever: off for lever, off in levers.items() if only is None or lever in only}
                for lever, off in levers.items():
                    print(f"  {name} {plan_name} {lever} off: building...", flush=True)
                    without = workspace.build(plan, options=replace(workspace.options, **off)).built
                    ort_ms, tvm_ms = _interleaved(workspace, without)
                    rows.append(_row(name, lever, "off", plan_name, ort_ms, tvm_ms, without, tuned))
                    rows.append({**rows[-1], "setting": "on (default)", **_on_row(rows, name, plan_name)})
            if plan_name == "all-float" and conv_backend == "onednn" and (only is None or "tvm_threads" in only):
                for threads in (1, 2):
                    ort_ms, tvm_ms = _interleaved(workspace, built, tvm_threads=threads)
                    rows.append(_row(name, "tvm_threads", str(threads), plan_name, ort_ms, tvm_ms, built, tuned))
            print(f"    {rows[-1]}", flush=True)
    return rows


def _on_row(rows: list[dict], name: str, plan_name: str) -> dict:
    """The default build's figures (the conv_backend=onednn row of this plan), for a lever's "on" row."""
    default = next(r for r in rows if r["model"] == name and r["plan"] == plan_name and r["lever"] == "conv_backend"
                   and r["setting"] == "onednn")
    return {key: default[key] for key in default if key not in ("lever", "setting")}


def env_child(name: str, workdir: Path, lever: str, setting: str) -> None:
    from precsearch.model.plan import Plan

    workspace = _workspace(name, workdir)
    built = workspace.build(Plan(frozenset(workspace.model.capable_ids())),
                            options=replace(workspace.options, conv_backend="onednn")).built
    ort_ms, tvm_ms = _interleaved(workspace, built)
    print("ROW " + json.dumps(_row(name, lever, setting, "all-float", ort_ms, tvm_ms, built,
                                   workspace.database is not None)), flush=True)


def env_levers(name: str, workdir: Path, only: set[str] | None = None) -> list[dict]:
    rows = []
    for lever, settings in ENV_LEVERS.items():
        if only is not None and lever not in only:
            continue
        for setting, env in settings.items():
            print(f"  {name} {lever}={setting}: child process...", flush=True)
            child_env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
            # an empty value means "unset": TVM's own default; the precsearch default is set on import
            child_env.update({k: v for k, v in env.items() if v})
            if env.get("TVM_NUM_THREADS") == "":
                child_env["PRECSEARCH_KEEP_TVM_DEFAULT_THREADS"] = "1"
            child = subprocess.run([sys.executable, __file__, "--child", name, "--workdir", str(workdir), "--lever",
                                    lever, "--setting", setting], env=child_env, capture_output=True, text=True,
                                   check=True)
            rows += [json.loads(line[4:]) for line in child.stdout.splitlines() if line.startswith("ROW ")]
            print(f"    {rows[-1]}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["pplcnet-orientation", "mobilenetv3-textcls", "ddddocr-det"])
    parser.add_argument("--workdir", type=Path, default=ROOT / "precsearch-work")
    parser.add_argument("--wait-models", nargs="*", default=["pplcnet-orientation", "mobilenetv3-textcls"],
                        help="models for the environment levers (one child process and build per setting)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "latency" / "ablation.csv")
    parser.add_argument("--levers", nargs="+", default=None,
                        help="levers to measure, in-process or environment ones (default: all)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lever", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--setting", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        if os.environ.get("PRECSEARCH_KEEP_TVM_DEFAULT_THREADS"):
            import tvm  # noqa: F401 — TVM's pool before precsearch sets TVM_NUM_THREADS
            tvm.get_global_func("runtime.NumThreads")()  # starts the pool with TVM's default size
        env_child(args.child, args.workdir, args.lever, args.setting)
        return
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        rows += in_process_levers(name, args.workdir, set(args.levers) if args.levers else None)
        env_only = set(args.levers) & set(ENV_LEVERS) if args.levers else None
        if name in args.wait_models and (env_only is None or env_only):
            rows += env_levers(name, args.workdir, env_only)
        pd.DataFrame(rows).to_csv(out, index=False)  # after each model: a killed run keeps what it measured
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
