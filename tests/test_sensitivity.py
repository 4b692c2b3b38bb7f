"""Per-layer sensitivity: the deliberately fragile layer ranks first; the CSV is what the search reads."""

import json
import subprocess
import sys

import pandas as pd
import pytest

import models
from precsearch.model.data import image_batches
from precsearch.errors import ConfigError
from precsearch.fidelity.reference import run_ort
from precsearch.model import load_model
from precsearch.model.quantize import calibrate
from precsearch.study.sensitivity import CSV_NAME, most_sensitive, run_sensitivity, to_frame, write_csv
from precsearch.workspace import Workspace


@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    model = load_model(models.save(models.fragile_model(), tmp_path_factory.mktemp("fragile"), "fragile"))
    ranges = calibrate(model, image_batches(model, None, 8))
    batches = image_batches(model, None, 6, offset=8)
    return model, ranges, batches, run_ort(model.proto, batches)


def test_fragile_layer_ranks_most_sensitive(fragile, tmp_path):
    model, ranges, batches, reference = fragile
    workspace = Workspace.in_memory(model, tmp_path, [], batches, ranges=ranges, reference=reference)
    rows = run_sensitivity(workspace, measure_latency=True)
    by_id = {row.id: row for row in rows}
    # conv1 alone int8 wrecks the output; the others alone barely touch it.
    assert by_id["conv1"].only_int8["sqnr_db"] < 15.0
    assert by_id["conv0"].only_int8["sqnr_db"] > 35.0 and by_id["conv2"].only_int8["sqnr_db"] > 35.0
    # ... and keeping only conv1 float recovers almost everything.
    assert by_id["conv1"].only_float["sqnr_db"] > 35.0
    assert by_id["conv0"].only_float["sqnr_db"] < 15.0
    assert all(row.latency_saved_ms is not None for row in rows)
    frame = to_frame(rows, "top1")  # top-1 ties on this tiny classifier; SQNR breaks the tie
    assert list(frame["id"])[0] == "conv1" and list(frame["rank"]) == [1, 2, 3]
    write_csv(frame, tmp_path)
    assert most_sensitive(tmp_path, model, 1) == ["conv1"]
    assert pd.read_csv(tmp_path / CSV_NAME).columns[0] == "rank"


def test_only_this_layer_bf16_sits_between_int8_and_float(fragile, tmp_path):
    model, ranges, batches, reference = fragile
    workspace = Workspace.in_memory(model, tmp_path, [], batches, ranges=ranges, reference=reference)
    rows = run_sensitivity(workspace, measure_latency=False, bf16=True)
    for row in rows:
        # bf16 keeps 8 mantissa bits: far closer to float than int8 (even on the fragile conv1), not exact
        assert row.only_bf16["sqnr_db"] > row.only_int8["sqnr_db"] + 6, row.id
        assert 30.0 < row.only_bf16["sqnr_db"] < 200.0, row.id
    frame = to_frame(rows, "sqnr_db")
    assert {"only_bf16.sqnr_db", "only_bf16.top1"} <= set(frame.columns)
    assert "only_bf16.sqnr_db" not in to_frame(run_sensitivity(workspace, measure_latency=False), "sqnr_db")


def test_a_table_from_another_model_is_refused(fragile, tmp_path):
    model = fragile[0]
    pd.DataFrame({"rank": [1], "id": ["Conv@7"]}).to_csv(tmp_path / CSV_NAME, index=False)
    with pytest.raises(ConfigError, match="Conv@7"):
        most_sensitive(tmp_path, model, 1)


def test_sensitivity_command(tmp_path):
    path = models.save(models.fragile_model(), tmp_path, "fragile")
    result = subprocess.run([sys.executable, "-m", "precsearch", "sensitivity", str(path), "--no-latency",
                             "--metric", "sqnr_db", "--eval-batches", "4", "--json", "--workdir", str(tmp_path / "w")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["metric"] == "sqnr_db"
    assert [row["id"] for row in summary["layers"]][0] == "conv1"
    assert (tmp_path / "w" / CSV_NAME).is_file()
    bad = subprocess.run([sys.executable, "-m", "precsearch", "sensitivity", str(path), "--metric", "accuracy",
                          "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "accuracy" in bad.stderr and "Traceback" not in bad.stderr
