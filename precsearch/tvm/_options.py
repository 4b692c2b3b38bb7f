"""The settings of a TVM build and the target they name."""

from __future__ import annotations

import json
from dataclasses import dataclass

import tvm

from precsearch.errors import ConfigError


CONV_BACKENDS = ("tir", "onednn")
ACTIVATION_LAYOUTS = ("auto", "nhwc", "blocked")


@dataclass(frozen=True)
class CompileOptions:
    """Settings of the TVM build.

    Parameters
    ----------
    target : dict, str or None
        A TVM target as a JSON dict (or its JSON text); None detects the host CPU.
    block_size : int or None
        Channel block of the NCHW<b>c layout; None picks 16 or 8, whichever blocks more MACs.
    float_blocked, int8_blocked : bool
        Whether float / int8 convs run blocked where their shape allows.
    threads : int
        Cores the target may use (``num-cores``).
    requant_dtype : {"float64", "float32"}
        Arithmetic of int8 requantization: float64 rounds exactly; float32 is
        faster but rounds some near-ties (within ~1e-6 of .5) the other way.
    conv_backend : {"onednn", "tir"}
        Where float convs run: oneDNN primitives with bias and activation fused
        (default; where oneDNN has a jitted kernel for the shape and layout, and
        where the bridge can be built, else TIR), or TIR kernels only (tuned by
        MetaSchedule). With "onednn", int8 convs go to oneDNN too where ``onednn_int8`` says so.
    onednn_int8 : bool or None
        Whether int8 convs run on oneDNN's u8 × s8 primitives (requantization inside) under
        ``conv_backend="onednn"``. None (default) decides by the target: yes where it has VNNI
        (AVX512-VNNI or AVX-VNNI, and AMX where present), no elsewhere, where oneDNN's int8 kernels
        are slower than TIR's (measured on Zen 3).
    onednn_int8_min_macs : int
        Int8 convs with fewer MACs stay on TIR: below it a oneDNN call (with the
        reorders to and from its nhwc layout) costs more than the conv.
    onednn_int8_activation : bool
        An int8 conv on oneDNN also runs the dequantize → activation (SiLU, hard-swish, ...) → quantize that
        follows its output quantization, as post-ops of its primitive (True, default); off, they stay TIR
        kernels (for the ablation).
    activation_layout : {"auto", "nhwc", "blocked"}
        The layout activations run in.  "nhwc": every conv in NHWC, the layout oneDNN's
        brgemm kernels read natively (float32 and int8 alike, any channel count), so no
        conv reorders and no transforms between convs.  "blocked": NCHW<b>c where a conv's
        channels allow, NCHW elsewhere (what TIR's x86 kernels need).  "auto" (default):
        "nhwc" when every conv of the plan may run on oneDNN (``conv_backend="onednn"``, the
        bridge available, int8 convs on oneDNN), the CPU has AVX-512 (oneDNN's NHWC kernels),
        the model has no ConvTranspose (TVM has no NHWC one) and neither ``block_size`` nor
        an NCHW conv (``float_blocked`` / ``int8_blocked`` off) was asked for; else "blocked".
    parallel_fallback : bool
        Kernels without a tuning record get precsearch's fallback schedule
        (elementwise producers inlined, outer spatial loops parallel, innermost
        vectorized; True, default) or keep TVM's serial default schedule.
    fallback_inline : bool
        Whether that fallback schedule inlines producers (True, default); off, each
        op of a fused kernel keeps its own loop nest (for the ablation).
    fast_sigmoid : bool
        Float sigmoids left to TIR use TVM's vectorizable ``fast_exp`` (True,
        default) rather than one libm ``expf`` call per element.
    onednn_bf16_chains : bool
        A bf16 conv whose output only bf16 convs read writes it in bf16 and they read it so (True, default):
        the same values (they would round it to bf16 themselves) without a float32 tensor and a rounding pass
        between them.  Off, every bf16 conv reads and writes float32 (for the ablation).
    onednn_residual_add : bool
        A float32 or bf16 conv in NHWC followed by ``+ r`` (a residual connection, r a float32 tensor of its
        output's shape) adds r as a post-op of its oneDNN primitive (True, default): no pass of its own.
    separable_max_pool : bool
        Max-pools with a window wider than kh + kw run as a 1×kw then a kh×1 pool, and a stride-1
        same-padded pool starts from a smaller pool of the same tensor (an SPP block's 5/9/13 become
        SPPF's chain of 5s); exact (True, default).  Off, each pool loops over its whole window.
    onednn_fold_zero_points : bool
        An int8 oneDNN conv with a zero point runs without zero points in the primitive (its input padded with
        the zero point, the compensation in the bias, the output's zero point as post-ops) where oneDNN then
        runs another kernel (True, default): oneDNN 3.2 sends convs with zero points to its older jit kernels
        (on AMX 1.0-1.6x slower than brgconv).  Off, oneDNN's own zero points (for the ablation).
    fallback_partition_selects : bool
        The fallback schedule cuts a concat's vector loop where its inputs meet, so each piece vectorizes
        (True, default); off, the loop picks its source per element (for the ablation).
    onednn_dense : bool
        A float32 dense layer (matmul with constant weights, at least ``MIN_DENSE_MACS`` multiply-adds) runs as a
        oneDNN primitive (True, default) instead of a TIR matmul, whose reduction-innermost loop only tuning makes
        fast.  Only with ``conv_backend="onednn"``.
    """

    target: dict | str | None = None
    block_size: int | None = None
    float_blocked: bool = True
    int8_blocked: bool = True
    threads: int = 2
    requant_dtype: str = "float64"
    conv_backend: str = "onednn"
    parallel_fallback: bool = True
    fallback_inline: bool = True
    fast_sigmoid: bool = True
    separable_max_pool: bool = True
    onednn_int8: bool | None = None
    onednn_int8_min_macs: int = 0
    onednn_int8_activation: bool = True
    onednn_bf16_chains: bool = True
    onednn_residual_add: bool = True
    activation_layout: str = "auto"
    onednn_fold_zero_points: bool = True
    onednn_dense: bool = True
    fallback_partition_selects: bool = True

    def __post_init__(self):
        if self.conv_backend not in CONV_BACKENDS:
            raise ConfigError(f"The 'conv_backend' parameter of compile must be one of {', '.join(CONV_BACKENDS)}; "
                              f"got {self.conv_backend!r} instead.")
        if self.activation_layout not in ACTIVATION_LAYOUTS:
            raise ConfigError(f"The 'activation_layout' parameter of compile must be one of "
                              f"{', '.join(ACTIVATION_LAYOUTS)}; got {self.activation_layout!r} instead.")
        if self.requant_dtype not in ("float64", "float32"):
            raise ConfigError(f"The 'requant_dtype' parameter of compile must be 'float64' or 'float32'; "
                              f"got {self.requant_dtype!r} instead.")
        if self.block_size is not None and self.block_size not in (4, 8, 16, 32):
            raise ConfigError(f"The 'block_size' parameter of compile must be one of 4, 8, 16, 32 or None; "
                              f"got {self.block_size!r} instead.")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"The 'threads' parameter of compile must be a positive int; got {self.threads!r} "
                              "instead.")


#: The user-facing spelling of CompileOptions.onednn_int8 (CLI --onednn-int8, SearchConfig.onednn_int8).
ONEDNN_INT8_SETTINGS = {"auto": None, "on": True, "off": False}


def host_target(threads: int = 2) -> tvm.target.Target:
    """The LLVM target of this CPU: without ``mcpu`` LLVM emits generic x86-64 (no AVX-512, no VNNI)."""
    from tvm.target import codegen

    return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": threads})


def resolve_target(options: CompileOptions) -> tvm.target.Target:
    """The target of ``options``: its JSON dict, or the host CPU."""
    if options.target is None:
        return host_target(options.threads)
    spec = json.loads(options.target) if isinstance(options.target, str) else dict(options.target)
    try:
        return tvm.target.Target(spec)
    except Exception as exc:
        raise ConfigError(f"The 'target' parameter of compile is not a valid TVM target; got {spec!r} instead.") \
            from exc
