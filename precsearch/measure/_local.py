"""Warm-up, repeated runs, median and interquartile range, thread count pinned and recorded."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from ..errors import ConfigError

# TVM's ThreadGroup affinity mode "big cores": every core here is big.
_TVM_AFFINITY_BIG = 1


@dataclass(frozen=True)
class Latency:
    """Latency of one backend on one input, from repeated timed runs."""

    backend: str
    median_ms: float
    iqr_ms: float
    runs: int
    warmup: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(times_s, *, backend: str, warmup: int, threads: int) -> Latency:
    """Median and interquartile range of per-run times (seconds) in milliseconds."""
    times_ms = np.asarray(times_s, dtype=np.float64) * 1e3
    if times_ms.size == 0 or not np.all(np.isfinite(times_ms)):
        raise ValueError(f"no valid timings for {backend}")
    q1, median, q3 = np.percentile(times_ms, [25, 50, 75])
    return Latency(backend=backend, median_ms=float(median), iqr_ms=float(q3 - q1), runs=int(times_ms.size),
                   warmup=warmup, threads=threads)


def _check(threads: int, warmup: int, repeats: int) -> None:
    for name, value, low in (("threads", threads, 1), ("warmup", warmup, 0), ("repeats", repeats, 3)):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"The '{name}' parameter of measure must be an int >= {low}; got {value!r} instead.")


def measure_library(library, inputs: dict[str, np.ndarray], *, threads: int = 2, warmup: int = 10,
                    repeats: int = 50) -> Latency:
    """Latency of a built plan (a :class:`~precsearch.compile.BuiltPlan` or ``LoadedLibrary``).

    Uses the VM's own ``time_evaluator``, so Python overhead is not timed; the
    TVM thread pool is set to ``threads`` first.
    """
    import tvm

    _check(threads, warmup, repeats)
    with tvm_threads(threads):
        vm = library.virtual_machine()
        device = tvm.cpu()
        args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[name]), device) for name in library.input_names]
        for _ in range(warmup):
            vm["main"](*args)
        result = vm.time_evaluator("main", device, number=1, repeat=repeats)(*args)
    return summarize(list(result.results), backend="tvm", warmup=warmup, threads=threads)


@contextlib.contextmanager
def tvm_threads(threads: int):
    """TVM's thread pool set to ``threads`` pinned workers, and this thread's CPU affinity restored after.

    Configuring the pool pins the calling thread to one core, and every thread
    it starts later inherits that: ONNX Runtime sessions created afterwards ran
    their two intra-op threads on one core, 4x slower (1.9 ms → 7.7 ms on PP-LCNet).
    """
    import tvm

    saved = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    tvm.get_global_func("runtime.config_threadpool")(_TVM_AFFINITY_BIG, threads)
    try:
        yield
    finally:
        if saved is not None:
            os.sched_setaffinity(0, saved)


def measure_onnxruntime(proto: onnx.ModelProto, inputs: dict[str, np.ndarray], *, optimized: bool = True,
                        threads: int = 2, warmup: int = 10, repeats: int = 50, backend: str = "ort") -> Latency:
    """Latency of ONNX Runtime on ``proto`` with ``threads`` intra-op threads (optimized session by default)."""
    import onnxruntime as ort

    _check(threads, warmup, repeats)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {name: np.ascontiguousarray(value) for name, value in inputs.items()}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    return summarize(times, backend=backend, warmup=warmup, threads=threads)
