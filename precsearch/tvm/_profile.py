"""Time spent in each kernel of a built plan, to see which workloads dominate.

TVM 0.27's Relax VM has no profiler; its instrument hook is called before and
after every call instruction, which is enough to time each kernel call.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from . import _onednn
from ._naming import conv_kernel_name, conv_kernel_parts
from ._timing import tvm_threads


@dataclass(frozen=True)
class KernelTime:
    """Median time of one kernel per inference; for a conv kernel, its layer, precision and layout."""

    kernel: str
    calls: int
    median_us: float
    layer_index: int | None = None
    precision: str | None = None  # "int8", "bf16" or "float"
    layout: str | None = None  # "NCHW", "NCHW16c", ...

    @property
    def backend(self) -> str:
        """"onednn" for a conv run by the oneDNN bridge, else "tir"."""
        return "onednn" if self.kernel.startswith(ONEDNN_PREFIX) else "tir"


# Every oneDNN conv is one packed function; its config names the layer, so the
# profile reports each call under the conv kernel name the TIR build would use.
ONEDNN_PREFIX = "onednn_"
_LAYER_FIELD = _onednn.CONFIG_FIELDS.index("layer")
_BLOCK_FIELD = _onednn.CONFIG_FIELDS.index("src_block")
_DTYPE_FIELD = _onednn.CONFIG_FIELDS.index("dtype")


def _onednn_symbol(config) -> str:
    fields = config.numpy()
    block = int(fields[_BLOCK_FIELD])
    dtype = int(fields[_DTYPE_FIELD])
    precision = {_onednn.DTYPES["float32"]: "float", _onednn.DTYPES["bfloat16"]: "bf16"}.get(dtype, "int8")
    layout = "NHWC" if block < 0 else f"NCHW{block}c" if block else "NCHW"
    return ONEDNN_PREFIX + conv_kernel_name(int(fields[_LAYER_FIELD]), precision, layout)


def _dense_symbol(config) -> str:
    fields = dict(zip(_onednn.CONFIG_FIELDS, (int(v) for v in config.numpy())))
    return f"{ONEDNN_PREFIX}dense_{fields['ic']}x{fields['oc']}"


def profile_kernels(library, inputs: dict[str, np.ndarray], *, threads: int = 2, runs: int = 20) -> list[KernelTime]:
    """Per-kernel time of ``library`` (a BuiltPlan or LoadedLibrary), slowest first.

    Python timestamps add a few microseconds per call; use it to rank kernels,
    and the VM's ``time_evaluator`` (:func:`measure_library`) for end-to-end latency.
    """
    with tvm_threads(threads):
        return _profile(library, inputs, runs)


def _profile(library, inputs, runs: int) -> list[KernelTime]:
    import tvm

    from ._build import virtual_machine  # imported here: _build imports this module's callers

    executable = getattr(library, "executable", None)
    vm = virtual_machine(executable) if executable is not None else library.virtual_machine()
    args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[name]), tvm.cpu()) for name in library.input_names]
    per_run: list[dict[str, float]] = []
    calls: dict[str, int] = defaultdict(int)
    started: dict[str, float] = {}
    current: dict[str, float] = defaultdict(float)

    def instrument(func, symbol, before_run, ret_value, *call_args):
        if symbol in _onednn.CONV_FUNCTIONS:
            symbol = _onednn_symbol(call_args[3])
        elif symbol == _onednn.DENSE_FUNCTION:
            symbol = _dense_symbol(call_args[3])
        if before_run:
            started[symbol] = time.perf_counter()
        else:
            current[symbol] += time.perf_counter() - started.pop(symbol)
            if len(per_run) == 0:
                calls[symbol] += 1
        return 0  # VMInstrumentReturnKind.NO_OP: run the call normally

    vm["main"](*args)  # warm-up: first-call allocation
    vm.set_instrument(instrument)
    for _ in range(runs):
        current.clear()
        vm["main"](*args)
        per_run.append(dict(current))
    kernels = sorted({name for run in per_run for name in run})
    rows = [KernelTime(kernel=name, calls=calls.get(name, 0),
                       median_us=float(np.median([run.get(name, 0.0) for run in per_run])) * 1e6,
                       **dict(zip(("layer_index", "precision", "layout"), conv_kernel_parts(name) or ())))
            for name in kernels]
    return sorted(rows, key=lambda row: -row.median_us)
