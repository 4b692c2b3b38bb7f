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
