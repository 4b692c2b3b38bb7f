"""The build of one plan: import, the pass pipeline, codegen, and loading the library back."""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import tvm
from tvm import relax

from precsearch.errors import CompileError, ConfigError, VerificationError
from precsearch.model import LoadedModel
from ._build_report import BuildReport, LayerRow
from . import _onednn
from ._importer import import_qdq_model
from ._naming import layer_in_text
from ._openmp_loops import route_parallel_loops
from ._options import CompileOptions, host_target, resolve_target
from ._pipeline import pipeline
from ._trace import PassTracer, tvm_error_line

__all__ = ["BuiltPlan", "CompileOptions", "LoadedLibrary", "build_plan", "fused_module", "host_target",
           "resolve_target"]

logger = logging.getLogger(__name__)


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
    onednn_kernels: dict[str, str] = field(default_factory=dict)  # layer id → oneDNN implementation it runs
    onednn_skipped: dict[str, str] = field(default_factory=dict)  # float convs kept on TIR, and why
    onednn_dense: dict[str, str] = field(default_factory=dict)  # dense layer "<K>x<M>" → oneDNN implementation
    bf16_layers: tuple[str, ...] = ()  # float layers whose conv runs in bf16 (on oneDNN)
    bf16_chained: tuple[str, ...] = ()  # bf16 convs that read their input in bf16, as another bf16 conv wrote it
    activation_layout: str = ""  # "NHWC", or "NCHW<b>c" where a conv's shape allows (options.activation_layout)
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
            self._vm = virtual_machine(self.executable)
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
        if _onednn.available():  # a library with oneDNN convs calls the bridge's registered function
            _onednn.load()
        self._vm = virtual_machine(tvm.runtime.load_module(str(self.path)))

    def virtual_machine(self):
        """The Relax VM running the library on the CPU."""
        return self._vm

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _run_vm(self._vm, self.input_names, self.output_names, inputs)


def virtual_machine(module) -> relax.VirtualMachine:
    """A Relax VM on the CPU for ``module`` (an Executable or a loaded library), its TIR loops on the OpenMP pool
    its oneDNN convs use (see ``_openmp_loops``)."""
    vm = relax.VirtualMachine(module, tvm.cpu())
    route_parallel_loops()
    return vm


def _run_vm(vm, input_names, output_names, inputs) -> dict[str, np.ndarray]:
    args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[name]), tvm.cpu()) for name in input_names]
    result = vm["main"](*args)
    values = list(result) if not hasattr(result, "numpy") else [result]
    return {name: value.numpy() for name, value in zip(output_names, values)}


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
    report = BuildReport()
    imported = import_qdq_model(qdq_model, model)
    passes = pipeline(model, imported, int8_ids, options, report=report, fused_only=True)
    try:
        with target, tvm.transform.PassContext(opt_level=3, instruments=[tracer]):
            return passes(imported.mod)
    except Exception as exc:
        _raise_compile_error(exc, tracer, [layer.id for layer in model.layers], report)


def build_plan(model: LoadedModel, qdq_model: onnx.ModelProto, int8_ids, *,
               options: CompileOptions | None = None, dump_ir_dir: str | Path | None = None,
               database=None) -> BuiltPlan:
    """Build one plan: import, integer rewrite, layout, legalize, fold, verify, apply tuning, compile.

    The passes are those of :func:`pipeline`; when the blocked graph fails
    ConvertLayout the plan is rebuilt with every conv in NCHW and says so
    (``layout_fallback``, and each row's note).

    Parameters
    ----------
    model : LoadedModel
        The prepared model (layer ids, shapes).
    qdq_model : onnx.ModelProto
        The plan's mixed QDQ model (or the float model for an all-float plan).
    int8_ids : Plan or iterable of str
        The plan, or the layer ids it runs int8 (every other conv must come out float32); a plan with bf16
        layers must be given whole.
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
    tracer = PassTracer(dump_ir_dir)
    report = BuildReport()
    imported = import_qdq_model(qdq_model, model)
    passes = pipeline(model, imported, int8_ids, options, database=database, report=report)
    tracer.dump(imported.mod, "precsearch.Import")
    try:
        with target, tvm.transform.PassContext(opt_level=3, instruments=[tracer]):
            lowered = passes(imported.mod)
            executable = tvm.compile(lowered, target, relax_pipeline=None)
    except Exception as exc:
        _raise_compile_error(exc, tracer, [layer.id for layer in model.layers], report)
    elapsed = time.perf_counter() - start
    logger.info("built plan with %d int8 / %d float layers in %.1f s", len(report.int8_layers),
                len(report.float_layers), elapsed)
    return BuiltPlan(
        executable=executable,
        input_names=imported.input_names,
        output_names=imported.output_names,
        int8_layers=report.int8_layers,
        float_layers=report.float_layers,
        rows=report.rows,
        block_size=report.block_size,
        boundary_transforms=report.boundary_transforms,
        target=str(target),
        build_time_s=elapsed,
        passes_run=tracer.count,
        dump_files=list(tracer.files),
        kernel_weights=dict(report.kernel_weights),
        tuned_kernels=report.tuned_kernels,
        total_kernels=report.total_kernels,
        operator_notes=imported.operator_notes,
        operator_layouts=report.operator_layouts,
        untuned_convs=report.untuned_convs,
        onednn_kernels={layer: report.onednn_kernels[layer] for layer in report.onednn_layers},
        onednn_skipped=dict(report.onednn_skipped),
        onednn_dense=dict(report.onednn_dense),
        bf16_layers=report.bf16_layers,
        bf16_chained=tuple(report.bf16_chained),
        activation_layout=report.activation_layout,
    )


def _raise_compile_error(exc: Exception, tracer: PassTracer, layer_ids, report: BuildReport) -> None:
    if isinstance(exc, CompileError):  # raised by our code without passing through TVM's FFI
        raise exc
    ours = _precsearch_error(exc, report)
    if ours is not None:  # raised in one of our Python passes, re-raised by TVM's FFI
        raise ours from exc
    failed = tracer.current or "codegen"
    index = layer_in_text(str(exc), layer_ids)
    raise CompileError(tvm_error_line(exc), pass_name=failed,
                       layer_id=layer_ids[index] if index is not None else None) from exc


_OUR_PREFIX = re.compile(r"\[pass '([^']+)'(?:, layer '([^']+)')?\] (.*)")


def _precsearch_error(exc: BaseException, report: BuildReport) -> CompileError | None:
    """The CompileError a precsearch pass raised inside TVM, which TVM re-raised as a plain RuntimeError.

    TVM's FFI re-raises a Python exception from inside a pass as a new
    RuntimeError with the same text and nothing else: no ``__cause__`` or
    ``__context__``, no ``pass_name``/``layer_id`` (checked on apache-tvm 0.27.0
    with apache-tvm-ffi 0.1.14).  So the passes of :func:`pipeline` keep the
    object in the build's report, matched here to the exception by its text.
    """
    if report.failure is not None and str(report.failure) in str(exc):
        return report.failure
    # Fallback for when the object is gone: a precsearch pass built without this
    # report (a pipeline put together by hand) raised it; read back what CompileError wrote.
    for line in str(exc).splitlines():
        match = _OUR_PREFIX.search(line)
        if match:
            error_type = VerificationError if match.group(1) == "precsearch.VerifyPlan" else CompileError
            return error_type(match.group(3).strip(), pass_name=match.group(1), layer_id=match.group(2))
    return None
