"""Untuned TVM builds against ONNX Runtime on this CPU, every packaged real model, one run each.

What a user gets on a fresh machine before any tuning: ORT float, ORT int8 as
``quantize_static`` builds it, ORT on precsearch's Conv-only QDQ model, TVM
all-float and TVM all-int8 (convs on oneDNN where it has a kernel: float always,
int8 where the CPU has VNNI), batch 1, 2 threads, median of 200 runs after 20
warm-up runs, all measured side by side in one process per model.  The CPU is
detected (model name and the ISA extensions that decide the kernels), never
assumed, and written beside the numbers.

    python experiments/bench_this_cpu.py [--models mobilenetv3-textcls pplcnet-orientation ddddocr-det]

Writes results/latency/this-cpu/<cpu tag>/<model>.csv and cpu.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
from pathlib import Path

from precsearch.jobs.bench import bench
from precsearch.model import open_model
from precsearch.tvm import CompileOptions
from precsearch.workspace import DataSettings, Workspace

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2
# The extensions that decide which oneDNN / TIR kernels a build gets.
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_description() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    family = re.search(r"^cpu family\s*:\s*(\d+)$", text, re.MULTILINE)
    present = set(flags.group(1).split()) if flags else set()
    return {"model_name": model.group(1).strip() if model else platform.processor(),
            "cpu_family": int(family.group(1)) if family else None,
            "features": [f for f in FEATURES if f in present]}


def cpu_tag(cpu: dict) -> str:
    """A folder name: the vendor's model name, slugged, its CPU family, and the widest int8 path.

    The family is there because virtual machines report Zen 4 (family 25) and Zen 5 (26) alike as "AMD EPYC"."""
    name = re.sub(r"[^a-z0-9]+", "-", cpu["model_name"].lower()).strip("-")
    family = f"-family{cpu['cpu_family']}" if cpu.get("cpu_family") is not None else ""
    isa = "amx" if "amx_int8" in cpu["features"] else "vnni" if "avx512_vnni" in cpu["features"] else "avx2"
    return f"{name}{family}-{isa}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenetv3-textcls", "pplcnet-orientation", "ddddocr-det"])
    parser.add_argument("--workdir", type=Path, default=ROOT / "precsearch-work" / "bench-this-cpu")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cpu = cpu_description()
    out = ROOT / "results" / "latency" / "this-cpu" / cpu_tag(cpu)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu.json").write_text(json.dumps(cpu, indent=2) + "\n")
    for name in args.models:
        model, preset = open_model(name)
        # Calibrated on the first 8 sample batches, timed on the first evaluation batch, as bench_latency.py does.
        workspace = Workspace(model, args.workdir / name,
                              DataSettings(data="samples", preset=preset or "imagenet", calibration_batches=8,
                                           eval_batches=1), CompileOptions(threads=THREADS), untuned=True)
        result = bench(workspace, threads=THREADS, warmup=20, repeats=args.repeats,
                       progress=lambda message: print(" ", name, message, flush=True))
        frame = result.to_frame()
        frame.insert(0, "model", name)
        frame.to_csv(out / f"{name}.csv", index=False)
        print(frame[["model", "name", "int8_convs", "onednn_convs", "median_ms", "iqr_ms", "vs_ort_float",
                     "vs_ort_int8"]].to_string(index=False), flush=True)


if __name__ == "__main__":
    main()
