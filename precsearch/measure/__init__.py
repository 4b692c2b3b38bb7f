"""Latency of a built plan or of an ONNX Runtime session, measured the same way for every backend.

Local measurement for now; remote measurement through a TVM RPC tracker comes
with the tuning issue.
"""

from ._local import Latency, measure_library, measure_onnxruntime, summarize

__all__ = ["Latency", "measure_library", "measure_onnxruntime", "summarize"]
