"""oneDNN float convs as packed functions a Relax graph calls (``R.call_dps_packed``).

The C++ side (``onednn_conv.cc``) is compiled once per machine with
``tvm_ffi.cpp.load_inline`` against the PyPI oneDNN build (``onednn-cpu-gomp``,
headers from ``onednn-devel-cpu-gomp``) and cached; when oneDNN, its headers or a
C++ compiler are missing, :func:`available` says why and every conv stays TIR.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

CONV_FUNCTION = "precsearch.onednn.conv2d"
#: What an exported library with oneDNN convs needs at run time (plan.json says it).
ONEDNN_REQUIREMENT = ("its float convs call precsearch.onednn.conv2d: load it with precsearch.tvm.LoadedLibrary "
                      "(which compiles and registers the oneDNN bridge) in an environment with precsearch installed")
SOURCE = Path(__file__).with_name("onednn_conv.cc")

# The int64 config the C++ side reads, in order (its enum Field).
CONFIG_FIELDS = ("n", "ic", "ih", "iw", "oc", "kh", "kw", "oh", "ow", "sh", "sw", "pt", "pl", "pb", "pr", "dh", "dw",
                 "groups", "src_block", "dst_block", "post_op", "threads", "layer")
POST_OPS = {"none": 0, "relu": 1, "clip": 2, "swish": 3, "hardswish": 4, "sigmoid": 5}

_lock = threading.Lock()
_module = None
_unavailable: str | None = None


def _prefix_dirs() -> tuple[Path, Path]:
    prefix = Path(sys.prefix)
    return prefix / "include", prefix / "lib"


def unavailable_reason() -> str:
    """Empty when oneDNN convs can be built here, else why not (one line)."""
    include, lib = _prefix_dirs()
    if not (include / "dnnl.hpp").exists():
        return f"oneDNN headers not found in {include} (pip install onednn-devel-cpu-gomp)"
    if not any(lib.glob("libdnnl.so*")):
        return f"libdnnl not found in {lib} (pip install onednn-cpu-gomp)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++) to build the oneDNN bridge"
    return _unavailable or ""


def available() -> bool:
    return not unavailable_reason()


def load():
    """The compiled bridge, its functions registered as globals (idempotent, thread-safe)."""
    global _module, _unavailable
    with _lock:
        if _module is not None:
            return _module
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"oneDNN convs unavailable: {reason}")
        # GNU OpenMP's threads wait for the next parallel region: sleeping (PASSIVE) costs a
        # wake-up per conv (PP-LCNet 5.6 ms against 2.7), spinning without end (ACTIVE) takes
        # the cores from whatever runs next (ORT float 4.9 → 7.9 ms in the same process).  A
        # short spin keeps back-to-back convs warm and then lets go (measured on Zen 3, 2 cores).
        # libgomp reads this when it loads, which is when the bridge loads.
        if "OMP_WAIT_POLICY" not in os.environ:
            os.environ.setdefault("GOMP_SPINCOUNT", "10000")
        import tvm_ffi
        import tvm_ffi.cpp

        include, lib = _prefix_dirs()
        try:
            module = tvm_ffi.cpp.load_inline(
                "precsearch_onednn", cpp_sources=SOURCE.read_text(),
                functions=["conv2d", "pack_weights", "unpack_weights", "weights_bytes", "implementation", "set_verbose"],
                extra_cflags=["-O2", "-std=c++17"], extra_include_paths=[str(include)],
                extra_ldflags=[f"-L{lib}", "-ldnnl", "-lgomp", f"-Wl,-rpath,{lib}"])
        except Exception as exc:  # a compiler error is a reason to stay TIR, not a crash
            _unavailable = f"the oneDNN bridge did not compile: {str(exc).splitlines()[0][:200]}"
            raise RuntimeError(f"oneDNN convs unavailable: {_unavailable}") from exc
        tvm_ffi.register_global_func(CONV_FUNCTION, module.conv2d, override=True)
        _module = module
        return module


@dataclass(frozen=True)
class ConvSpec:
    """One float conv as oneDNN sees it (NCHW dims; activations plain or channel-blocked)."""

    input_shape: tuple[int, int, int, int]
    output_shape: tuple[int, int, int, int]
    kernel: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    groups: int
    src_block: int  # 0 = NCHW
    dst_block: int
    post_op: str = "none"
    post_alpha: float = 0.0
    post_beta: float = 0.0
    threads: int = 0
    layer: int = -1  # the layer index, read back by VerifyPlan (oneDNN ignores it)

    def config(self) -> np.ndarray:
        n, ic, ih, iw = self.input_shape
        _, oc, oh, ow = self.output_shape
        values = (n, ic, ih, iw, oc, *self.kernel, oh, ow, *self.strides, *self.padding, *self.dilation, self.groups,
                  self.src_block, self.dst_block, POST_OPS[self.post_op], self.threads,
                  self.layer)
        assert len(values) == len(CONFIG_FIELDS)
        return np.asarray(values, dtype="int64")

    def post(self) -> np.ndarray:
        return np.asarray([self.post_alpha, self.post_beta], dtype="float32")


def pack_weights(spec: ConvSpec, weights_oihw: np.ndarray) -> np.ndarray:
    """The OIHW float32 weights in the format oneDNN's primitive for ``spec`` reads (a uint8 blob)."""
    import tvm

    module = load()
    config, post = _tensors(spec)
    size = int(module.weights_bytes(config, post))
    packed = tvm.runtime.tensor(np.zeros(size, dtype="uint8"))
    module.pack_weights(config, post, tvm.runtime.tensor(np.ascontiguousarray(weights_oihw, dtype="float32")),
                        packed)
    return packed.numpy()


def _tensors(spec: ConvSpec):
    import tvm

    return tvm.runtime.tensor(spec.config()), tvm.runtime.tensor(spec.post())


def weight_dims(spec: ConvSpec) -> tuple[int, int, int, int]:
    _, ic, _, _ = spec.input_shape
    return (spec.output_shape[1], ic // spec.groups, *spec.kernel)


def unpack_weights(spec: ConvSpec, packed: np.ndarray) -> np.ndarray:
    """The OIHW float32 weights a packed blob holds (for verification)."""
    import tvm

    module = load()
    config, post = _tensors(spec)
    oihw = tvm.runtime.tensor(np.zeros(weight_dims(spec), dtype="float32"))
    module.unpack_weights(config, post, tvm.runtime.tensor(np.ascontiguousarray(packed)), oihw)
    return oihw.numpy()


def implementation(spec: ConvSpec) -> str:
    """oneDNN's name for the kernel it runs ``spec`` with (``ref:any`` is its slow fallback)."""
    return str(load().implementation(*_tensors(spec)))


def spec_from_config(config: np.ndarray, post: np.ndarray) -> ConvSpec:
    """The inverse of :meth:`ConvSpec.config` (VerifyPlan reads a call's spec back)."""
    f = dict(zip(CONFIG_FIELDS, (int(v) for v in config)))
    post_op = {code: name for name, code in POST_OPS.items()}[f["post_op"]]
    return ConvSpec((f["n"], f["ic"], f["ih"], f["iw"]), (f["n"], f["oc"], f["oh"], f["ow"]), (f["kh"], f["kw"]),
                    (f["sh"], f["sw"]), (f["pt"], f["pl"], f["pb"], f["pr"]), (f["dh"], f["dw"]), f["groups"],
                    f["src_block"], f["dst_block"], post_op, float(post[0]), float(post[1]), f["threads"], f["layer"])
