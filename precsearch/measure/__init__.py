"""Latency of a built plan or of an ONNX Runtime session, measured the same way for every backend.

A plan is measured locally (:func:`measure_library`) or, as an exported library,
on a remote device through a TVM RPC tracker (:func:`measure_remote`, with
:func:`run_remote` to check its outputs there).
"""

from ._lock import CpuLock
from ._local import Latency, measure_library, measure_onnxruntime, summarize
from ._profile import KernelTime, profile_kernels
from ._rpc import RpcTarget, check_tracker, measure_remote, parse_tracker, run_remote

__all__ = ["CpuLock", "KernelTime", "Latency", "profile_kernels", "RpcTarget", "check_tracker", "measure_library", "measure_onnxruntime", "measure_remote", "parse_tracker",
           "run_remote", "summarize"]
