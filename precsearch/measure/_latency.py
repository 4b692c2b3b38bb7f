"""Warm-up, repeated runs, median and interquartile range, thread count pinned and recorded.

The timing of a TVM build is in :mod:`precsearch.tvm` (``measure_library``), which
returns the same :class:`Latency`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from precsearch.errors import check_int

@dataclass(frozen=True)
class Latency:
    """Latency of one backend on one input, from repeated timed runs."""

    backend: str
    median_ms: float
    iqr_ms: float
    runs: int
    warmup: int
    threads: int
    # TVM builds: the size of TVM's own thread pool the figure was measured with
    # (a build whose convs run on oneDNN can be faster with TVM's pool smaller
    # than ``threads``: the two pools hand the cores back and forth).
    tvm_pool_threads: int | None = None
    # Cores that processes outside this one kept busy during the timing (None: not watched); see
    # :func:`precsearch.measure.time_unloaded`.
    others_busy_cores: float | None = None

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


def check_settings(threads: int, warmup: int, repeats: int) -> None:
    for name, value, low in (("threads", threads, 1), ("warmup", warmup, 0), ("repeats", repeats, 3)):
        check_int(value, name, "measure", low)


def onnxruntime_session(proto: onnx.ModelProto, *, optimized: bool = True, threads: int = 2,
                        disabled_optimizers: tuple[str, ...] = (), optimized_model_path=None):
    """The ONNX Runtime CPU session every ORT latency is measured in: ``threads`` intra-op threads, one inter-op.

    ``disabled_optimizers`` names ORT graph transformers to skip;
    ``optimized_model_path`` makes ORT write the graph it will run there.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    extra = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"], **extra)


def time_session(session, inputs: dict[str, np.ndarray], *, threads: int, warmup: int = 10, repeats: int = 50,
                 backend: str = "ort") -> Latency:
    """Latency of an open ONNX Runtime session on ``inputs``: ``warmup`` untimed runs, then ``repeats`` timed ones.

    ``threads`` is what the session was opened with (recorded, not set here).
    """
    check_settings(threads, warmup, repeats)
    feed = {name: np.ascontiguousarray(value) for name, value in inputs.items()}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    return summarize(times, backend=backend, warmup=warmup, threads=threads)


def measure_onnxruntime(proto: onnx.ModelProto, inputs: dict[str, np.ndarray], *, optimized: bool = True,
                        threads: int = 2, warmup: int = 10, repeats: int = 50, backend: str = "ort",
                        disabled_optimizers: tuple[str, ...] = ()) -> Latency:
    """Latency of ONNX Runtime on ``proto`` with ``threads`` intra-op threads (optimized session by default)."""
    check_settings(threads, warmup, repeats)
    session = onnxruntime_session(proto, optimized=optimized, threads=threads,
                                  disabled_optimizers=disabled_optimizers)
    return time_session(session, inputs, threads=threads, warmup=warmup, repeats=repeats, backend=backend)
