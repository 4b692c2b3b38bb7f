"""Every packaged model, five plans each: does it build, how, and does it agree with ONNX Runtime?

    python experiments/zoo.py [MODEL ...] [--out results/zoo] [--check-batches N]

For each model and each of :func:`precsearch.model.plan.standard_plans` (all-float,
all-int8, alternating, first+last float, a seeded random mix) it builds the plan
untuned, runs it on packaged images that calibration did not use, and checks it as
``build --check`` does.  One row per (model, plan) goes to ``zoo.csv``; a model
whose rows are already there is skipped, so a killed run resumes.  The slow tests
in tests/test_zoo.py run the same function and assert on it.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

FIELDS = ["model", "plan", "int8_convs", "float_convs", "build_time_s", "boundary_transforms", "blocked_convs",
          "rewritten", "nchw_fallback_ops", "layout_fallback", "max_relative_error", "agreement",
          "ort_int8_agreement", "verdict", "summary"]


def main(argv=None) -> int:
    from precsearch.jobs.doctor import check_standard_plans
    from precsearch.model import PACKAGED_MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(PACKAGED_MODELS))
    parser.add_argument("--out", type=Path, default=Path("results/zoo"))
    parser.add_argument("--check-batches", type=int, default=2)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / "zoo.csv"
    done = []
    if table.exists():
        with table.open() as handle:
            done = list(csv.DictReader(handle))
    for name in args.models:
        if any(row["model"] == name for row in done):
            print(f"{name}: already in {table}, skipped", flush=True)
            continue
        done.extend(check_standard_plans(name, args.check_batches, progress=lambda line: print(line, flush=True)))
        with table.open("w", newline="") as handle:  # rewritten after every model: a killed run loses one
            writer = csv.DictWriter(handle, FIELDS)
            writer.writeheader()
            writer.writerows(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
