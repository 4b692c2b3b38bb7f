"""Latency of tuned TVM builds against ONNX Runtime on the packaged real models.

For each model: tune its kernels (resumes an earlier run in the same workdir),
then measure in one run, on one packaged image, batch 1, 2 threads: ORT float,
ORT int8 (all-int8 QDQ model, optimized session), TVM float, TVM all-int8 and two
mixed plans, with build time per plan; then time every kernel of the tuned
all-int8 and all-float builds and relate conv kernels to this CPU's nominal peak.

Writes results/latency/<model>.csv (one row per build, with the tuning budget and
time) and results/latency/<model>-kernels.csv, and prints a markdown table.

    python experiments/bench_latency.py [--models mobilenetv3-textcls pplcnet-orientation] [--trials 32]
    python experiments/export_efficientnet_lite0.py precsearch-work/models/efficientnet_lite0.onnx  # needs torch
    python experiments/bench_latency.py --models efficientnet-lite0=precsearch-work/models/efficientnet_lite0.onnx
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pandas as pd

from precsearch.jobs.bench import bench
from precsearch.model import open_model
from precsearch.model.plan import Plan, parse_plan
from precsearch.jobs.tune import tune_model
from precsearch.tvm import CompileOptions, profile_kernels
from precsearch.workspace import DataSettings, Workspace

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2
# Nominal peaks of this machine (2 vCPUs of an AMD EPYC Zen 4 at 2.6 GHz): Zen 4 retires
# 64 u8×s8 MACs per cycle per core with vpdpbusd and 16 fp32 FMAs per cycle per core.
# If the two vCPUs are SMT siblings of one core the true peak is half.
CLOCK_GHZ = 2.6
PEAK_INT8_GMACS = 64 * CLOCK_GHZ * THREADS
PEAK_FP32_GMACS = 16 * CLOCK_GHZ * THREADS


def plans_for(model) -> list[tuple[str, Plan]]:
    ids = model.capable_ids()
    return [("first+last float", parse_plan(f"{ids[0]},{ids[-1]}", model)),
            ("every other float", parse_plan(",".join(ids[1::2]), model))]


def kernel_table(model, built, inputs, precision: str) -> pd.DataFrame:
    macs = {layer.index: layer.macs for layer in model.layers}
    rows = []
    for entry in profile_kernels(built, inputs, threads=THREADS, runs=30):
        layer = entry.layer_index
        gmacs = macs[layer] / entry.median_us / 1e3 if layer is not None and entry.median_us > 0 else None
        peak = PEAK_INT8_GMACS if entry.precision == "int8" else PEAK_FP32_GMACS
        rows.append({"build": precision, "kernel": entry.kernel[:120],
                     "layer": model.layers[layer].id if layer is not None else "",
                     "layout": entry.layout or "", "macs": macs.get(layer, 0) if layer is not None else 0,
                     "median_us": round(entry.median_us, 2), "gmac_s": round(gmacs, 2) if gmacs else None,
                     "pct_of_peak": round(100 * gmacs / peak, 1) if gmacs else None})
    frame = pd.DataFrame(rows)
    frame["share_pct"] = (100 * frame["median_us"] / frame["median_us"].sum()).round(1)
    return frame


def run_model(spec: str, trials: int, workdir: Path, repeats: int, tune: bool,
              tune_timeout_s: float | None = None) -> pd.DataFrame:
    # "NAME=PATH" benchmarks an ONNX file under a label (ImageNet preprocessing), e.g. the exported EfficientNet-Lite0
    name, _, file = spec.partition("=")
    model, preset = open_model(file or name)
    preset = preset or "imagenet"
    # Calibrated on the first 8 sample batches, timed on the 9th (the first evaluation batch).
    workspace = Workspace(model, workdir, DataSettings(data="samples", preset=preset, calibration_batches=8,
                                                       eval_batches=1), CompileOptions(threads=THREADS))
    if tune:
        started = time.perf_counter()
        report = tune_model(workspace, trials_per_task=trials, timeout_s=tune_timeout_s,
                            progress=lambda done, total, task, n, elapsed_s: print(
                                f"  [{done}/{total}] {task[:60]} {n} trials, {elapsed_s / 60:.1f} min", flush=True))
        print(f"{name}: tuning run took {(time.perf_counter() - started) / 60:.1f} min "
              f"({'finished' if report.finished else 'stopped at --tune-timeout'})", flush=True)
    summary = json.loads((workspace.database.directory / f"{model.sha256[:16]}.json").read_text())
    inputs = workspace.timing_input
    result = bench(workspace, plans=plans_for(model), threads=THREADS, warmup=20, repeats=repeats,
                   progress=lambda m: print(" ", m, flush=True))
    frame = result.to_frame()
    frame.insert(0, "model", name)
    frame["trials_per_kernel"] = summary["trials_per_task"]
    frame["kernels_tuned"] = summary["tasks"]
    frame["tuning_min"] = round(summary["time_s_total"] / 60, 1)
    out = ROOT / "results" / "latency"
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / f"{name}.csv", index=False)

    profiles = []
    for label, plan in (("int8", Plan(frozenset())), ("float", Plan(frozenset(model.capable_ids())))):
        built = workspace.build(plan).built
        profiles.append(kernel_table(model, built, inputs, label))
    kernels = pd.concat(profiles)
    kernels.to_csv(out / f"{name}-kernels.csv", index=False)
    for label, part in kernels.groupby("build", sort=False):
        print(f"\n{name} {label}: slowest kernels")
        print(part.head(8)[["kernel", "median_us", "share_pct", "gmac_s", "pct_of_peak"]].to_string(index=False))
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenetv3-textcls", "pplcnet-orientation"])
    parser.add_argument("--trials", type=int, default=32, help="MetaSchedule trials per kernel")
    parser.add_argument("--workdir", type=Path, default=ROOT / "precsearch-work")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--no-tune", action="store_true", help="use the database as it is")
    parser.add_argument("--tune-timeout-min", type=float, default=None,
                        help="stop starting new kernels after this many minutes (the rest run untuned)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    timeout_s = args.tune_timeout_min * 60 if args.tune_timeout_min else None
    frames = [run_model(name, args.trials, args.workdir, args.repeats, not args.no_tune, timeout_s)
              for name in args.models]
    table = pd.concat(frames)[["model", "name", "int8_convs", "median_ms", "iqr_ms", "vs_ort_float", "vs_ort_int8",
                               "build_time_s", "trials_per_kernel", "tuning_min"]]
    print()
    print(markdown(table))


def markdown(frame: pd.DataFrame) -> str:
    """A README table (pandas' to_markdown needs tabulate, which this project does not install)."""
    def cell(value):
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
