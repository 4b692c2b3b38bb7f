"""Side by side, in one ``precsearch bench`` run: the fastest TVM and ONNX Runtime mixed plans of a ``--backend both`` study.

Reads the study's ``trials.csv``, takes per runtime the fastest completed mixed plan (some convs int8, some float)
whose metric meets the goal, and benches both as TVM builds and as ORT sessions beside ORT float, ORT int8
(``quantize_static``), TVM all-float and TVM all-int8:

    python experiments/bench_both.py mobilenetv3-textcls results/both/mobilenetv3-textcls/trials.csv top1 0.9 \\
        results/both/mobilenetv3-textcls/bench.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("trials_csv", type=Path)
    parser.add_argument("metric")
    parser.add_argument("goal", type=float)
    parser.add_argument("out", type=Path)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    trials = pd.read_csv(args.trials_csv)
    trials = trials[trials.state == "COMPLETE"]
    plans = {}
    for backend in ("tvm", "ort"):
        mixed = trials[(trials.backend == backend) & (trials[args.metric] >= args.goal) & (trials.float_count > 0)
                       & (trials.int8_convs > 0)]
        if len(mixed):
            row = mixed.sort_values("latency_ms").iloc[0]
            plans[backend] = (int(row.trial), json.loads(row.float_layers))
    command = [sys.executable, "-m", "precsearch", "bench", args.model, "--backend", "both", "--repeats",
               str(args.repeats), "--json", "--workdir", str(ROOT / "precsearch-work" / f"bench-{args.model}")]
    for _, layers in plans.values():
        command += ["--plan", ",".join(layers)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"bench exited {result.returncode}")
    payload = json.loads(result.stdout)
    payload["plans_from_trials"] = {b: {"trial": trial, "float_layers": layers} for b, (trial, layers) in plans.items()}
    args.out.write_text(json.dumps(payload, indent=1))
    for row in payload["rows"]:
        print(f"{row['name']:<20} {row['median_ms']:>9.3f} ms  {row['vs_ort_float']:.2f}x ORT float")


if __name__ == "__main__":
    main()
