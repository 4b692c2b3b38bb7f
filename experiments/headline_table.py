"""Print the README's headline tables from the committed ``results/<model>/headline.json`` files.

    python experiments/headline_table.py

The JSON files are written by ``experiments/compare_strategies.py``; this script only formats them, so the
README's numbers are the committed results' numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
ORDER = ("pplcnet-orientation", "mobilenetv3-textcls", "efficientnet-lite0")


def _ms(value) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def main() -> None:
    rows = [json.loads(path.read_text()) for name in ORDER
            if (path := RESULTS / name / "headline.json").is_file()]
    print("| model | convs | ORT float ms | ORT int8 ms (top-1) | TVM all-float ms | TVM all-int8 ms (top-1) | "
          "fastest plan with top-1 ≥ 0.99: ms (float convs) | its speed-up vs ORT float / ORT int8 | "
          "fastest front plan: ms @ top-1 (speed-up vs ORT float / int8) | search: plans, wall min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        best, fastest = row["fastest_meeting_goal"], row["fastest_on_front"]
        plan = f"{_ms(best['latency_ms'])} ({best['float_convs']}/{row['convs']})" if best else "none"
        ratios = f"{best['speedup_vs_ort_float']:.2f}× / {best['speedup_vs_ort_int8']:.2f}×" if best else "–"
        print(f"| {row['model']} | {row['convs']} | {_ms(row['ort_float_ms'])} | {_ms(row['ort_int8_ms'])} "
              f"({row['ort_int8_top1']:.3f}) | {_ms(row['tvm_all_float_ms'])} | {_ms(row['tvm_all_int8_ms'])} "
              f"({row['tvm_all_int8_top1']:.3f}) | {plan} | {ratios} | {_ms(fastest['latency_ms'])} @ "
              f"{fastest['top1']:.3f} ({fastest['speedup_vs_ort_float']:.2f}× / {fastest['speedup_vs_ort_int8']:.2f}×) "
              f"| {row['search_trials']}, {row['search_wall_min']} |")
    print()
    print("| model | strategy | plans | hypervolume (of the bound rectangle) | fastest with top-1 ≥ goal, ms | "
          "build+measure min |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        for entry in row["strategies"]["summary"]:
            print(f"| {row['model']} | {entry['strategy']} | {entry['trials']} | {entry['hypervolume']:.3f} | "
                  f"{_ms(entry['fastest_meeting_goal_ms'])} | {entry['cost_min']} |")
    print()
    for row in rows:
        front = ", ".join(f"{p['latency_ms']:.3f} ms @ {p['top1']:.3f} ({p['float_convs']} float)"
                          for p in row["front"])
        print(f"- {row['model']} front: {front}; kernel bound {row['kernel_bound']['bound_ms']:.3f} ms")


if __name__ == "__main__":
    main()
