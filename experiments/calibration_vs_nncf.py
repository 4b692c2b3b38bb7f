"""All-int8 fidelity by calibration recipe, against NNCF's default post-training quantization, on the same data.

The search issue asks whether precsearch's calibration is as good as the anchors':
for every model, the all-int8 model each recipe makes is scored on the search's
default evaluation set (256 packaged-image samples from source images that
calibration never sees) against ONNX Runtime float, with ORT running the QDQ
model, so every row differs only in how the model was quantized:

* ``precsearch`` rows: precsearch's own Conv-only QDQ model (what every TVM plan
  builds from), ORT's calibrators ``minmax`` (the default), ``entropy``,
  ``percentile``, on 8 (default) or 32 calibration samples;
* ``quantize_static``: ONNX Runtime's own tool with its defaults (every op type
  quantized, per-channel weights), the user's int8 baseline;
* ``nncf``: ``nncf.quantize`` on the ONNX model with its defaults (mixed preset:
  symmetric weights, asymmetric activations; fast bias correction on), given
  the same calibration samples.  NNCF is an experiment dependency only
  (``pip install nncf``); without it its rows are skipped with a line saying so.

    python experiments/calibration_vs_nncf.py [--model NAME_OR_ONNX]... [--out results/fidelity/calibration.csv]

EfficientNet-Lite0 is not packaged: `experiments/export_efficientnet_lite0.py`
writes it to ``precsearch-work/models/efficientnet_lite0.onnx``, which is used
when present.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd

from precsearch.fidelity.metrics import compute_metrics
from precsearch.fidelity.reference import run_ort
from precsearch.model import open_model
from precsearch.model.plan import Plan
from precsearch.model.quantize import build_qdq_model, calibrate
from precsearch.workspace import DataSettings, Workspace

ROOT = Path(__file__).resolve().parent.parent
EFFICIENTNET = ROOT / "precsearch-work" / "models" / "efficientnet_lite0.onnx"
DEFAULT_MODELS = ["mobilenetv3-textcls", "pplcnet-orientation"]
EVAL_SAMPLES = 256


def _score(workspace: Workspace, proto, metric: str = "top1") -> dict:
    values = compute_metrics(workspace.reference, run_ort(proto, workspace.eval_batches)).values
    return {key: values.get(key) for key in (metric, f"{metric}_low", f"{metric}_high", "kl_div", "sqnr_db")}


def _nncf_model(model, calibration_batches):
    import nncf

    dataset = nncf.Dataset(calibration_batches)
    return nncf.quantize(model.proto, dataset, subset_size=len(calibration_batches))


def rows_for(spec: str, workdir: Path) -> list[dict]:
    model, preset = open_model(spec, {})
    name = Path(spec).stem if spec.endswith(".onnx") else spec
    rows = []
    for samples in (8, 32):
        workspace = Workspace(model, workdir / name / str(samples),
                              DataSettings(data="samples", preset=preset, calibration_batches=samples,
                                           eval_batches=EVAL_SAMPLES))
        for method in ("minmax", "entropy", "percentile"):
            if samples == 32 and method != "minmax":
                continue
            started = time.perf_counter()
            ranges = calibrate(model, workspace.calibration_batches, method)
            proto = build_qdq_model(model, ranges, Plan(frozenset()))
            rows.append({"model": name, "recipe": f"precsearch {method}", "calibration_samples": samples,
                         **_score(workspace, proto), "time_s": round(time.perf_counter() - started, 1)})
            logging.info("%s", rows[-1])
        started = time.perf_counter()
        rows.append({"model": name, "recipe": "quantize_static (ORT defaults)", "calibration_samples": samples,
                     **_score(workspace, workspace.ort_int8_model), "time_s": round(time.perf_counter() - started, 1)})
        logging.info("%s", rows[-1])
        try:
            started = time.perf_counter()
            proto = _nncf_model(model, workspace.calibration_batches)
        except ImportError:
            logging.warning("nncf is not installed (pip install nncf): its rows are skipped")
            continue
        rows.append({"model": name, "recipe": "nncf.quantize (defaults)", "calibration_samples": samples,
                     **_score(workspace, proto), "time_s": round(time.perf_counter() - started, 1)})
        logging.info("%s", rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "fidelity" / "calibration.csv")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    models = args.model or DEFAULT_MODELS + ([str(EFFICIENTNET)] if EFFICIENTNET.is_file() else [])
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for spec in models for row in rows_for(spec, Path(tmp))]
    frame = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
