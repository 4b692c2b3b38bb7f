"""oneDNN convs as packed functions a Relax graph calls (``R.call_dps_packed``).

Float32 convs, and int8 convs (u8 activations × s8 per-channel weights) whose
requantization runs inside the primitive, as oneDNN's scales and zero points.

The C++ side (``onednn_conv.cc``) is compiled once per machine with
``tvm_ffi.cpp.load_inline`` against the PyPI oneDNN build (``onednn-cpu-gomp``,
headers from ``onednn-devel-cpu-gomp``) and cached; when oneDNN, its headers or a
C++ compiler are missing, :func:`available` says why and every conv stays TIR.
"""

from __future__ import annotations

import dataclasses
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
#: The same conv with a float32 tensor added after its post-op (a residual connection): one more argument.
CONV_ADD_FUNCTION = "precsearch.onednn.conv2d_add"
CONV_FUNCTIONS = (CONV_FUNCTION, CONV_ADD_FUNCTION)
#: A dense layer (matmul with constant weights) run as the same primitive: a 1×1 conv on a 1×1 image.  Its own
#: name keeps it apart from the plan's convs (VerifyPlan checks those against the plan).
DENSE_FUNCTION = "precsearch.onednn.dense"
#: What an exported library with oneDNN convs needs at run time (plan.json says it).
ONEDNN_REQUIREMENT = ("its oneDNN convs call precsearch.onednn.conv2d (and conv2d_add, dense): load it with "
                      "precsearch.tvm.LoadedLibrary (which compiles and registers the oneDNN bridge) in an environment "
                      "with precsearch installed")
SOURCE = Path(__file__).with_name("onednn_conv.cc")

# The int64 config the C++ side reads, in order (its enum Field).
CONFIG_FIELDS = ("n", "ic", "ih", "iw", "oc", "kh", "kw", "oh", "ow", "sh", "sw", "pt", "pl", "pb", "pr", "dh", "dw",
                 "groups", "src_block", "dst_block", "post_op", "threads", "layer", "dtype", "src_zero", "dst_zero",
                 "variant", "mid_zero", "bf16_src", "bf16_dst", "residual")
#: What a conv reads → writes: float32; u8 → u8 (requantized); u8 → float32 (an int8 conv with a float consumer);
#: float32 → float32 with the conv on bf16 activations and weights (rounded to nearest even, float32 sums).
DTYPES = {"float32": 0, "int8": 1, "int8_float_out": 2, "bfloat16": 3}
INT8_DTYPES = ("int8", "int8_float_out")
POST_OPS = {"none": 0, "relu": 1, "clip": 2, "swish": 3, "hardswish": 4, "sigmoid": 5}

_lock = threading.Lock()
_module = None
_unavailable: str | None = None


def int8_fast_on(target) -> bool:
    """Whether oneDNN's int8 convs beat TIR's on ``target``: where it has VNNI (AMX comes with it).

    Without VNNI oneDNN's u8 × s8 kernels emulate the dot product and lost to the tuned TIR kernels (Zen 3).
    """
    from tvm.target import codegen

    return any(bool(codegen.target_has_features(feature, target)) for feature in ("avx512vnni", "avxvnni"))


def bf16_fast_on(target) -> bool:
    """Whether bf16 convs run natively for ``target``: it names AVX512-BF16 / AMX-BF16, or it is this machine's
    CPU and oneDNN finds them (LLVM names some virtualized CPUs after an older model without them).

    Elsewhere oneDNN emulates bf16 with float32 instructions plus conversions: slower than float32 itself.
    """
    from tvm.target import codegen

    if any(bool(codegen.target_has_features(feature, target)) for feature in ("avx512bf16", "amx-bf16")):
        return True
    host = str(target.attrs.get("mcpu", "")) == codegen.llvm_get_system_cpu() and not target.attrs.get("mattr")
    return host and available() and bool(load().has_native_bf16())


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


def loaded() -> bool:
    """Whether the bridge (and with it oneDNN's OpenMP pool) is loaded in this process."""
    return _module is not None


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
                functions=["conv2d", "conv2d_add", "pack_weights", "unpack_weights", "weights_bytes", "implementation",
                           "set_verbose", "has_native_bf16", "choose_variant", "parallel_launch_address",
                           "parallel_barrier_address"],
                extra_cflags=["-O2", "-std=c++17", "-fopenmp"], extra_include_paths=[str(include)],
                extra_ldflags=[f"-L{lib}", "-ldnnl", "-lgomp", f"-Wl,-rpath,{lib}"])
        except Exception as exc:  # a compiler error is a reason to stay TIR, not a crash
            _unavailable = f"the oneDNN bridge did not compile: {str(exc).splitlines()[0][:200]}"
            raise RuntimeError(f"oneDNN convs unavailable: {_unavailable}") from exc
        tvm_ffi.register_global_func(CONV_FUNCTION, module.conv2d, override=True)
        tvm_ffi.register_global_func(CONV_ADD_FUNCTION, module.conv2d_add, override=True)
        tvm_ffi.register_global_func(DENSE_FUNCTION, module.conv2d, override=True)
        _module = module
        return module


@dataclass(frozen=True)
class ConvSpec:
    """One conv as oneDNN sees it (NCHW dims; activations plain or channel-blocked).

    For an int8 conv (``dtype`` "int8" / "int8_float_out") the quantization is
    ``y = saturate(round_half_even((src_scale·weight_scales[c]·conv(x - src_zero, w) + bias) / dst_scale)
    + dst_zero)``, with ``bias`` in float (the model's integer bias × its scale).
    """

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
    dtype: str = "float32"
    src_zero: int = 0
    dst_zero: int = 0
    src_scale: float = 1.0
    dst_scale: float = 1.0
    weight_scales: tuple[float, ...] = ()
    # bf16: 0 the graph's layout, 1 nhwc (AMX), -1 oneDNN's rule.  int8 with a zero point: 0 / -1 oneDNN's zero
    # points, 1 none in the primitive (the input padded with its zero point, the bias from folded_bias, the output
    # zero point as post-ops), which oneDNN runs with its faster kernels.  See choose_variant.
    variant: int = -1
    # int8 with an activation (``post_op``) after the conv's own output quantization: that quantization's scale and
    # zero point (-1: none, the activation, if any, is not the primitive's).  The primitive then computes
    # ``act((clip(round_half_even(conv / mid_scale), -mid_zero, 255 - mid_zero)) · mid_scale)`` and quantizes that
    # at dst_scale / dst_zero ("int8") or leaves it float ("int8_float_out").
    mid_scale: float = 0.0
    mid_zero: int = -1
    # bf16 only: the conv reads its input as bf16 (written by a bf16 conv) / writes its output as bf16 (read only
    # by bf16 convs, which would round it to bf16 anyway), so no float32 tensor and no rounding pass between them.
    bf16_src: bool = False
    bf16_dst: bool = False
    # float32 / bf16: a float32 tensor of the output's shape is added after the post-op (called as conv2d_add)
    residual: bool = False

    @property
    def is_int8(self) -> bool:
        return self.dtype in INT8_DTYPES

    def config(self) -> np.ndarray:
        n, ic, ih, iw = self.input_shape
        _, oc, oh, ow = self.output_shape
        values = (n, ic, ih, iw, oc, *self.kernel, oh, ow, *self.strides, *self.padding, *self.dilation, self.groups,
                  self.src_block, self.dst_block, POST_OPS[self.post_op], self.threads,
                  self.layer, DTYPES[self.dtype], self.src_zero, self.dst_zero, self.variant, self.mid_zero,
                  int(self.bf16_src), int(self.bf16_dst), int(self.residual))
        assert len(values) == len(CONFIG_FIELDS)
        return np.asarray(values, dtype="int64")

    def post(self) -> np.ndarray:
        values = [self.post_alpha, self.post_beta]
        if self.is_int8:
            values += [self.src_scale, self.dst_scale, *self.weight_scales]
            if self.mid_zero >= 0:
                values.append(self.mid_scale)
        return np.asarray(values, dtype="float32")


def pack_weights(spec: ConvSpec, weights_oihw: np.ndarray) -> np.ndarray:
    """The OIHW weights (float32, or int8 for an int8 spec) in the format oneDNN's primitive reads (a uint8 blob).

    A bf16 spec takes float32 weights and stores them rounded to bf16 (nearest even)."""
    import tvm

    module = load()
    config, post = _tensors(spec)
    size = int(module.weights_bytes(config, post))
    packed = tvm.runtime.tensor(np.zeros(size, dtype="uint8"))
    dtype = "int8" if spec.is_int8 else "float32"
    module.pack_weights(config, post, tvm.runtime.tensor(np.ascontiguousarray(weights_oihw, dtype=dtype)), packed)
    return packed.numpy()


def _tensors(spec: ConvSpec):
    import tvm

    return tvm.runtime.tensor(spec.config()), tvm.runtime.tensor(spec.post())


def weight_dims(spec: ConvSpec) -> tuple[int, int, int, int]:
    _, ic, _, _ = spec.input_shape
    return (spec.output_shape[1], ic // spec.groups, *spec.kernel)


def unpack_weights(spec: ConvSpec, packed: np.ndarray) -> np.ndarray:
    """The OIHW float32 weights a packed blob holds (for verification; a bf16 blob gives its values widened).

    Float and bf16 specs only: an int8 blob carries oneDNN's zero-point compensation, which has no inverse
    reorder, so VerifyPlan re-packs and compares bytes."""
    import tvm

    if spec.is_int8:
        raise ValueError("int8 oneDNN weights have no inverse reorder: compare pack_weights(spec, w) instead")
    module = load()
    config, post = _tensors(spec)
    oihw = tvm.runtime.tensor(np.zeros(weight_dims(spec), dtype="float32"))
    module.unpack_weights(config, post, tvm.runtime.tensor(np.ascontiguousarray(packed)), oihw)
    return oihw.numpy()


def with_fastest_variant(spec: ConvSpec) -> ConvSpec:
    """``spec`` with its variant chosen here: bf16, the graph's layout or nhwc, timed; int8 with a zero point,
    folded where oneDNN then runs another kernel (chosen by kernel name, so the build is repeatable); others
    unchanged."""
    if spec.dtype != "bfloat16" and not (spec.is_int8 and (spec.src_zero or spec.dst_zero)):
        return spec
    return dataclasses.replace(spec, variant=int(load().choose_variant(*_tensors(spec))))


def folds_zero_points(spec: ConvSpec) -> bool:
    """Whether the primitive of ``spec`` runs without zero points, so its bias must come from :func:`folded_bias`."""
    return spec.is_int8 and spec.variant == 1


def folded_bias(spec: ConvSpec, bias: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The float bias of a conv whose input zero point is not the primitive's: ``bias - src_scale·w_scale[c]·
    src_zero·Σw[c]``, so ``src_scale·w_scale·conv(x, w) + bias'`` equals ``src_scale·w_scale·conv(x - zero, w) +
    bias`` (the padding holds the zero point, so every window counts it).  Float32 sums round where oneDNN's
    integer compensation was exact: the result can move by one step at a round-half tie."""
    if not folds_zero_points(spec) or spec.src_zero == 0:
        return bias
    weight_sums = np.asarray(weights, dtype=np.int64).reshape(len(bias), -1).sum(axis=1)
    scales = np.float64(np.float32(spec.src_scale)) * np.asarray(spec.weight_scales, dtype=np.float32).astype(np.float64)
    return (np.asarray(bias, dtype=np.float64) - scales * spec.src_zero * weight_sums).astype(np.float32)


def implementation(spec: ConvSpec) -> str:
    """oneDNN's name for the kernel it runs ``spec`` with (``ref:any`` is its slow fallback)."""
    return str(load().implementation(*_tensors(spec)))


def spec_from_config(config: np.ndarray, post: np.ndarray) -> ConvSpec:
    """The inverse of :meth:`ConvSpec.config` (VerifyPlan reads a call's spec back)."""
    f = dict(zip(CONFIG_FIELDS, (int(v) for v in config)))
    post_op = {code: name for name, code in POST_OPS.items()}[f["post_op"]]
    dtype = {code: name for name, code in DTYPES.items()}[f["dtype"]]
    post = [float(v) for v in post]
    quantization = {}
    if dtype in INT8_DTYPES:
        channels = f["oc"]
        quantization = dict(src_scale=post[2], dst_scale=post[3], weight_scales=tuple(post[4:4 + channels]))
        if f["mid_zero"] >= 0:
            quantization.update(mid_scale=post[4 + channels], mid_zero=f["mid_zero"])
    return ConvSpec((f["n"], f["ic"], f["ih"], f["iw"]), (f["n"], f["oc"], f["oh"], f["ow"]), (f["kh"], f["kw"]),
                    (f["sh"], f["sw"]), (f["pt"], f["pl"], f["pb"], f["pr"]), (f["dh"], f["dw"]), f["groups"],
                    f["src_block"], f["dst_block"], post_op, post[0], post[1], f["threads"], f["layer"], dtype,
                    f["src_zero"], f["dst_zero"], **quantization, variant=f["variant"], bf16_src=bool(f["bf16_src"]),
                    bf16_dst=bool(f["bf16_dst"]), residual=bool(f["residual"]))
