"""Everything that touches TVM: import, integer rewrite, layout, verify, build, tune, time, RPC.

This subpackage is the only place that imports TVM; the rest of precsearch hands
it a prepared model, a QDQ model and the ids of the int8 layers, and gets back a
:class:`BuiltPlan` to run and time.
"""

from ._build import BuiltPlan, CompileOptions, LoadedLibrary, build_plan, fused_module, host_target, resolve_target
from ._onnx_rewrite import OperatorNote, unsupported_operators
from ._profile import KernelTime, profile_kernels
from ._rpc import RpcTarget, check_tracker, measure_remote, parse_tracker, run_remote
from ._timing import measure_library
from ._tune import (TuningDatabase, TuningReport, TuningTask, check_trials, database_dir, extract_tuning_tasks,
                    open_database, tune_tasks)
from ._verify import LayerRow

__all__ = ["BuiltPlan", "CompileOptions", "KernelTime", "LayerRow", "LoadedLibrary", "OperatorNote", "RpcTarget",
           "TuningDatabase", "TuningReport", "TuningTask", "build_plan", "check_tracker", "check_trials", "database_dir",
           "extract_tuning_tasks", "fused_module", "host_target", "measure_library", "measure_remote", "open_database", "parse_tracker",
           "profile_kernels", "resolve_target", "run_remote", "tune_tasks", "unsupported_operators"]
