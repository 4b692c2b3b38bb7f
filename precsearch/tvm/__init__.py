"""Everything that touches TVM: import, integer rewrite, layout, verify, build, tune, time, RPC.

This subpackage is the only place that imports TVM; the rest of precsearch hands
it a prepared model, a QDQ model and the ids of the int8 layers, and gets back a
:class:`BuiltPlan` to run and time.  :func:`pipeline` gives the pass sequence of
that build, to run or inspect by hand.
"""

import os

# TVM's thread pool starts with at most TVM_NUM_THREADS workers, else half the
# hardware threads (1 on a 2-vCPU machine), and ``runtime.config_threadpool`` can
# lower that count but never raise it: without this, every parallel TIR loop ran
# on one core while precsearch asked for two (measured: PP-LCNet's untuned float
# build 175 → 90 ms).  Set before TVM creates the pool; a user's own value wins.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
# After each parallel loop TVM's workers spin (300000 rounds by default) before they
# sleep; with oneDNN's OpenMP threads taking the cores between TIR kernels that spin
# made MobileNetV3's oneDNN build 11.2 ms instead of 1.46 ms (Zen 3, 2 cores; 3000
# rounds: 10.9 ms, 0: 2.8 ms, wake-ups each time). Read once, when the pool starts.
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "1000")

from ._build import BuiltPlan, LoadedLibrary, build_plan, fused_module
from ._build_report import BuildReport, LayerRow
from ._importer import ImportedModel, import_qdq_model
from ._onnx_rewrite import OperatorNote, unsupported_operators
from ._onednn import ONEDNN_REQUIREMENT
from ._options import ONEDNN_INT8_SETTINGS, CompileOptions, host_target, resolve_target
from ._pipeline import bf16_unsupported_reason, pipeline
from ._profile import KernelTime, profile_kernels
from ._rpc import RpcTarget, check_tracker, measure_remote, parse_tracker, run_remote
from ._timing import measure_library
from ._tune_database import TuningDatabase, database_dir, database_stamp, open_database
from ._tune_tasks import (ExtractedTasks, TuningReport, TuningTask, check_trials, extract_tuning_tasks,
                          rank_heaviest_first, tune_tasks)

__all__ = ["BuildReport", "BuiltPlan", "CompileOptions", "ONEDNN_INT8_SETTINGS", "ONEDNN_REQUIREMENT", "ImportedModel", "KernelTime", "LayerRow", "LoadedLibrary",
           "ExtractedTasks", "OperatorNote", "RpcTarget", "TuningDatabase", "TuningReport", "TuningTask", "bf16_unsupported_reason",
           "build_plan", "check_tracker",
           "check_trials", "database_dir", "database_stamp", "extract_tuning_tasks", "fused_module", "host_target", "import_qdq_model",
           "measure_library", "measure_remote", "open_database", "parse_tracker", "pipeline", "profile_kernels",
           "rank_heaviest_first", "resolve_target", "run_remote", "tune_tasks", "unsupported_operators"]
