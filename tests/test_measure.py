"""Latency measurement: same settings for every backend, numbers summarized the same way."""

import numpy as np
import pytest

import models
from precsearch.tvm import build_plan
from precsearch.errors import ConfigError
from precsearch.measure import measure_onnxruntime, summarize
from precsearch.tvm import measure_library
from precsearch.model import load_model


def test_summarize_median_and_iqr():
    latency = summarize([0.001, 0.002, 0.003, 0.004, 0.005], backend="x", warmup=2, threads=2)
    assert latency.median_ms == pytest.approx(3.0)
    assert latency.iqr_ms == pytest.approx(2.0)
    assert (latency.runs, latency.threads, latency.warmup) == (5, 2, 2)


def test_tvm_and_ort_measured_alike(tmp_path):
    model = load_model(models.save(models.chain_model(), tmp_path, "chain"))
    built = build_plan(model, model.proto, [])
    inputs = {"input": np.ones((1, 8, 16, 16), dtype=np.float32)}
    tvm_latency = measure_library(built, inputs, threads=1, warmup=2, repeats=5)
    ort_latency = measure_onnxruntime(model.proto, inputs, threads=1, warmup=2, repeats=5)
    for latency in (tvm_latency, ort_latency):
        assert latency.median_ms > 0 and latency.iqr_ms >= 0 and latency.runs == 5 and latency.threads == 1
    assert (tvm_latency.backend, ort_latency.backend) == ("tvm", "ort")


def test_bad_settings():
    with pytest.raises(ConfigError, match="'repeats'"):
        measure_onnxruntime(None, {}, repeats=1)


def test_tvm_measurement_leaves_this_threads_cpu_affinity_alone(tmp_path):
    # TVM's thread pool pins the calling thread to one core; ONNX Runtime sessions made
    # afterwards inherited that and ran 4x slower until the affinity was restored.
    import os

    model = load_model(models.save(models.chain_model(), tmp_path, "chain"))
    built = build_plan(model, model.proto, [])
    before = os.sched_getaffinity(0)
    measure_library(built, {"input": np.ones((1, 8, 16, 16), dtype=np.float32)}, threads=2, warmup=1, repeats=3)
    assert os.sched_getaffinity(0) == before


def test_cpu_lock_measures_alone(tmp_path):
    """A measurement waits for every compile holding the lock shared, and compiles wait for it."""
    import multiprocessing
    import time

    from precsearch.measure import CpuLock

    def hold_shared(directory, seconds, started):
        with CpuLock(directory).shared():
            started.set()
            time.sleep(seconds)

    context = multiprocessing.get_context("fork")
    started = context.Event()
    compiler = context.Process(target=hold_shared, args=(tmp_path, 1.0, started))
    compiler.start()
    assert started.wait(10)
    lock = CpuLock(tmp_path)
    with lock.shared():  # a second compile runs beside the first
        pass
    t0 = time.monotonic()
    with lock.exclusive():
        waited_s = time.monotonic() - t0  # the compile held the lock for 1 s after it started
    compiler.join()
    assert waited_s > 0.5


def test_cpu_load_counts_other_processes_not_this_one():
    import time

    from precsearch.measure import CpuLoad

    others, everyone = CpuLoad(), CpuLoad(pids=())
    deadline = time.perf_counter() + 0.6
    while time.perf_counter() < deadline:  # this process keeps one core busy
        pass
    excluded, included = others.others_busy_cores(), everyone.others_busy_cores()
    # Whatever else runs on the machine is in both; this process's busy core only where it is not excluded.
    assert included - excluded > 0.6, (included, excluded)


def test_cpu_load_sees_a_busy_child_process():
    import subprocess
    import sys

    from precsearch.measure import CpuLoad

    load = CpuLoad()
    subprocess.run([sys.executable, "-c", "import time\nt = time.perf_counter()\nwhile time.perf_counter() - t < 1: pass"],
                   check=True)
    assert load.others_busy_cores() > 0.6


class _FakeLoad:
    """CpuLoad whose successive measurements see the loads in ``LOADS``."""

    LOADS: list = []

    def __init__(self, pids=None):
        pass

    def others_busy_cores(self):
        return self.LOADS.pop(0)


def test_a_timing_another_process_overlapped_is_taken_again(monkeypatch):
    from precsearch.measure import _load, time_unloaded

    monkeypatch.setattr(_load, "CpuLoad", _FakeLoad)
    calls = []

    def measure():
        calls.append(len(calls))
        return f"timing {len(calls)}"

    _FakeLoad.LOADS = [0.1]
    assert time_unloaded(measure) == ("timing 1", 0.1) and len(calls) == 1  # quiet: once
    calls.clear()
    _FakeLoad.LOADS = [1.4, 0.2]
    assert time_unloaded(measure) == ("timing 2", 0.2) and len(calls) == 2  # loaded, then quiet
    calls.clear()
    _FakeLoad.LOADS = [0.9, 1.6]
    assert time_unloaded(measure) == ("timing 1", 0.9) and len(calls) == 2  # loaded twice: the less loaded one
