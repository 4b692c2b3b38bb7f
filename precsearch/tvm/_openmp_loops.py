"""TIR's parallel loops run on oneDNN's OpenMP threads instead of TVM's own thread pool.

A build with oneDNN convs has two thread pools on the same cores: oneDNN's (GNU OpenMP, whose threads spin a
while after each conv so the next one starts warm) and TVM's (which runs every parallel TIR loop).  Each kernel
that follows a conv then shares its cores with the other pool's spinning threads: on the dense detector's all-bf16
build a 26×26×192 concat took 117 µs per call after a conv against 4 µs alone, and a TVM pool of two threads ran the
whole model 5× slower than one (56 ms against 10.6).  One pool for both removes that: measured side by side on
the same libraries (best TVM pool size against OpenMP), the detector's all-bf16 build 10.64 → 9.96 ms, its
all-int8 16.6 → 12.9, PP-LCNet all-float 1.67 → 1.58, MobileNetV3 all-float 0.665 → 0.616.

TVM's wheel has no OpenMP runtime (USE_OPENMP is a source-build option), but a compiled TIR module calls the
pool through two function pointers it exports, ``__TVMBackendParallelLaunch`` and
``__TVMBackendParallelBarrier``, which TVM's loader fills when it opens the library.  This module points them at
the oneDNN bridge's OpenMP versions (``onednn_conv.cc``).  Nothing else changes: the same loop bodies, chunked the
same way (by the task count the launch reports).  ``PRECSEARCH_TIR_POOL=tvm`` keeps TVM's pool (the ablation's
``tir_thread_pool`` lever).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

import _ctypes

from . import _onednn

logger = logging.getLogger(__name__)

_POINTERS = ("__TVMBackendParallelLaunch", "__TVMBackendParallelBarrier")
_RTLD_NOLOAD = getattr(os, "RTLD_NOLOAD", 4)
_lock = threading.Lock()


def enabled() -> bool:
    """Whether TIR loops go to OpenMP here: the oneDNN bridge is loaded (its pool exists) and not turned off."""
    return os.environ.get("PRECSEARCH_TIR_POOL", "openmp") != "tvm" and _onednn.loaded()


def route_parallel_loops() -> int:
    """Point every loaded TIR module's parallel-launch pointers at OpenMP; how many modules were changed.

    Only pointers that hold TVM's own runtime functions are changed, so a module is changed once and nothing
    that is not a TVM module is touched.  Call after the module is loaded (a VirtualMachine created).
    """
    if not enabled():
        return 0
    with _lock:
        module = _onednn.load()
        replacements = (int(module.parallel_launch_address()), int(module.parallel_barrier_address()))
        libraries = _loaded_libraries()
        originals = _tvm_runtime_functions(libraries)
        if originals is None:
            return 0
        # A library already routed no longer holds TVM's pointers and is left alone.
        return sum(_route(path, originals, replacements) for path in libraries)


def _tvm_runtime_functions(libraries=None) -> tuple[int, int] | None:
    """Addresses of TVM's own TVMBackendParallelLaunch / Barrier (what its loader writes into a module)."""
    for path in _loaded_libraries() if libraries is None else libraries:
        if os.path.basename(path).startswith("libtvm_runtime.so"):
            library = ctypes.CDLL(path, mode=_RTLD_NOLOAD)
            return tuple(ctypes.cast(getattr(library, name[2:]), ctypes.c_void_p).value for name in _POINTERS)
    logger.warning("TVM's runtime library was not found among the loaded libraries; TIR loops keep TVM's pool")
    return None


def _loaded_libraries() -> set[str]:
    """Shared objects mapped into this process (a deleted temporary one is still found by dlopen by name)."""
    names = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and ".so" in fields[5]:
                names.add(fields[5].strip().removesuffix(" (deleted)"))
    return names


def _route(path: str, originals, replacements) -> bool:
    try:
        library = ctypes.CDLL(path, mode=_RTLD_NOLOAD)
    except OSError:
        return False
    try:
        changed = False
        # A module has the barrier pointer only when one of its loops synchronizes.
        for name, original, replacement in zip(_POINTERS, originals, replacements):
            try:
                pointer = ctypes.c_void_p.in_dll(library, name)
            except ValueError:
                continue
            if pointer.value == original:
                pointer.value = replacement
                changed = True
        return changed
    finally:
        _ctypes.dlclose(library._handle)  # the NOLOAD open took a reference; the VM's own keeps it loaded
