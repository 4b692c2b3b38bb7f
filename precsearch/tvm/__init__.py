"""Everything that touches TVM: import, integer rewrite, layout, verify, build, tune, time, RPC.

This subpackage is the only place that imports TVM; the rest of precsearch hands
it a prepared model, a QDQ model and the ids of the int8 layers, and gets back a
:class:`BuiltPlan` to run and time.  :func:`pipeline` gives the pass sequence of
that build, to run or inspect by hand.
"""

from ._build import BuiltPlan, LoadedLibrary, build_plan, fused_module
from ._build_report import BuildReport, LayerRow
from ._importer import ImportedModel, import_qdq_model
from ._onnx_rewrite import OperatorNote, unsupported_operators
from ._onednn import ONEDNN_REQUIREMENT
from ._options import CompileOptions, host_target, resolve_target
from ._pipeline import pipeline
from ._profile import KernelTime, profile_kernels
from ._rpc import RpcTarget, check_tracker, measure_remote, parse_tracker, run_remote
from ._timing import measure_library
from ._tune_database import TuningDatabase, database_dir, open_database
from ._tune_tasks import TuningReport, TuningTask, check_trials, extract_tuning_tasks, tune_tasks

__all__ = ["BuildReport", "BuiltPlan", "CompileOptions", "ONEDNN_REQUIREMENT", "ImportedModel", "KernelTime", "LayerRow", "LoadedLibrary",
           "OperatorNote", "RpcTarget", "TuningDatabase", "TuningReport", "TuningTask", "build_plan", "check_tracker",
           "check_trials", "database_dir", "extract_tuning_tasks", "fused_module", "host_target", "import_qdq_model",
           "measure_library", "measure_remote", "open_database", "parse_tracker", "pipeline", "profile_kernels",
           "resolve_target", "run_remote", "tune_tasks", "unsupported_operators"]
