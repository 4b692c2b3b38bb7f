"""Side by side, in one ``precsearch bench`` run: the fastest plan at the goal of a two-state study (int8/float)
and of a three-state one (int8/bf16/float), beside ORT float, ORT int8, OpenVINO's default and f32 builds, TVM
all-float, all-int8 and all-bf16.

Each study's ``trials.csv`` gives the fastest completed plan whose metric meets the goal (its latency as the
search measured it; here all are timed again together):

    python experiments/bench_bf16.py ddddocr-det results/bf16/ddddocr-det/two-state/trials.csv \\
        results/bf16/ddddocr-det/three-state/trials.csv sqnr_db 25 results/bf16/ddddocr-det/bench.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def fastest_at_goal(trials_csv: Path, metric: str, goal: float) -> tuple[int, str] | None:
    """(trial, plan key) of the fastest completed plan whose metric meets ``goal`` (higher is better)."""
    trials = pd.read_csv(trials_csv)
    feasible = trials[(trials.state == "COMPLETE") & (trials[metric] >= goal)]
    if not len(feasible):
        return None
    row = feasible.sort_values("latency_ms").iloc[0]
    return int(row.trial), str(row.plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("two_state_trials", type=Path)
    parser.add_argument("three_state_trials", type=Path)
    parser.add_argument("metric")
    parser.add_argument("goal", type=float)
    parser.add_argument("out", type=Path)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    picked = {name: fastest_at_goal(path, args.metric, args.goal)
              for name, path in (("two_state", args.two_state_trials), ("three_state", args.three_state_trials))}
    command = [sys.executable, "-m", "precsearch", "bench", args.model, "--repeats", str(args.repeats), "--json",
               "--untuned", "--profile", "--workdir", str(ROOT / "precsearch-work" / f"bench-bf16-{args.model}"),
               "--plan", "float:;bf16:all"]
    names = ["all_bf16"]
    for name, found in picked.items():
        if found is not None:
            command += ["--plan", found[1]]
            names.append(f"best_{name}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"bench exited {result.returncode}")
    payload = json.loads(result.stdout)
    payload["plans"] = {f"plan{i}": name for i, name in enumerate(names, start=1)}
    payload["from_trials"] = {name: {"trial": found[0], "plan": found[1]} for name, found in picked.items() if found}
    payload["goal"] = {args.metric: args.goal}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    openvino = next((row["median_ms"] for row in payload["rows"] if row["name"] == "openvino"), None)
    for row in payload["rows"]:
        label = payload["plans"].get(row["name"], row["name"])
        versus = f"  {row['median_ms'] / openvino:.2f}x OpenVINO" if openvino else ""
        print(f"{label:<20} {row['median_ms']:>9.3f} ms  {row['vs_ort_float']:.2f}x ORT float{versus}")


if __name__ == "__main__":
    main()
