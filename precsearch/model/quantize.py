"""Calibration once per model and data, then the mixed QDQ model of each plan.

Both steps reuse ONNX Runtime's quantization tooling exactly as
``onnxruntime.quantization.quantize_static`` (ORT 1.32) drives it, split in two
so the expensive calibration is run once and cached on disk:

* :func:`calibrate` = ``create_calibrator`` + ``collect_data`` + ``compute_data``;
* :func:`build_qdq_model` = ``save_and_reload_model_with_shape_infer`` +
  ``update_opset_version`` + ``check_static_quant_arguments`` +
  ``QDQQuantizer(...).quantize_model()`` with the precomputed ranges.

What the QDQ graph looks like around one int8 conv (ORT 1.32, QDQ format,
uint8 asymmetric activations, int8 symmetric per-channel weights,
``op_types_to_quantize=["Conv"]``)::

    x ─► QuantizeLinear(x_scale, x_zp:uint8) ─► DequantizeLinear(x_scale, x_zp) ─┐
    W:int8 initializer ─► DequantizeLinear(w_scale[Cout], w_zp[Cout]=0:int8, axis=0) ─► Conv(name kept) ─► y
    B:int32 initializer ─► DequantizeLinear(x_scale*w_scale[Cout], zp[Cout]=0:int32, axis=0) ─┘
    y ─► QuantizeLinear(y_scale, y_zp:uint8) ─► DequantizeLinear(y_scale, y_zp) ─► consumers (Relu, ...)

* The Q/DQ pair of a tensor is shared by all its consumers (no DedicatedQDQPair).
  A tensor between two int8 convs gets one pair: the producer's output pair is
  the consumer's input pair.
* Names: weight ``<w>_quantized`` (int8, values in [-127, 127]) with
  ``<w>_scale``/``<w>_zero_point`` feeds ``<w>_DequantizeLinear``; the bias
  DQ (``<b>_quantized``, int32) outputs a tensor still called ``<b>``;
  activation pairs are ``<t>_QuantizeLinear``/``<t>_DequantizeLinear`` with
  scalar scale and uint8 zero point.  The float initializers of int8 convs
  are removed.  The weight scale may be enlarged so the int32 bias cannot
  overflow (ORT's QDQDisableWeightAdjustForInt32Bias is left False).
* A Relu/Clip that is the only consumer of an int8 conv's output is folded
  away as ``quantize_static`` folds it: ORT's quantizer removes the node and
  quantizes the conv output with the activation's output range (the uint8
  clamp is the activation), so ``y`` above is the activation's output.  Every
  other Relu/Clip is in ``nodes_to_exclude`` and stays float.
* Float (excluded) convs keep float weight and bias; their input still comes
  out of a DequantizeLinear if the producer was an int8 conv, and nothing is
  quantized around them otherwise.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import io
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnxruntime.quantization import QuantFormat, QuantType
from onnxruntime.quantization.calibrate import (
    CalibrationDataReader,
    CalibrationMethod,
    TensorData,
    TensorsData,
    create_calibrator,
)
from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
from onnxruntime.quantization.quant_utils import save_and_reload_model_with_shape_infer, update_opset_version
from onnxruntime.quantization.quantize import check_static_quant_arguments

from precsearch.model.data import data_hash
from precsearch.errors import ConfigError, DataError, ModelError, first_line
from precsearch.model import LoadedModel
from precsearch.model.plan import Plan
from precsearch.files import atomic_write, cache_file

logger = logging.getLogger(__name__)

CALIBRATION_METHODS: dict[str, CalibrationMethod] = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
ACTIVATION_TYPE = QuantType.QUInt8
WEIGHT_TYPE = QuantType.QInt8
QUANTIZED_OP_TYPES = ("Conv",)
# A Relu or Clip right after an int8 conv is folded into the conv's output quantization, as quantize_static and
# NNCF do: ORT's QDQ quantizer removes it and quantizes the conv output with the activation's range (the uint8
# clamp at zero point 0, and at the top of the range, is the activation). With the pre-activation range instead,
# EfficientNet-Lite0's ReLU6 outputs kept 0.48 top-1 agreement all-int8 (quantize_static: 0.78).
FUSED_ACTIVATIONS = ("Relu", "Clip")
# quantize_static's defaults, spelled out so a future ORT default change cannot
# silently change our numerics.
EXTRA_OPTIONS = {"ActivationSymmetric": False, "WeightSymmetric": True}
# Floor for the output step of a constant output (its calibrated range is empty).
MIN_OUTPUT_STEP = 1e-8
_CACHE_FORMAT = 2  # 2: activation ranges for the folded Relu/Clip


@dataclass(frozen=True)
class CalibrationRanges:
    """Calibrated statistics of every calibrated tensor.

    ``ranges`` maps tensor name to ``(lowest, highest)``.  ``tensor_data`` keeps
    every attribute ORT's ``TensorData`` had (arrays with their dtypes and
    shapes, histograms for entropy/percentile), so that
    :meth:`to_tensors_data` rebuilds exactly what the calibrator returned.
    """

    method: str
    ranges: dict[str, tuple[float, float]]
    tensor_data: dict[str, dict[str, np.ndarray | np.generic]] = field(default_factory=dict, repr=False, compare=False)

    def to_tensors_data(self) -> TensorsData:
        """Return a fresh ORT ``TensorsData`` (the quantizer mutates the one it gets).

        Returns
        -------
        onnxruntime.quantization.calibrate.TensorsData
        """
        data = {name: TensorData(**{k: _thaw(v) for k, v in attrs.items()}) for name, attrs in self.tensor_data.items()}
        return TensorsData(CALIBRATION_METHODS[self.method], data)

    def to_json(self) -> dict:
        """JSON-friendly form; arrays as base64 of their bytes with dtype and shape."""
        return {
            "format": _CACHE_FORMAT,
            "method": self.method,
            "onnxruntime": onnxruntime.__version__,
            "tensors": {
                name: {
                    attr: {
                        "dtype": arr.dtype.str,
                        "shape": list(arr.shape),
                        "scalar": isinstance(arr, np.generic),
                        "data": base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode("ascii"),
                    }
                    for attr, arr in attrs.items()
                }
                for name, attrs in self.tensor_data.items()
            },
            # Human-readable copy; not read back.
            "ranges": {name: list(r) for name, r in self.ranges.items()},
        }

    @classmethod
    def from_json(cls, payload: dict) -> CalibrationRanges:
        """Inverse of :meth:`to_json`."""
        tensor_data = {
            name: {
                attr: _decode(spec)
                for attr, spec in attrs.items()
            }
            for name, attrs in payload["tensors"].items()
        }
        return cls._from_tensor_data(payload["method"], tensor_data)

    @classmethod
    def _from_tensor_data(cls, method: str, tensor_data: dict[str, dict[str, np.ndarray]]) -> CalibrationRanges:
        ranges = {
            name: (float(np.min(attrs["lowest"])), float(np.max(attrs["highest"]))) for name, attrs in tensor_data.items()
        }
        return cls(method=method, ranges=ranges, tensor_data=tensor_data)


def _freeze(value):
    return value if isinstance(value, np.generic) else np.asarray(value)


def _thaw(value):
    # numpy scalars are immutable; arrays are copied because the quantizer may edit them.
    return value if isinstance(value, np.generic) else np.array(value, copy=True)


def _decode(spec: dict):
    array = np.frombuffer(base64.b64decode(spec["data"]), dtype=np.dtype(spec["dtype"])).reshape(spec["shape"]).copy()
    return array[()] if spec.get("scalar") else array


class _ListReader(CalibrationDataReader):
    def __init__(self, batches: Sequence[dict[str, np.ndarray]]):
        self._batches = list(batches)
        self._next = 0

    def get_next(self) -> dict | None:
        if self._next >= len(self._batches):
            return None
        self._next += 1
        return self._batches[self._next - 1]

    def __len__(self) -> int:
        return len(self._batches)


def calibration_key(model: LoadedModel, batches: Sequence[dict[str, np.ndarray]], method: str) -> str:
    """Cache key of a calibration: model, data, method, ORT version and the cache format (what is calibrated).

    Returns
    -------
    str
        16 hex characters.
    """
    text = "|".join((model.sha256, data_hash(batches), method, onnxruntime.__version__, f"format{_CACHE_FORMAT}"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _calibrated_op_types(model: LoadedModel) -> list[str]:
    # Conv inputs/outputs are what the QDQ quantizer needs; the producers of graph
    # outputs are added so output_steps() has a range for every output.
    output_names = set(model.output_names)
    producers = {node.op_type for node in model.proto.graph.node if output_names.intersection(node.output)}
    return sorted(set(QUANTIZED_OP_TYPES) | set(FUSED_ACTIVATIONS) | producers)


def calibrate(
    model: LoadedModel,
    batches: Sequence[dict[str, np.ndarray]],
    method: str = "minmax",
    cache_dir: Path | None = None,
) -> CalibrationRanges:
    """Run ORT's calibrator over ``batches`` once, or load the cached result.

    Parameters
    ----------
    model : LoadedModel
    batches : sequence of dict
        Inputs as fed to an ORT session.
    method : {"minmax", "entropy", "percentile"}, default "minmax"
        ORT's defaults for each method (entropy: 128 bins; percentile: 2048
        bins, 99.999, symmetric).  With ORT's entropy default of 128 bins and
        128 quantized bins there is a single threshold candidate unless the
        histogram grew, so "entropy" usually gives the min/max ranges (with
        quantize_static too: it cannot pass num_bins).
    cache_dir : Path, optional
        Where ``calibration-<key>.json`` is read from / written to.

    Returns
    -------
    CalibrationRanges
        Ranges of the input and output of every conv and of every graph output.

    Raises
    ------
    ConfigError
        Unknown ``method``.
    DataError
        No batches.
    """
    if method not in CALIBRATION_METHODS:
        raise ConfigError(
            f"The 'method' parameter of calibrate must be one of {sorted(CALIBRATION_METHODS)}; got {method!r} instead."
        )
    if not batches:
        raise DataError("The 'batches' parameter of calibrate must hold at least one batch; got none.")
    cache_path = cache_file(cache_dir, f"calibration-{calibration_key(model, batches, method)}.json")
    if cache_path is not None and cache_path.is_file():
        logger.info("calibration: cache hit %s", cache_path)
        return CalibrationRanges.from_json(json.loads(cache_path.read_text()))

    op_types = _calibrated_op_types(model)
    logger.info("calibration: %s over %d batches, op types %s", method, len(batches), op_types)
    with tempfile.TemporaryDirectory(prefix="precsearch-calib-") as tmp:
        model_path = Path(tmp) / "model.onnx"
        onnx.save_model(model.proto, str(model_path))
        # The histogram collectors print progress to stdout; library code must not.
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            calibrator = create_calibrator(
                model_path,
                op_types,
                augmented_model_path=str(Path(tmp) / "augmented_model.onnx"),
                calibrate_method=CALIBRATION_METHODS[method],
            )
            calibrator.collect_data(_ListReader(batches))
            tensors_data = calibrator.compute_data()
        del calibrator  # holds a session on files inside tmp
        if captured.getvalue().strip():
            logger.debug("calibrator output: %s", captured.getvalue().strip())

    tensor_data = {}
    for name, td in tensors_data.items():
        # Keep numpy scalars as scalars and arrays as arrays: the rebuild must be exact.
        tensor_data[name] = {attr: _freeze(getattr(td, attr)) for attr in td._attrs}
    ranges = CalibrationRanges._from_tensor_data(method, tensor_data)
    if cache_path is not None:
        atomic_write(cache_path, json.dumps(ranges.to_json()))
        logger.info("calibration: wrote %s", cache_path)
    return ranges


def build_qdq_model(model: LoadedModel, ranges: CalibrationRanges, plan: Plan) -> onnx.ModelProto:
    """The QDQ model in which exactly the int8 layers of ``plan`` are quantized.

    Parameters
    ----------
    model : LoadedModel
    ranges : CalibrationRanges
        From :func:`calibrate` on the same model.
    plan : Plan
        Its float layers (and every layer that cannot run int8) are excluded.

    Returns
    -------
    onnx.ModelProto
        Valid for ``onnx.checker``; conv node names kept; identical bytes for
        identical arguments.  See the module docstring for the graph shape.
    """
    missing = [
        (layer.id, tensor)
        for layer in model.layers
        if layer.id in plan.int8_ids(model)
        for tensor in _conv_io(model, layer.id)
        if tensor not in ranges.ranges
    ]
    if missing:
        raise DataError(
            f"The calibration ranges lack tensor {missing[0][1]!r} of int8 layer {missing[0][0]!r} "
            f"({len(missing)} missing); calibrate this same prepared model."
        )
    # Same pre-steps as quantize_static: shape-inferred copy, opset update.
    proto = save_and_reload_model_with_shape_infer(copy.deepcopy(model.proto))
    proto = update_opset_version(proto, WEIGHT_TYPE, ACTIVATION_TYPE)
    check_static_quant_arguments(QuantFormat.QDQ, ACTIVATION_TYPE, WEIGHT_TYPE)
    quantizer = QDQQuantizer(
        proto,
        True,  # per_channel
        False,  # reduce_range: VNNI accumulates u8 x s8 without saturation
        WEIGHT_TYPE,
        ACTIVATION_TYPE,
        ranges.to_tensors_data(),
        [],  # nodes_to_quantize: all that are not excluded
        list(plan.float_layer_ids(model)) + _unfolded_activations(model, plan),
        list(QUANTIZED_OP_TYPES) + list(FUSED_ACTIVATIONS),
        dict(EXTRA_OPTIONS),
    )
    quantizer.quantize_model()
    # quantize_static's save step: the quantizer appends Q/DQ nodes at the end of
    # the node list, and only save_model_to_file sorts them (the checker requires it).
    quantizer.model.topological_sort()
    qdq = quantizer.model.model
    try:
        onnx.checker.check_model(qdq)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"The QDQ model for plan {plan.key()!r} fails the ONNX checker: {first_line(exc)}") from None
    logger.debug("QDQ model for %s: %d nodes", plan.key(), len(qdq.graph.node))
    return qdq


def _unfolded_activations(model: LoadedModel, plan: Plan) -> list[str]:
    """The Relu/Clip nodes that are not the sole consumer of an int8 conv's output: quantized, they would add Q/DQ
    where the plan keeps float (after a float conv, or beside an int8 conv's input)."""
    graph = model.proto.graph
    int8 = set(plan.int8_ids(model))
    conv_output = {node.output[0]: node.name for node in graph.node if node.name in int8}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    outputs = {out.name for out in graph.output}
    keep = []
    for node in graph.node:
        if node.op_type not in FUSED_ACTIVATIONS:
            continue
        source = node.input[0]
        if source in conv_output and consumers.get(source) == 1 and source not in outputs:
            continue
        keep.append(node.name)
    return keep


def _conv_io(model: LoadedModel, layer_id: str) -> tuple[str, str]:
    for node in model.proto.graph.node:
        if node.name == layer_id:
            return node.input[0], node.output[0]
    raise ModelError(f"The conv layer {layer_id!r} is not in the prepared model's graph.")


def output_steps(model: LoadedModel, ranges: CalibrationRanges) -> dict[str, float]:
    """One uint8 quantization step of each graph output's calibrated range.

    ``step = (max(hi, 0) - min(lo, 0)) / 255`` (the range always contains 0,
    as ORT's quantizer makes it), floored at ``MIN_OUTPUT_STEP`` for constant
    outputs.  Integer outputs get 0.5, so agreement within one step means equal.

    Parameters
    ----------
    model : LoadedModel
    ranges : CalibrationRanges

    Returns
    -------
    dict of str to float
        Positive step per output name.
    """
    float_outputs = {
        out.name
        for out in model.proto.graph.output
        if out.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    }
    steps = {}
    for name in model.output_names:
        if name not in float_outputs:
            steps[name] = 0.5
            continue
        if name not in ranges.ranges:
            raise DataError(f"The calibration ranges have no entry for graph output {name!r}; calibrate this same prepared model.")
        lo, hi = ranges.ranges[name]
        steps[name] = max((max(hi, 0.0) - min(lo, 0.0)) / 255.0, MIN_OUTPUT_STEP)
    return steps


class _RootWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING


@contextlib.contextmanager
def _quiet_root_warnings():
    """Drop the warnings ``quantize_static`` logs on the root logger ("Please consider pre-processing ...") on every
    call; precsearch's models are prepared (shape-inferred, BatchNorm folded) before they reach it."""
    quiet = _RootWarnings()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def user_int8_model(model: LoadedModel, batches: Sequence[dict[str, np.ndarray]], *,
                    nodes_to_exclude: Sequence[str] = (), calibration: str = "minmax",
                    cache_dir: Path | None = None) -> onnx.ModelProto:
    """The int8 model a user of ONNX Runtime would make: ``quantize_static`` with its defaults, per channel.

    This is the "ORT int8" baseline: QDQ format, every op type ORT quantizes by
    default (Conv, Add, Mul, pooling, MatMul, ...), which lets ORT's optimizer fuse
    and stay int8 between ops, int8 activations and weights, MinMax calibration,
    per-channel weights.  precsearch's own QDQ model quantizes Conv only and is a
    different (usually slower in ORT) model.

    Parameters
    ----------
    model : LoadedModel
    batches : sequence of dict
        Calibration inputs (the same batches the plan builds calibrate on).
    nodes_to_exclude : sequence of str
        Node names ``quantize_static`` keeps float (the ONNX Runtime backend's plans).
    calibration : str
        ``calibrate_method`` (:data:`CALIBRATION_METHODS`); the default,
        MinMax, is ``quantize_static``'s own.
    cache_dir : Path, optional
        Where ``ort-int8-<key>.onnx`` is read from / written to.
    """
    from onnxruntime.quantization import quantize_static

    if calibration not in CALIBRATION_METHODS:
        raise ConfigError(f"The 'calibration' parameter of user_int8_model must be one of "
                          f"{sorted(CALIBRATION_METHODS)}; got {calibration!r} instead.")
    excluded = sorted(nodes_to_exclude)
    key = hashlib.sha256("|".join([calibration_key(model, batches, calibration), *excluded]).encode()).hexdigest()[:16]
    cache_path = Path(cache_dir) / f"ort-int8-{key}.onnx" if cache_dir is not None else None
    if cache_path is not None and cache_path.is_file():
        return onnx.load(str(cache_path))
    with tempfile.TemporaryDirectory(prefix="precsearch-ort-int8-") as tmp:
        source, target = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        onnx.save_model(model.proto, str(source))
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured), _quiet_root_warnings():
            quantize_static(str(source), str(target), _ListReader(batches), quant_format=QuantFormat.QDQ,
                            per_channel=True, nodes_to_exclude=excluded,
                            calibrate_method=CALIBRATION_METHODS[calibration])
        quantized = onnx.load(str(target))
    if cache_path is not None:
        atomic_write(cache_path, quantized.SerializeToString())
    return quantized
