"""Latency of tuned TVM builds against ONNX Runtime on the packaged real models.

For each model: tune its kernels (resumes an earlier run in the same workdir),
then measure in one run, on one packaged image, batch 1, 2 threads: ORT float,
ORT int8 (all-int8 QDQ model, optimized session), TVM float, TVM all-int8 and two
mixed plans, with build time per plan; then time every kernel of the tuned
all-int8 and all-float builds, with each kernel's backend (tir / onednn), and relate conv kernels to
this CPU's nominal peak (derived from /proc/cpuinfo, see nominal_peaks_gmacs).

Writes results/latency/<model>.csv (one row per build, with the tuning budget and
time) and results/latency/<model>-kernels.csv, and prints a markdown table.

    python experiments/bench_latency.py [--models mobilenetv3-textcls pplcnet-orientation ddddocr-det] [--trials 32]
    python experiments/export_efficientnet_lite0.py precsearch-work/models/efficientnet_lite0.onnx  # needs torch
    python experiments/bench_latency.py --models efficientnet-lite0=precsearch-work/models/efficientnet_lite0.onnx
"""

from __future__ import annotations

import argparse
import json
import logging
import re
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


def nominal_peaks_gmacs(threads: int = THREADS) -> tuple[float, float, str]:
    """(u8×s8, fp32) GMAC/s nominal peaks of ``threads`` cores of this CPU, and how they were derived.

    Read off /proc/cpuinfo, never assumed: the clock it reports now, two FMA (or VNNI) ports per core, each as
    wide as the vector datapath (512 bits where AVX-512 runs at full width; Zen 4, AMD family 25, runs it on
    256-bit units), 4 u8×s8 MACs per 32-bit lane with VNNI (vpdpbusd), 2 without.  A vCPU that is an SMT sibling
    halves the true figure.
    """
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set((re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE) or re.search("()", "")).group(1).split())
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.MULTILINE)
    family = re.search(r"^cpu family\s*:\s*(\d+)", text, re.MULTILINE)
    amd = "AuthenticAMD" in text
    clock_ghz = float(mhz.group(1)) / 1000 if mhz else 2.0
    width = 512 if "avx512f" in flags and not (amd and family and int(family.group(1)) == 25) else 256
    fp32_per_cycle = 2 * width // 32
    int8_per_cycle = fp32_per_cycle * (4 if {"avx512_vnni", "avx_vnni"} & flags else 2)
    how = (f"{clock_ghz:.2f} GHz (/proc/cpuinfo), {threads} cores, 2 ports x {width}-bit: {fp32_per_cycle} fp32 "
           f"and {int8_per_cycle} u8xs8 MACs per cycle per core")
    return (int8_per_cycle * clock_ghz * threads, fp32_per_cycle * clock_ghz * threads, how)


PEAK_INT8_GMACS, PEAK_FP32_GMACS, PEAK_DERIVATION = nominal_peaks_gmacs()


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
        rows.append({"build": precision, "kernel": entry.kernel[:120], "backend": entry.backend,
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
    record = workspace.database.directory / f"{model.sha256[:16]}.json" if workspace.database is not None else None
    untuned = {"trials_per_task": 0, "tasks": 0, "time_s_total": 0.0}  # --no-tune without a database
    summary = json.loads(record.read_text()) if record is not None and record.is_file() else untuned
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
    parser.add_argument("--models", nargs="+", default=["mobilenetv3-textcls", "pplcnet-orientation", "ddddocr-det"])
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
