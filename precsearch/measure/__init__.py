"""Latency as every backend reports it (median, IQR, runs, threads), ONNX Runtime's timing, the machine's CPU lock.

A TVM build is timed by :mod:`precsearch.tvm` (``measure_library`` here,
``measure_remote`` on a board through an RPC tracker); both return a
:class:`Latency` made by :func:`summarize`, so every row of a comparison was
computed the same way.
"""

from ._load import LOADED_CORES, CpuLoad, latency_unloaded, time_unloaded
from ._latency import Latency, check_settings, measure_onnxruntime, onnxruntime_session, summarize, time_session
from ._lock import CpuLock, held_shared
from ._openvino import OPENVINO_BUILDS, OpenVinoModel, measure_openvino_builds, openvino_missing_reason

__all__ = ["CpuLoad", "CpuLock", "LOADED_CORES", "Latency", "OPENVINO_BUILDS", "OpenVinoModel", "check_settings",
           "held_shared", "latency_unloaded", "measure_onnxruntime", "measure_openvino_builds", "onnxruntime_session",
           "openvino_missing_reason", "summarize", "time_session", "time_unloaded"]
