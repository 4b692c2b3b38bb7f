"""The pass pipeline of one plan's build, as a function returning ``tvm.transform.Sequential``."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.target import codegen

from precsearch.errors import CompileError, ConfigError
from precsearch.model import LoadedModel
from ._build_report import BuildReport
from ._importer import ImportedModel
from ._fast_sigmoid import FastSigmoid
from ._injective_take import InjectiveTake
from ._int8_rewrite import Int8ConvRewrite
from ._max_pool import SeparableMaxPool
from . import _onednn
from ._nhwc import NHWCTransforms
from ._layout import choose_block_size, decide_layouts, layout_callback, make_conv_legalizer
from ._onednn_dense import OffloadDenseOneDNN
from ._onednn_offload import OffloadOneDNN
from ._options import CompileOptions, resolve_target
from ._qdq_lower import LowerQDQ
from ._tune_apply import ApplyTuning
from ._verify import InspectLayout, VerifyPlan


def bf16_unsupported_reason(options: CompileOptions | None = None) -> str:
    """Empty where bf16 convs build with ``options`` (oneDNN on a CPU with native bf16), else why not (one line)."""
    options = options or CompileOptions()
    if options.conv_backend != "onednn":
        return "bf16 convs run on oneDNN: --conv-backend tir leaves no oneDNN conv"
    if not _onednn.available():
        return f"bf16 convs run on oneDNN: {_onednn.unavailable_reason()}"
    if not _onednn.bf16_fast_on(resolve_target(options)):
        return "bf16 convs need a CPU with AVX512-BF16 or AMX-BF16; this target has neither"
    return ""


def pipeline(model: LoadedModel, imported: ImportedModel, int8_ids, options: CompileOptions | None = None, *,
             database=None, report: BuildReport | None = None, fused_only: bool = False) -> tvm.transform.Sequential:
    """The passes :func:`build_plan` runs on the imported module, in order, before VM codegen.

    Parameters
    ----------
    model : LoadedModel
        The prepared model: layer ids, shapes, MACs (for the layout decision).
    imported : ImportedModel
        The plan's QDQ model imported with :func:`import_qdq_model`; the passes
        read its parameter values and weights, and run on ``imported.mod``.
    int8_ids : Plan or iterable of str
        The plan (a :class:`~precsearch.model.plan.Plan`), or the layer ids it runs
        int8; every other conv must come out float.
    options : CompileOptions, optional
        Target, block size, which precisions run blocked, requantization dtype.
    database : TuningDatabase, optional
        Tuned schedules applied after fusion; None keeps TVM's default schedules.
    report : BuildReport, optional
        Filled in while the passes run: the layout decision right away, then the
        per-layer table, kernel weights, tuned kernels (see :class:`BuildReport`).
    fused_only : bool
        Stop after FuseTIR, giving the kernels MetaSchedule tunes; no tuning is
        applied and nothing is lowered.

    Returns
    -------
    tvm.transform.Sequential
        Its ``passes`` lists every pass.  Run it under the target (add
        ``instruments=[...]`` to the ``PassContext`` to see every pass)::

            imported = import_qdq_model(qdq, model)
            report = BuildReport()
            passes = pipeline(model, imported, int8_ids, options, database=database, report=report)
            target = resolve_target(options)
            with target, tvm.transform.PassContext(opt_level=3):
                lowered = passes(imported.mod)
                executable = tvm.compile(lowered, target, relax_pipeline=None)

        which is what :func:`build_plan` does, except that ``build_plan`` retries
        with every conv in NCHW when the blocked graph fails ConvertLayout.

    Raises
    ------
    CompileError
        When the QDQ model does not quantize a layer the plan runs int8.
    """
    options = options or CompileOptions()
    report = report if report is not None else BuildReport()
    bf16_ids = tuple(getattr(int8_ids, "bf16_ids", ()))
    if hasattr(int8_ids, "int8_ids"):  # a Plan: the layers it keeps float are named, the int8 ones follow
        int8_ids = int8_ids.int8_ids(model)
    target = resolve_target(options)
    layer_ids = [layer.id for layer in model.layers]
    index_of = {layer.id: layer.index for layer in model.layers}
    int8_indices = {index_of[layer_id] for layer_id in int8_ids}
    bf16_indices = {index_of[layer_id] for layer_id in bf16_ids}
    float_indices = {layer.index for layer in model.layers if layer.index not in int8_indices
                     and layer.op_type == "Conv"}
    missing = sorted(int8_indices - set(imported.int8_weights))
    if missing:
        raise CompileError(f"the QDQ model does not quantize planned int8 layers {[layer_ids[i] for i in missing]}",
                           pass_name="precsearch.Import", layer_id=layer_ids[missing[0]])
    offload = options.conv_backend == "onednn"
    if offload and not _onednn.available():
        report.onednn_skipped = {layer_ids[i]: _onednn.unavailable_reason() for i in sorted(float_indices)}
        offload = False
    if bf16_indices:
        # bf16 convs are oneDNN's (AVX512-BF16 / AMX-BF16 kernels): there is no TIR bf16 conv to fall back to
        reason = bf16_unsupported_reason(options)
        if reason:
            raise ConfigError(f"{reason} (plan runs {layer_ids[min(bf16_indices)]} and {len(bf16_indices) - 1} "
                              "more in bf16)")
    has_vnni = _onednn.int8_fast_on(target)
    if options.onednn_int8 and not has_vnni:
        # without VNNI oneDNN's u8 x s8 kernels sum pairs of products in saturating int16 (vpmaddubsw): not the
        # exact integer conv the plan means
        raise ConfigError("int8 convs on oneDNN need a CPU with VNNI (AVX512-VNNI or AVX-VNNI); this target has "
                          "none: use --onednn-int8 auto or off")
    offload_int8 = offload and (has_vnni if options.onednn_int8 is None else options.onednn_int8)
    onednn_int8 = set()
    if offload_int8:
        for layer in model.layers:
            if layer.index not in int8_indices:
                continue
            if layer.macs >= options.onednn_int8_min_macs:
                onednn_int8.add(layer.index)
            else:
                report.onednn_skipped[layer.id] = (f"{layer.macs} MACs, below onednn_int8_min_macs "
                                                   f"({options.onednn_int8_min_macs}): a oneDNN call costs more")
    requested_block = options.block_size
    if offload and requested_block is None and not codegen.target_has_features("avx512f", target):
        # oneDNN's AVX2 convs are jitted for nChw8c only (nChw16c falls to its reference kernel).
        requested_block = 8
    block = choose_block_size(model.layers, requested_block)
    # conv2d_transpose has no NHWC lowering in TVM 0.27 (the VM cannot emit it): such models stay blocked
    transposed = [layer.id for layer in model.layers if layer.op_type != "Conv"]
    if options.activation_layout == "nhwc" and transposed:
        raise ConfigError(f"activation_layout 'nhwc' cannot build {transposed[0]!r} ({len(transposed)} "
                          "ConvTranspose layers): TVM has no NHWC ConvTranspose; use 'auto' or 'blocked'")
    nhwc = options.activation_layout == "nhwc" or (
        options.activation_layout == "auto" and offload and onednn_int8 == int8_indices and not transposed
        and codegen.target_has_features("avx512f", target)
        # a block size or an NCHW conv asked for is a blocked-layout build
        and options.block_size is None and options.float_blocked and options.int8_blocked)
    decisions = decide_layouts(model.layers, int8_indices, block, float_blocked=options.float_blocked,
                               int8_blocked=options.int8_blocked, nhwc=nhwc)
    report.int8_layers = tuple(layer_ids[i] for i in sorted(int8_indices))
    report.float_layers = tuple(layer.id for layer in model.layers if layer.index not in int8_indices)
    report.bf16_layers = tuple(layer_ids[i] for i in sorted(bf16_indices))
    report.block_size = block
    report.activation_layout = "NHWC" if nhwc else f"NCHW{block}c"
    report.layouts = decisions
    front = [
        Int8ConvRewrite(imported, layer_ids, options.requant_dtype, report=report),
        LowerQDQ(imported.params, report=report),
        *([SeparableMaxPool()] if options.separable_max_pool else []),
        relax.transform.ConvertLayout({}, layout_callback(decisions)),
        *([NHWCTransforms()] if nhwc else []),
        relax.transform.Normalize(),
        relax.transform.DeadCodeElimination(),
        InspectLayout(layer_ids, decisions, report=report),
        OffloadOneDNN(imported.params, layer_ids, float_indices if offload else (), decisions, options.threads,
                      report=report, int8_layers=onednn_int8, bf16_layers=bf16_indices,
                      int8_activation=options.onednn_int8_activation, bf16_chains=options.onednn_bf16_chains,
                      residual_add=options.onednn_residual_add, fold_zero_points=options.onednn_fold_zero_points),
        *([OffloadDenseOneDNN(options.threads, report=report)] if offload and options.onednn_dense else []),
        *([FastSigmoid()] if options.fast_sigmoid else []),
        *cpu_pipeline.library_dispatch_passes(target),
        relax.transform.LegalizeOps({"relax.nn.conv2d": make_conv_legalizer(layer_ids, decisions, report=report)}),
        relax.transform.AnnotateTIROpPattern(),
        InjectiveTake(),
        # Weights become constants so their layout transforms are folded at build time, not run per call.
        relax.transform.BindParams("main", imported.params),
        relax.transform.FoldConstant(),
        relax.transform.DeadCodeElimination(),
        VerifyPlan(imported, layer_ids, int8_indices, float_indices, report=report, bf16_indices=bf16_indices),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    if fused_only:
        return tvm.transform.Sequential(front, name="precsearch.Front")
    return tvm.transform.Sequential(
        [
            *front,
            ApplyTuning(database, target, layer_ids, report=report, parallel_fallback=options.parallel_fallback,
                        fallback_inline=options.fallback_inline,
                        fallback_partition_selects=options.fallback_partition_selects),
            *cpu_pipeline.dataflow_lower_passes(target),
            *cpu_pipeline.finalize_passes(target),
        ],
        name="precsearch.BuildPlan",
    )
