"""How closely TVM builds of int8/float plans follow ONNX Runtime on the same QDQ model.

For each packaged model and a few plans, builds the plan with precsearch and
reports, on the check images, the fraction of output elements within one output
quantization step of ORT running the QDQ model with graph optimizations
disabled (the float-emulated reference), next to the same figure for ORT's own
int8 kernels (its optimized session).  Writes results/agreement/<model>.csv.

    python experiments/agreement.py [--images 24]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from precsearch.fidelity.reference import agreement, run_ort
from precsearch.model import open_model
from precsearch.model.plan import parse_plan
from precsearch.workspace import DataSettings, Workspace

ROOT = Path(__file__).resolve().parent.parent


def plans_for(model) -> dict[str, str]:
    ids = [layer.id for layer in model.layers]
    return {
        "all int8": "none",
        "first and last conv float": f"{ids[0]},{ids[-1]}",
        "every other conv float": ",".join(ids[1::2]),
        "every third conv float": ",".join(ids[0::3]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="check images per model (default 24)")
    parser.add_argument("--models", nargs="+", default=["mobilenetv3-textcls", "pplcnet-orientation"])
    args = parser.parse_args()
    out_dir = ROOT / "results" / "agreement"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        model, preset = open_model(name)
        workspace = Workspace(model, ROOT / "precsearch-work", DataSettings(preset=preset, calibration_batches=8,
                                                                            eval_batches=args.images), untuned=True)
        check, steps = workspace.eval_batches, workspace.steps
        rows = []
        for label, spec in plans_for(model).items():
            plan = parse_plan(spec, model)
            started = time.perf_counter()
            build = workspace.build(plan)
            qdq, built = build.qdq, build.built
            build_s = time.perf_counter() - started
            reference = run_ort(qdq, check)
            tvm = [built.run(batch) for batch in check]
            ort_int8 = run_ort(qdq, check, optimized=True)
            for images in sorted({8, args.images}):
                ours = agreement(reference[:images], tvm[:images], steps)
                theirs = agreement(reference[:images], ort_int8[:images], steps)
                rows.append({"model": name, "plan": label, "int8_convs": len(plan.int8_ids(model)),
                             "images": images, "tvm_agreement": round(ours.fraction, 4),
                             "tvm_max_error_steps": round(ours.max_error_steps, 2),
                             "ort_int8_agreement": round(theirs.fraction, 4),
                             "ort_int8_max_error_steps": round(theirs.max_error_steps, 2),
                             "build_s": round(build_s, 1)})
                print(f"{name:<22} {label:<27} {images:>3} images: TVM {ours.fraction:7.2%} "
                      f"({ours.max_error_steps:5.2f} steps)  ORT int8 {theirs.fraction:7.2%} "
                      f"({theirs.max_error_steps:5.2f} steps)  build {build_s:5.1f} s", flush=True)
        with open(out_dir / f"{name}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
