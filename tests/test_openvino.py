"""OpenVINO as a baseline: its default and float32 builds, their fidelity against ORT float, the rows and
points bench and the report add, and the one line when it is not installed."""

import numpy as np
import pytest

import models
from precsearch.fidelity.metrics import compute_metrics
from precsearch.fidelity.reference import run_ort
from precsearch.measure import CpuLock, OpenVinoModel, openvino_missing_reason
from precsearch.model import load_model
from precsearch.model.data import image_batches
from precsearch.study import ort_backend
from precsearch.tvm import CompileOptions, bf16_unsupported_reason
from precsearch.workspace import Workspace


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    model = load_model(models.save(models.chain_model(channels=(16, 32, 32, 32), size=16, seed=2),
                                   tmp_path_factory.mktemp("ov"), "chain"))
    batches = image_batches(model, None, count=4)
    return model, batches, run_ort(model.proto, batches)


def test_openvino_is_installed_by_the_test_extra():
    assert openvino_missing_reason() == ""


def test_the_float32_build_is_float_and_the_default_one_is_bf16_where_the_cpu_has_it(chain):
    model, batches, reference = chain
    f32 = OpenVinoModel(model.proto, threads=2, precision="f32")
    assert f32.precision == "f32"
    assert compute_metrics(reference, [f32.run(b) for b in batches]).values["sqnr_db"] > 90
    default = OpenVinoModel(model.proto, threads=2)
    sqnr = compute_metrics(reference, [default.run(b) for b in batches]).values["sqnr_db"]
    if default.precision == "bf16":  # OpenVINO's default on AVX512-BF16 / AMX: 8 mantissa bits, not exact
        assert 25 < sqnr < 80
    else:
        assert default.precision == "f32" and sqnr > 90
    # OpenVINO infers bf16 only where the CPU has it, the machine fact precsearch's own bf16 builds go by
    if default.precision == "bf16":
        assert bf16_unsupported_reason(CompileOptions()) == ""
    latency = default.time(batches[0], warmup=2, repeats=5)
    assert latency.backend == "openvino" and latency.runs == 5 and latency.median_ms > 0


def test_the_search_baselines_hold_both_builds_with_their_fidelity(chain, tmp_path):
    model, batches, reference = chain
    workspace = Workspace.in_memory(model, tmp_path, [], batches, reference=reference)
    out = ort_backend.measure_openvino_baselines(workspace, "sqnr_db", warmup=1, repeats=3, lock=CpuLock(tmp_path))
    assert set(out) == {f"{name}_{key}" for name in ("openvino", "openvino_f32")
                        for key in ("ms", "iqr_ms", "sqnr_db", "precision")}
    assert out["openvino_f32_precision"] == "f32" and out["openvino_f32_sqnr_db"] > 90
    assert out["openvino_ms"] > 0 and np.isfinite(out["openvino_sqnr_db"])


def test_without_openvino_the_baselines_are_skipped_with_one_line(chain, tmp_path, monkeypatch, caplog):
    model, batches, reference = chain
    monkeypatch.setattr(ort_backend, "openvino_missing_reason", lambda: "openvino is not installed (pip install "
                                                                        "'precsearch[openvino]')")
    workspace = Workspace.in_memory(model, tmp_path, [], batches, reference=reference)
    with caplog.at_level("WARNING"):
        assert ort_backend.measure_openvino_baselines(workspace, "sqnr_db", warmup=1, repeats=3,
                                                      lock=CpuLock(tmp_path)) == {}
    assert [r.getMessage() for r in caplog.records] == [
        "OpenVINO baselines skipped: openvino is not installed (pip install 'precsearch[openvino]')"]
