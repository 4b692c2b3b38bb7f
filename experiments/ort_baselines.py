"""What ONNX Runtime gives a user on each packaged model, measured side by side in one run.

    python experiments/ort_baselines.py [MODEL ...] [--repeats N]

Per model, on the same packaged image, batch 1, 2 threads: ORT float; ORT int8 as
``quantize_static`` makes it with its defaults and ``per_channel=True`` (the
baseline precsearch compares with); and ORT on precsearch's own Conv-only QDQ
model (what earlier results called "ORT int8").  Also the top-1 agreement of
each int8 model with ORT float on 32 packaged images that calibration did not
use.  Writes ``results/latency/ort-baselines.csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    from precsearch.fidelity.metrics import compute_metrics
    from precsearch.fidelity.reference import run_ort
    from precsearch.measure import measure_onnxruntime
    from precsearch.model import PACKAGED_MODELS, open_model
    from precsearch.model.plan import Plan
    from precsearch.workspace import DataSettings, Workspace

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(PACKAGED_MODELS))
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--eval-batches", type=int, default=32)
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        model, preset = open_model(name)
        workspace = Workspace(model, None, DataSettings(preset=preset, calibration_batches=8,
                                                        eval_batches=args.eval_batches))
        evaluation = workspace.eval_batches
        builds = {"ort_float": model.proto,
                  "ort_int8 (quantize_static)": workspace.ort_int8_model,
                  "ort_int8_conv_only": workspace.qdq_model(Plan(frozenset()))}
        reference = workspace.reference
        for build, proto in builds.items():
            latency = measure_onnxruntime(proto, evaluation[0], threads=2, warmup=20, repeats=args.repeats)
            metrics = compute_metrics(reference, run_ort(proto, evaluation, optimized=True)).values
            rows.append({"model": name, "build": build, "median_ms": round(latency.median_ms, 3),
                         "iqr_ms": round(latency.iqr_ms, 3), "top1": metrics.get("top1"),
                         "sqnr_db": metrics.get("sqnr_db")})
            print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    float_ms = frame[frame.build == "ort_float"].set_index("model").median_ms
    frame["vs_ort_float"] = (frame.median_ms / frame.model.map(float_ms)).round(3)
    out = ROOT / "results" / "latency"
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "ort-baselines.csv", index=False)
    print(frame.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
