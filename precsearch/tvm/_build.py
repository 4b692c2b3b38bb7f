"""The build of one plan: the pass pipeline, the shared library, and loading it back."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import tvm
import tvm.tirx
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline

from precsearch.errors import CompileError, ConfigError, VerificationError
from precsearch.model import LoadedModel
from ._importer import import_qdq_model
from ._int8_rewrite import Int8ConvRewrite
from ._layout import choose_block_size, decide_layouts, layout_callback, make_conv_legalizer
from ._qdq_lower import LowerQDQ
from ._trace import PassTracer, tvm_error_line
from ._tune import ApplyTuning
from ._verify import InspectLayout, LayerRow, VerifyPlan

logger = logging.getLogger(__name__)


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
    """

    target: dict | str | None = None
    block_size: int | None = None
    float_blocked: bool = True
    int8_blocked: bool = True
    threads: int = 2
    requant_dtype: str = "float64"

    def __post_init__(self):
        if self.requant_dtype not in ("float64", "float32"):
            raise ConfigError(f"The 'requant_dtype' parameter of compile must be 'float64' or 'float32'; "
                              f"got {self.requant_dtype!r} instead.")
        if self.block_size is not None and self.block_size not in (4, 8, 16, 32):
            raise ConfigError(f"The 'block_size' parameter of compile must be one of 4, 8, 16, 32 or None; "
                              f"got {self.block_size!r} instead.")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"The 'threads' parameter of compile must be a positive int; got {self.threads!r} "
                              "instead.")


def host_target(threads: int = 2) -> tvm.target.Target:
    """The LLVM target of this CPU: without ``mcpu`` LLVM emits generic x86-64 (no AVX-512, no VNNI)."""
    from tvm.target import codegen

    return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": threads})


def resolve_target(options: CompileOptions) -> tvm.target.Target:
    if options.target is None:
        return host_target(options.threads)
    spec = json.loads(options.target) if isinstance(options.target, str) else dict(options.target)
    try:
        return tvm.target.Target(spec)
    except Exception as exc:
        raise ConfigError(f"The 'target' parameter of compile is not a valid TVM target; got {spec!r} instead.") \
            from exc


@dataclass
class BuiltPlan:
    """A compiled plan: the executable plus what was built, layer by layer."""

    executable: object
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    int8_layers: tuple[str, ...]
    float_layers: tuple[str, ...]
    rows: list[LayerRow]
    block_size: int
    boundary_transforms: int
    target: str
    build_time_s: float
    passes_run: int
    dump_files: list[Path] = field(default_factory=list)
    kernel_weights: dict[str, np.ndarray] = field(default_factory=dict)
    tuned_kernels: int = 0  # kernels scheduled from the tuning database
    total_kernels: int = 0
    untuned_convs: tuple[str, ...] = ()  # layers whose conv kernel had no tuning record
    operator_notes: tuple = ()  # OperatorNote: ONNX nodes rewritten before import
    operator_layouts: list[dict] = field(default_factory=list)  # per Relax op: blocked / NCHW fallback counts
    layout_fallback: str = ""  # why every conv was built NCHW (the blocked graph failed ConvertLayout)
    _vm: object = None

    def export_library(self, path: str | Path) -> Path:
        """Save the compiled module as a shared library loadable with :func:`load_library`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.executable.export_library(str(path))
        return path

    def virtual_machine(self):
        """The Relax VM running this plan on the CPU (created once)."""
        if self._vm is None:
            self._vm = relax.VirtualMachine(self.executable, tvm.cpu())
        return self._vm

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; outputs by ONNX output name."""
        return _run_vm(self.virtual_machine(), self.input_names, self.output_names, inputs)


class LoadedLibrary:
    """A shared library written by :meth:`BuiltPlan.export_library`, loaded back."""

    def __init__(self, path: str | Path, input_names, output_names):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"The 'library' parameter of load_library must be an existing file; "
                              f"got {str(path)!r} instead.")
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self._vm = relax.VirtualMachine(tvm.runtime.load_module(str(self.path)), tvm.cpu())

    def virtual_machine(self):
        """The Relax VM running the library on the CPU."""
        return self._vm

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _run_vm(self._vm, self.input_names, self.output_names, inputs)


def _run_vm(vm, input_names, output_names, inputs) -> dict[str, np.ndarray]:
    args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[name]), tvm.cpu()) for name in input_names]
    result = vm["main"](*args)
    values = list(result) if not hasattr(result, "numpy") else [result]
    return {name: value.numpy() for name, value in zip(output_names, values)}


@dataclass
class _Front:
    """The plan lowered to fused TIR kernels, before memory planning and codegen."""

    imported: object
    passes: list
    inspect: InspectLayout
    verify: VerifyPlan
    block_size: int
    int8_indices: set
    float_indices: set


def _front(model: LoadedModel, qdq_model: onnx.ModelProto, int8_ids, options: CompileOptions,
           target) -> _Front:
    layer_ids = [layer.id for layer in model.layers]
    index_of = {layer.id: layer.index for layer in model.layers}
    int8_indices = {index_of[layer_id] for layer_id in int8_ids}
    float_indices = {layer.index for layer in model.layers if layer.index not in int8_indices
                     and layer.op_type == "Conv"}
    imported = import_qdq_model(qdq_model, model)
    missing = sorted(int8_indices - set(imported.int8_weights))
    if missing:
        raise CompileError(f"the QDQ model does not quantize planned int8 layers {[layer_ids[i] for i in missing]}",
                           pass_name="precsearch.Import", layer_id=layer_ids[missing[0]])
    block = choose_block_size(model.layers, options.block_size)
    decisions = decide_layouts(model.layers, int8_indices, block, float_blocked=options.float_blocked,
                               int8_blocked=options.int8_blocked)
    inspect = InspectLayout(layer_ids, decisions)
    verify = VerifyPlan(imported, layer_ids, int8_indices, float_indices)
    passes = [
        Int8ConvRewrite(imported, layer_ids, options.requant_dtype),
        LowerQDQ(imported.params),
        relax.transform.ConvertLayout({}, layout_callback(decisions)),
        relax.transform.Normalize(),
        relax.transform.DeadCodeElimination(),
        inspect,
        *cpu_pipeline.library_dispatch_passes(target),
        relax.transform.LegalizeOps({"relax.nn.conv2d": make_conv_legalizer(layer_ids, decisions)}),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.BindParams("main", imported.params),
        relax.transform.FoldConstant(),
        relax.transform.DeadCodeElimination(),
        verify,
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    return _Front(imported, passes, inspect, verify, block, int8_indices, float_indices)


def _raise_compile_error(exc: Exception, tracer: PassTracer, layer_ids) -> None:
    if isinstance(exc, CompileError):
        raise exc
    ours = _precsearch_error(exc)
    if ours is not None:  # raised in one of our Python passes, wrapped by TVM's FFI
        raise ours from exc
    failed = tracer.current or "codegen"
    raise CompileError(tvm_error_line(exc), pass_name=failed, layer_id=_layer_in_message(str(exc), layer_ids)) \
        from exc


def _pipeline(front: _Front, target, apply_tuning: ApplyTuning):
    return tvm.transform.Sequential(
        [
            *front.passes,
            apply_tuning,
            *cpu_pipeline.dataflow_lower_passes(target),
            *cpu_pipeline.finalize_passes(target),
        ],
        name="precsearch.BuildPlan",
    )


# Passes whose failure on a blocked graph is a layout-inference gap, not a broken plan:
# the plan is rebuilt with every conv in NCHW rather than failed.
_LAYOUT_PASSES = ("ConvertLayout", "precsearch.InspectLayout")


def _layout_failure(exc: CompileError, options: CompileOptions) -> bool:
    return exc.pass_name in _LAYOUT_PASSES and (options.float_blocked or options.int8_blocked)


def _nchw_options(options: CompileOptions, exc: CompileError) -> CompileOptions:
    logger.warning("the blocked graph failed %s (%s); building every conv in NCHW instead", exc.pass_name, exc)
    return dataclasses.replace(options, float_blocked=False, int8_blocked=False)


def fused_module(model: LoadedModel, qdq_model: onnx.ModelProto, int8_ids, *,
                 options: CompileOptions | None = None) -> tvm.IRModule:
    """The plan's module after fusion: the kernels MetaSchedule tunes (``extract_tasks`` needs them fused)."""
    options = options or CompileOptions()
    try:
        return _fused_module(model, qdq_model, int8_ids, options)
    except CompileError as exc:
        if not _layout_failure(exc, options):
            raise
        return _fused_module(model, qdq_model, int8_ids, _nchw_options(options, exc))


def _fused_module(model, qdq_model, int8_ids, options: CompileOptions) -> tvm.IRModule:
    target = resolve_target(options)
    tracer = PassTracer(None)
    front = _front(model, qdq_model, int8_ids, options, target)
    try:
        with target, tvm.transform.PassContext(opt_level=3, instruments=[tracer]):
            return tvm.transform.Sequential(front.passes, name="precsearch.Front")(front.imported.mod)
    except Exception as exc:
        _raise_compile_error(exc, tracer, [layer.id for layer in model.layers])


def build_plan(model: LoadedModel, qdq_model: onnx.ModelProto, int8_ids, *,
               options: CompileOptions | None = None, dump_ir_dir: str | Path | None = None,
               database=None) -> BuiltPlan:
    """Build one plan: import, integer rewrite, layout, legalize, fold, verify, apply tuning, compile.

    Parameters
    ----------
    model : LoadedModel
        The prepared model (layer ids, shapes).
    qdq_model : onnx.ModelProto
        The plan's mixed QDQ model (or the float model for an all-float plan).
    int8_ids : iterable of str
        Layer ids the plan runs int8; every other conv must come out float.
    options : CompileOptions, optional
    dump_ir_dir : path, optional
        Write the IR after every pass there, numbered in run order.
    database : TuningDatabase, optional
        Tuned schedules to apply (see :func:`open_database`); kernels it has no
        record for are compiled with TVM's default schedule (slow, but correct).
    """
    options = options or CompileOptions()
    start = time.perf_counter()
    try:
        return _build_plan(model, qdq_model, int8_ids, options, dump_ir_dir, database, start)
    except CompileError as exc:
        if not _layout_failure(exc, options):
            raise
        built = _build_plan(model, qdq_model, int8_ids, _nchw_options(options, exc), dump_ir_dir, database, start)
        built.layout_fallback = f"{exc}"
        for row in built.rows:
            row.note = f"kept NCHW: the blocked graph failed {exc.pass_name}"
        return built


def _build_plan(model, qdq_model, int8_ids, options: CompileOptions, dump_ir_dir, database, start) -> BuiltPlan:
    target = resolve_target(options)
    layer_ids = [layer.id for layer in model.layers]
    tracer = PassTracer(dump_ir_dir)
    front = _front(model, qdq_model, int8_ids, options, target)
    tracer.dump(front.imported.mod, "precsearch.Import")
    apply_tuning = ApplyTuning(database, target)
    try:
        with target, tvm.transform.PassContext(opt_level=3, instruments=[tracer]):
            executable = tvm.compile(front.imported.mod, target, relax_pipeline=_pipeline(front, target, apply_tuning))
    except Exception as exc:
        _raise_compile_error(exc, tracer, layer_ids)
    elapsed = time.perf_counter() - start
    int8_indices, float_indices = front.int8_indices, front.float_indices
    logger.info("built plan with %d int8 / %d float convs in %.1f s", len(int8_indices), len(float_indices), elapsed)
    return BuiltPlan(
        executable=executable,
        input_names=front.imported.input_names,
        output_names=front.imported.output_names,
        int8_layers=tuple(layer_ids[i] for i in sorted(int8_indices)),
        float_layers=tuple(layer.id for layer in model.layers if layer.index not in int8_indices),
        rows=front.inspect.rows,
        block_size=front.block_size,
        boundary_transforms=front.inspect.boundary_transforms,
        target=str(target),
        build_time_s=elapsed,
        passes_run=tracer.count,
        dump_files=list(tracer.files),
        kernel_weights={layer_ids[i]: weights for i, weights in front.verify.kernel_weights.items()},
        tuned_kernels=sum(apply_tuning.scheduled.values()),
        total_kernels=len(apply_tuning.scheduled),
        operator_notes=front.imported.operator_notes,
        operator_layouts=front.inspect.operators.rows(),
        untuned_convs=tuple(layer_ids[i] for i in sorted(_conv_indices(name) for name, tuned in apply_tuning.scheduled.items()
                                                        if not tuned and _conv_indices(name) is not None)),
    )


def _conv_indices(kernel_name: str) -> int | None:
    match = re.search(r"ps_conv_L(\d+)_", kernel_name)
    return int(match.group(1)) if match else None


_OUR_PREFIX = re.compile(r"\[pass '([^']+)'(?:, layer '([^']+)')?\] (.*)")


def _precsearch_error(exc: BaseException) -> CompileError | None:
    """Recover a CompileError raised inside a pass and re-raised by TVM as a generic error."""
    seen = exc
    while seen is not None:
        if isinstance(seen, CompileError):
            return seen
        seen = seen.__cause__ or seen.__context__
    for line in str(exc).splitlines():
        match = _OUR_PREFIX.search(line)
        if match:
            error_type = VerificationError if match.group(1) == "precsearch.VerifyPlan" else CompileError
            return error_type(match.group(3).strip(), pass_name=match.group(1), layer_id=match.group(2))
    return None


def _layer_in_message(message: str, layer_ids) -> str | None:
    # Bindings emitted by precsearch are named L<index>_...; TVM prints them in its errors.
    match = re.search(r"\bL(\d+)_[a-z]", message) or re.search(r"\bps_w(\d+)\b", message)
    if match and int(match.group(1)) < len(layer_ids):
        return layer_ids[int(match.group(1))]
    return None
