"""OpenVINO as a baseline: what a model owner would run instead of precsearch on an Intel-class CPU.

Two builds of the float model: OpenVINO's default (on a CPU with AVX512-BF16 or
AMX it infers in bf16 unless told otherwise) and the same forced to float32
(``INFERENCE_PRECISION_HINT=f32``).  Both are compiled for latency (one stream)
with the thread count every other row uses.  ``openvino`` is an optional extra
(``pip install 'precsearch[openvino]'``): without it these rows are skipped
with one line that says so.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from ._latency import Latency, check_settings, summarize

#: Baseline name → OpenVINO's inference precision hint (None: its own default for the CPU).
OPENVINO_BUILDS = {"openvino": None, "openvino_f32": "f32"}


def openvino_missing_reason() -> str:
    """Empty when OpenVINO can be imported, else why not (one line)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino is not installed (pip install 'precsearch[openvino]')"
    return ""


class OpenVinoModel:
    """The float model compiled by OpenVINO for this CPU: run batches, time one input."""

    def __init__(self, proto: onnx.ModelProto, *, threads: int = 2, precision: str | None = None):
        import openvino as ov

        core = ov.Core()
        # read_model takes a path; the model is in memory (and may be a prepared copy of the user's file)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            onnx.save(proto, str(path))
            model = core.read_model(str(path))
        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(threads)}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.threads = threads
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: "bf16", "f32"
        self.precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        self.output_names = [port.get_any_name() for port in self.compiled.outputs]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.request.infer({name: np.ascontiguousarray(value) for name, value in inputs.items()})
        return {port.get_any_name(): np.array(value) for port, value in results.items()}

    def time(self, inputs: dict[str, np.ndarray], *, warmup: int = 10, repeats: int = 50) -> Latency:
        check_settings(self.threads, warmup, repeats)
        feed = {name: np.ascontiguousarray(value) for name, value in inputs.items()}
        for _ in range(warmup):
            self.request.infer(feed)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            self.request.infer(feed)
            times.append(time.perf_counter() - started)
        return summarize(times, backend="openvino", warmup=warmup, threads=self.threads)


def measure_openvino_builds(proto: onnx.ModelProto, timing_input: dict[str, np.ndarray], batches, *,
                            threads: int = 2, warmup: int = 10, repeats: int = 50) -> dict[str, dict]:
    """Every build of :data:`OPENVINO_BUILDS`, in a child process: its ``latency`` on ``timing_input``, its
    ``outputs`` on ``batches`` and the ``precision`` it inferred in, by baseline name.

    In a child because OpenVINO, once loaded, turns a later Ctrl-C of the process into a segfault (its
    threading runtime; measured: the search's Ctrl-C exited 130 without OpenVINO, -11 with it), and a
    search must stop cleanly and resume.
    """
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_measure_in_child, proto.SerializeToString(), timing_input, list(batches), threads,
                           warmup, repeats).result()


def _measure_in_child(model_bytes: bytes, timing_input, batches, threads: int, warmup: int, repeats: int) -> dict:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what a Ctrl-C does
    proto = onnx.load_from_string(model_bytes)
    out = {}
    for name, precision in OPENVINO_BUILDS.items():
        compiled = OpenVinoModel(proto, threads=threads, precision=precision)
        out[name] = {"latency": compiled.time(timing_input, warmup=warmup, repeats=repeats),
                     "outputs": [compiled.run(batch) for batch in batches], "precision": compiled.precision}
    return out
