"""What the passes of one build found, written down by the passes themselves as they run.

:func:`~precsearch.tvm.pipeline` hands one :class:`BuildReport` to every
precsearch pass it creates; each fills in its part, and ``build_plan`` makes the
:class:`~precsearch.tvm.BuiltPlan` from it.  A pass constructed without a report
gets a private one, so passes can be run one at a time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from precsearch.errors import CompileError


@dataclass
class LayerRow:
    """One conv as built: what the per-layer table prints."""

    index: int
    id: str
    dtype: str  # "int8", "float32" or "bfloat16" (a float conv oneDNN runs in bf16)
    layout: str
    transforms_in: list[str] = field(default_factory=list)
    transforms_out: list[str] = field(default_factory=list)
    note: str = ""
    backend: str = "tir"  # "onednn" when OffloadOneDNN handed the conv to oneDNN
    fused: str = ""  # what the oneDNN primitive absorbed (bias, activation)

    def to_dict(self) -> dict:
        return {"index": self.index, "id": self.id, "dtype": self.dtype, "layout": self.layout,
                "transforms_in": self.transforms_in, "transforms_out": self.transforms_out, "note": self.note,
                "backend": self.backend, "fused": self.fused}


@dataclass
class BuildReport:
    """Filled in during one run of the pipeline; each field names the pass that writes it."""

    # pipeline(): the plan and the layout decision it was built with
    int8_layers: tuple[str, ...] = ()
    float_layers: tuple[str, ...] = ()
    bf16_layers: tuple[str, ...] = ()  # among the float ones
    block_size: int = 0
    activation_layout: str = ""  # "NHWC" or "NCHW<b>c"
    layouts: dict = field(default_factory=dict)  # layer index → LayerLayout
    # Int8ConvRewrite: layers rewritten to an integer conv, and each one's quantization by layer index
    rewritten_int8: list[str] = field(default_factory=list)
    int8_quantization: dict = field(default_factory=dict)
    # InspectLayout: the per-layer table, activation transforms, per-op layout counts
    rows: list[LayerRow] = field(default_factory=list)
    boundary_transforms: int = 0
    operator_layouts: list[dict] = field(default_factory=list)
    # OffloadOneDNN: layers whose conv runs on oneDNN, what each primitive fused, its kernel,
    # and convs left on TIR with the reason
    onednn_layers: list[str] = field(default_factory=list)
    onednn_fused: dict[str, str] = field(default_factory=dict)
    onednn_kernels: dict[str, str] = field(default_factory=dict)
    onednn_skipped: dict[str, str] = field(default_factory=dict)
    bf16_chained: list[str] = field(default_factory=list)  # bf16 convs reading another bf16 conv's bf16 output
    # OffloadDenseOneDNN: dense layers ("<K>x<M>") run as oneDNN primitives, with oneDNN's kernel name
    onednn_dense: dict[str, str] = field(default_factory=dict)
    # VerifyPlan: the unpacked OIHW weights each conv kernel received, by layer id
    kernel_weights: dict[str, np.ndarray] = field(default_factory=dict)
    # ApplyTuning: kernel name → scheduled from the database; why a record did not apply;
    # layers whose conv kernel kept TVM's default schedule (in layer order)
    kernels_tuned: dict[str, bool] = field(default_factory=dict)
    not_applied: dict[str, str] = field(default_factory=dict)
    untuned_convs: tuple[str, ...] = ()
    fallback_scheduled: int = 0  # kernels without a record that got parallel outer loops instead
    # any precsearch pass: the error it raised, as raised (see recording_failure)
    failure: CompileError | None = None

    @property
    def tuned_kernels(self) -> int:
        return sum(self.kernels_tuned.values())

    @property
    def total_kernels(self) -> int:
        return len(self.kernels_tuned)

    @contextlib.contextmanager
    def recording_failure(self):
        """Keep the CompileError a pass raises: TVM's FFI passes on only its kind and text.

        A Python exception raised inside a pass that TVM runs comes back out of
        the pass call as a new ``RuntimeError`` with the same message and no
        ``__cause__``/``__context__`` (apache-tvm-ffi 0.1.14: the error object
        holds kind, message and backtrace strings).  The build matches the kept
        object to the exception it catches by message.
        """
        try:
            yield
        except CompileError as exc:
            self.failure = exc
            raise


class ReportingPass:
    """Base of precsearch's module passes: each writes what it finds into one :class:`BuildReport`.

    ``transform_module`` runs :meth:`run` keeping any CompileError in the report
    (:meth:`BuildReport.recording_failure`), so the build can re-raise it whole.
    """

    def __init__(self, report: BuildReport | None = None):
        self.report = report if report is not None else BuildReport()

    def transform_module(self, mod, _ctx):
        with self.report.recording_failure():
            return self.run(mod)

    def run(self, mod):
        raise NotImplementedError
