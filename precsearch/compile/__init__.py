"""Everything that touches TVM Relax: import, integer rewrite, layout, verify, build, tune.

This subpackage is the only place that imports TVM; the rest of precsearch hands
it a prepared model, a QDQ model and the ids of the int8 layers.
"""

from ._build import BuiltPlan, CompileOptions, LoadedLibrary, build_plan, fused_module, host_target, resolve_target
from ._tune import TuningDatabase, TuningReport, TuningTask, check_trials, database_dir, extract_tuning_tasks, tune_tasks
from ._onnx_rewrite import OperatorNote, unsupported_operators
from ._verify import LayerRow

__all__ = ["BuiltPlan", "CompileOptions", "LayerRow", "LoadedLibrary", "OperatorNote", "TuningDatabase", "TuningReport",
           "TuningTask", "build_plan", "check_trials", "database_dir", "extract_tuning_tasks", "fused_module", "host_target",
           "resolve_target", "tune_tasks", "unsupported_operators"]
