"""Latency of a built plan on this machine: the VM's own timer, TVM's thread pool pinned."""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace

import numpy as np

from precsearch.measure import Latency, check_settings, summarize

# TVM's ThreadGroup affinity mode "big cores": every core here is big.
_TVM_AFFINITY_BIG = 1


def measure_library(library, inputs: dict[str, np.ndarray], *, threads: int = 2, warmup: int = 10,
                    repeats: int = 50, pool_sizes: tuple[int, ...] | None = None) -> Latency:
    """Latency of a built plan (a :class:`~precsearch.tvm.BuiltPlan` or ``LoadedLibrary``).

    Uses the VM's own ``time_evaluator``, so Python overhead is not timed; the
    TVM thread pool is set to ``threads`` first.  A build with oneDNN convs is
    timed with TVM's pool at ``threads`` and at 1 (oneDNN keeps ``threads``
    OpenMP threads either way) and the faster is kept, with the pool size in
    ``tvm_pool_threads``: on PP-LCNet's all-float build the two pools sharing two
    cores cost 4.9 ms against 2.9 ms with TVM's pool at one thread, while a
    build whose TIR kernels dominate is faster with both cores
    (``experiments/ablation.py``).  ``pool_sizes`` overrides the sizes tried.
    """
    check_settings(threads, warmup, repeats)
    sizes = pool_sizes or ((threads, 1) if threads > 1 and getattr(library, "onednn_kernels", None) else (threads,))
    measured = [_measure(library, inputs, threads, size, warmup, repeats) for size in sizes]
    return min(measured, key=lambda latency: latency.median_ms)


def _measure(library, inputs, threads: int, pool_threads: int, warmup: int, repeats: int) -> Latency:
    import tvm

    with tvm_threads(pool_threads):
        vm = library.virtual_machine()
        device = tvm.cpu()
        args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[name]), device) for name in library.input_names]
        for _ in range(warmup):
            vm["main"](*args)
        result = vm.time_evaluator("main", device, number=1, repeat=repeats)(*args)
    latency = summarize(list(result.results), backend="tvm", warmup=warmup, threads=threads)
    return replace(latency, tvm_pool_threads=pool_threads)


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
