"""Export a trial of a study: what ships (a TVM library, or an ONNX Runtime model), and the float layers for other tools.

The plan is rebuilt by the search's own backend from the study's stored
settings, with the same cached calibration and tuning database, so the library
computes what the trial measured.  The float layer list is written in the forms three quantizers take:
ONNX Runtime's ``nodes_to_exclude``, NNCF's ``IgnoredScope(names=...)`` and
Intel Neural Compressor's ``op_name_dict``; of a plan's bf16 layers only the
last can say it (the other two keep them float32, and their snippets say so).

A trial of the ONNX Runtime backend exports the quantized model itself
(``model.int8.onnx``, ready for an ``InferenceSession``), the prepared float
model it was made from (``model.onnx``) and ``quantize_static.py``, the exact
call with ``nodes_to_exclude`` that makes one from the other.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from precsearch.study.config import SearchConfig
from precsearch.errors import ConfigError
from precsearch.model.plan import CONV_QDQ, ORT
from precsearch.files import atomic_write
from precsearch.study.record import StudyAttrs, TrialRecord
from precsearch.workspace import Workspace
from precsearch.model import open_model
from precsearch.tvm import ONEDNN_REQUIREMENT


logger = logging.getLogger(__name__)

ORT_SNIPPET = '''"""Quantize the model with ONNX Runtime, keeping the float layers precsearch chose (trial {trial})."""
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

NODES_TO_EXCLUDE = {names}{ort_bf16}

# quantize_static("model.onnx", "model.int8.onnx", calibration_data_reader,
#                 quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
#                 per_channel=True, op_types_to_quantize=["Conv"], nodes_to_exclude=NODES_TO_EXCLUDE)
'''
NNCF_SNIPPET = '''"""Quantize with NNCF, keeping the float layers precsearch chose (trial {trial})."""
import nncf

IGNORED_SCOPE = nncf.IgnoredScope(names={names}){nncf_bf16}

# quantized = nncf.quantize(model, calibration_dataset, ignored_scope=IGNORED_SCOPE)
'''
INC_SNIPPET = '''"""Quantize with Intel Neural Compressor, keeping the float layers precsearch chose (trial {trial})."""
FLOAT_LAYERS = {float32_names}
BF16_LAYERS = {bf16_names}  # INC runs a layer bf16 when its dtype says so (on a CPU with AVX512-BF16 or AMX)
OP_NAME_DICT = {{**{{name: {{"activation": {{"dtype": ["fp32"]}}, "weight": {{"dtype": ["fp32"]}}}} for name in FLOAT_LAYERS}},
                **{{name: {{"activation": {{"dtype": ["bf16"]}}, "weight": {{"dtype": ["bf16"]}}}} for name in BF16_LAYERS}}}}

# from neural_compressor import PostTrainingQuantConfig, quantization
# config = PostTrainingQuantConfig(op_name_dict=OP_NAME_DICT)
# quantized = quantization.fit(model, config, calib_dataloader=calibration_dataloader)
'''


QUANTIZE_STATIC_SNIPPET = '''"""Trial {trial}'s ONNX Runtime model: the quantize_static call that makes it, and the session it was measured in.

model.onnx is the model as precsearch prepared it (BatchNorm folded into the convs, unnamed nodes named), so
the names below are its node names.  With the calibration inputs the search used, quantize() writes a model
identical to model.int8.onnx (made with onnxruntime {ort_version}).

Load it with session(): ONNX Runtime's WeightBiasQuantization optimizer would otherwise re-quantize, at load
time, every excluded conv whose input is dequantized, and the convs kept float would run int8 after all.
"""
import onnxruntime
from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

NODES_TO_EXCLUDE = {names}
DISABLED_OPTIMIZERS = {disabled}


def quantize(calibration_data_reader, model_input="model.onnx", model_output="model.int8.onnx"):
    quantize_static(model_input, model_output, calibration_data_reader, quant_format=QuantFormat.QDQ,
                    per_channel=True, nodes_to_exclude=NODES_TO_EXCLUDE,
                    calibrate_method=CalibrationMethod.{method})


{session}'''
# Both ONNX Runtime snippets load the model as the search measured it.
_SESSION_FUNCTION = '''def session(model_path="model.int8.onnx", threads={threads}):
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(model_path, options, providers=["CPUExecutionProvider"],
                                        disabled_optimizers=list(DISABLED_OPTIMIZERS))
'''
CONV_QDQ_SESSION_SNIPPET = '''"""Trial {trial}'s ONNX Runtime model and the session it was measured in.

model.int8.onnx is precsearch's Conv-only QDQ model of the plan (the model its TVM backend compiles, searched with
--ort-model conv-qdq): QuantizeLinear/DequantizeLinear around the int8 convs only, with precsearch's calibration.
No quantize_static call makes it; precsearch export writes it again from the same study.

Load it with session(): ONNX Runtime's WeightBiasQuantization optimizer would otherwise re-quantize, at load
time, every float conv whose input is dequantized, and the convs kept float would run int8 after all.
"""
import onnxruntime

DISABLED_OPTIMIZERS = {disabled}


{session}'''
_CALIBRATE_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def export_trial(study, trial_number: int, out_dir: str | Path, workdir: str | Path, *,
                 backend: str | None = None) -> dict:
    """Write what one completed trial ships, its ``plan.json`` and the quantizer snippets.

    A TVM trial: ``model.so``, ``model.qdq.onnx`` and the three snippets.  An
    ONNX Runtime trial: ``model.int8.onnx`` (when the plan has int8 convs),
    ``model.onnx`` and ``quantize_static.py``.  ``backend``, when given, must
    be the trial's.

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
    if backend is not None and backend != record.backend:
        raise ConfigError(f"The 'backend' parameter of export must be the trial's backend; trial {trial_number} "
                          f"ran on {record.backend!r}, got {backend!r} instead.")
    trial = trials[trial_number]
    attrs = StudyAttrs(study)
    config = SearchConfig.from_dict(attrs.config)
    model, preset = open_model(config.model, config.input_shapes)
    if model.sha256 != attrs.model_sha256:
        raise ConfigError(f"The model {config.model!r} is not the one study {study.study_name!r} was made for.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workspace = Workspace.from_config(config, model, workdir, preset)
    if record.backend == ORT:
        return _export_ort(study, trial, record, config, workspace, out)
    # The search's own workspace, from the same cached calibration and tuning database: the same build.
    build = workspace.build(record.plan)
    plan, qdq, built = record.plan, build.qdq, build.built
    int8_ids = plan.int8_ids(model)
    library = built.export_library(out / "model.so")
    atomic_write(out / "model.qdq.onnx", qdq.SerializeToString())
    every_float = list(plan.float_layer_ids(model))  # the plan's float convs and those that cannot run int8
    bf16 = list(plan.bf16_layer_ids(model))
    names = json.dumps(every_float)
    # ORT's quantize_static and NNCF's ignored scope have no per-layer bf16: those layers stay float32 there
    cannot = (f"\n# The plan runs {json.dumps(bf16)} in bf16, which {{tool}} cannot express per layer: here they "
              "stay float32\n# (slower than the measured plan, and at least as faithful)") if bf16 else ""
    atomic_write(out / "onnxruntime_quantize.py", ORT_SNIPPET.format(
        trial=trial_number, names=names, ort_bf16=cannot.format(tool="quantize_static")))
    atomic_write(out / "nncf_ignored_scope.py", NNCF_SNIPPET.format(
        trial=trial_number, names=names, nncf_bf16=cannot.format(tool="nncf.quantize")))
    atomic_write(out / "inc_op_name_dict.py", INC_SNIPPET.format(
        trial=trial_number, float32_names=json.dumps([i for i in every_float if i not in bf16]),
        bf16_names=json.dumps(bf16)))
    summary = {"study": study.study_name, "trial": trial_number, "backend": record.backend, "model": config.model,
               "plan": plan.key(),
               "float_layers": every_float, "bf16_layers": bf16, "int8_layers": list(int8_ids),
               "latency_ms": trial.values[0],
               config.metric: trial.values[1],
               "metrics": {k: v if math.isfinite(v) else str(v) for k, v in record.metrics.items()},
               "library": str(library), "qdq_model": str(out / "model.qdq.onnx"), "target": built.target,
               "inputs": list(built.input_names), "outputs": list(built.output_names),
               "tuned_kernels": built.tuned_kernels, "total_kernels": built.total_kernels,
               "onednn_convs": sorted(built.onednn_kernels),
               "note": "layer names are node names of the model as precsearch prepared it (BatchNorm folded); "
                       "unnamed nodes got Conv_<k> names"}
    if built.onednn_kernels or built.onednn_dense:
        summary["requires"] = ONEDNN_REQUIREMENT
    atomic_write(out / "plan.json", json.dumps(summary, indent=1))
    logger.info("exported trial %d of %s to %s", trial_number, study.study_name, out)
    return summary


def _export_ort(study, trial, record: TrialRecord, config: SearchConfig, workspace: Workspace, out: Path) -> dict:
    """An ONNX Runtime trial: its quantized model, the float model it was made from, the call that makes it."""
    import onnxruntime

    from precsearch.study.ort_backend import DISABLED_OPTIMIZERS, check_ort_plan

    model, plan = workspace.model, record.plan
    int8_ids = plan.int8_ids(model)
    every_float = list(plan.float_layer_ids(model))
    atomic_write(out / "model.onnx", model.proto.SerializeToString())
    files = {"float_model": str(out / "model.onnx")}
    if int8_ids:
        # From the same cached calibration inputs: the model the trial scored and timed.
        quantized = workspace.ort_model(plan)
        check_ort_plan(model, quantized, plan)
        atomic_write(out / "model.int8.onnx", quantized.SerializeToString())
        files["int8_model"] = str(out / "model.int8.onnx")
        if config.ort_model == CONV_QDQ:  # precsearch's own QDQ model: no quantize_static call makes it
            snippet = out / "session.py"
            atomic_write(snippet, CONV_QDQ_SESSION_SNIPPET.format(
                trial=trial.number, disabled=json.dumps(list(DISABLED_OPTIMIZERS)),
                session=_SESSION_FUNCTION.format(threads=config.threads)))
        else:
            snippet = out / "quantize_static.py"
            atomic_write(snippet, QUANTIZE_STATIC_SNIPPET.format(
                trial=trial.number, names=json.dumps(every_float), ort_version=onnxruntime.__version__,
                method=_CALIBRATE_METHODS[config.calibration], disabled=json.dumps(list(DISABLED_OPTIMIZERS)),
                session=_SESSION_FUNCTION.format(threads=config.threads)))
        files["snippet"] = str(snippet)
    summary = {"study": study.study_name, "trial": trial.number, "backend": ORT, "model": config.model,
               "plan": plan.key(), "float_layers": every_float, "int8_layers": list(int8_ids),
               "latency_ms": trial.values[0], config.metric: trial.values[1],
               "metrics": {k: v if math.isfinite(v) else str(v) for k, v in record.metrics.items()},
               **files, "onnxruntime": onnxruntime.__version__, "threads": config.threads,
               "inputs": list(model.input_shapes), "outputs": list(model.output_names),
               "nodes_to_exclude": every_float,
               "session": {"graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": config.threads,
                           "inter_op_num_threads": 1, "disabled_optimizers": list(DISABLED_OPTIMIZERS)},
               "ort_model": config.ort_model,
               "note": (f"load model.int8.onnx with {Path(files['snippet']).name}'s session() (graph optimizations "
                        "on, WeightBiasQuantization off, as measured); " +
                        ("it is precsearch's Conv-only QDQ model of the plan (precsearch export writes it again)"
                         if config.ort_model == CONV_QDQ else "quantize() makes it from model.onnx")
                        if int8_ids else "every conv is float: this plan is the float model itself (model.onnx)")}
    atomic_write(out / "plan.json", json.dumps(summary, indent=1))
    logger.info("exported ONNX Runtime trial %d of %s to %s", trial.number, study.study_name, out)
    return summary
