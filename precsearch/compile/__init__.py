"""Everything that touches TVM Relax: import, integer rewrite, layout, verify, build.

This subpackage is the only place that imports ``tvm.relax``; the rest of
precsearch hands it a prepared model, a QDQ model and the ids of the int8 layers.
"""

from ._build import BuiltPlan, CompileOptions, LoadedLibrary, build_plan, host_target
from ._verify import LayerRow

__all__ = ["BuiltPlan", "CompileOptions", "LayerRow", "LoadedLibrary", "build_plan", "host_target"]
