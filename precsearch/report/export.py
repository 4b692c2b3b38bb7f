"""Export a trial of a study: the compiled library, the mixed QDQ model, and the float layers for other tools.

The plan is rebuilt by the search's own backend from the study's stored
settings, with the same cached calibration and tuning database, so the library
computes what the trial measured.  The float layer list is written in the forms three quantizers take:
ONNX Runtime's ``nodes_to_exclude``, NNCF's ``IgnoredScope(names=...)`` and
Intel Neural Compressor's ``op_name_dict``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from precsearch.study.config import SearchConfig
from precsearch.errors import ConfigError
from precsearch.files import atomic_write
from precsearch.study.record import StudyAttrs, TrialRecord
from precsearch.workspace import Workspace
from precsearch.model import open_model


logger = logging.getLogger(__name__)

ORT_SNIPPET = '''"""Quantize the model with ONNX Runtime, keeping the float layers precsearch chose (trial {trial})."""
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

NODES_TO_EXCLUDE = {names}

# quantize_static("model.onnx", "model.int8.onnx", calibration_data_reader,
#                 quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
#                 per_channel=True, op_types_to_quantize=["Conv"], nodes_to_exclude=NODES_TO_EXCLUDE)
'''
NNCF_SNIPPET = '''"""Quantize with NNCF, keeping the float layers precsearch chose (trial {trial})."""
import nncf

IGNORED_SCOPE = nncf.IgnoredScope(names={names})

# quantized = nncf.quantize(model, calibration_dataset, ignored_scope=IGNORED_SCOPE)
'''
INC_SNIPPET = '''"""Quantize with Intel Neural Compressor, keeping the float layers precsearch chose (trial {trial})."""
FLOAT_LAYERS = {names}
OP_NAME_DICT = {{name: {{"activation": {{"dtype": ["fp32"]}}, "weight": {{"dtype": ["fp32"]}}}}
                for name in FLOAT_LAYERS}}

# from neural_compressor import PostTrainingQuantConfig, quantization
# config = PostTrainingQuantConfig(op_name_dict=OP_NAME_DICT)
# quantized = quantization.fit(model, config, calib_dataloader=calibration_dataloader)
'''


def export_trial(study, trial_number: int, out_dir: str | Path, workdir: str | Path) -> dict:
    """Write ``model.so``, ``model.qdq.onnx``, ``plan.json`` and the three snippets for one completed trial.

    Returns
    -------
    dict
        The content of ``plan.json``.
    """
    trials = study.get_trials(deepcopy=False)
    if not 0 <= trial_number < len(trials):
        raise ConfigError(f"The 'trial' parameter of export must be a trial number of study {study.study_name!r} "
                          f"(0 … {len(trials) - 1}); got {trial_number} instead.")
    record = TrialRecord.from_trial(trials[trial_number])
    if record.state != "COMPLETE":
        reason = f": {record.fail_reason}" if record.fail_reason else ""
        raise ConfigError(f"The 'trial' parameter of export must name a completed trial; trial {trial_number} is "
                          f"{record.state.lower()}{reason}.")
    trial = trials[trial_number]
    attrs = StudyAttrs(study)
    config = SearchConfig.from_dict(attrs.config)
    model, preset = open_model(config.model, config.input_shapes)
    if model.sha256 != attrs.model_sha256:
        raise ConfigError(f"The model {config.model!r} is not the one study {study.study_name!r} was made for.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The search's own workspace, from the same cached calibration and tuning database: the same build.
    build = Workspace.from_config(config, model, workdir, preset).build(record.plan)
    plan, qdq, built = record.plan, build.qdq, build.built
    int8_ids = plan.int8_ids(model)
    library = built.export_library(out / "model.so")
    atomic_write(out / "model.qdq.onnx", qdq.SerializeToString())
    every_float = list(plan.float_layer_ids(model))  # the plan's float convs and those that cannot run int8
    names = json.dumps(every_float)
    atomic_write(out / "onnxruntime_quantize.py", ORT_SNIPPET.format(trial=trial_number, names=names))
    atomic_write(out / "nncf_ignored_scope.py", NNCF_SNIPPET.format(trial=trial_number, names=names))
    atomic_write(out / "inc_op_name_dict.py", INC_SNIPPET.format(trial=trial_number, names=names))
    summary = {"study": study.study_name, "trial": trial_number, "model": config.model, "plan": plan.key(),
               "float_layers": every_float, "int8_layers": list(int8_ids), "latency_ms": trial.values[0],
               config.metric: trial.values[1],
               "metrics": {k: v if math.isfinite(v) else str(v) for k, v in record.metrics.items()},
               "library": str(library), "qdq_model": str(out / "model.qdq.onnx"), "target": built.target,
               "inputs": list(built.input_names), "outputs": list(built.output_names),
               "tuned_kernels": built.tuned_kernels, "total_kernels": built.total_kernels,
               "note": "layer names are node names of the model as precsearch prepared it (BatchNorm folded); "
                       "unnamed nodes got Conv_<k> names"}
    atomic_write(out / "plan.json", json.dumps(summary, indent=1))
    logger.info("exported trial %d of %s to %s", trial_number, study.study_name, out)
    return summary
