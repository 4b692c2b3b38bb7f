"""Tiny ONNX models built in code, shared by the test modules.

Every builder returns an ``onnx.ModelProto`` (opset 17, float32) whose weights
come from a seeded generator, so two calls with the same arguments give
byte-identical models.  Conv nodes are named ``conv0``, ``conv1``, ... so tests
can address them by id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# ORT 1.32 reads newer IR versions too, but IR 8 is what opset 17 shipped with and
# keeps the files readable by older tools the lead may point at them.
IR_VERSION = 8


class _Builder:
    """Accumulates nodes and initializers; weights drawn from one seeded stream."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def tensor(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def he_weight(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        # He scaling keeps activations O(1) through a Relu chain, so calibration
        # ranges (and agreement thresholds in tests) stay meaningful.
        return self.rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape).astype(np.float32)

    def conv(
        self,
        name: str,
        x: str,
        in_ch: int,
        out_ch: int,
        kernel: int | tuple[int, int] = 3,
        stride: int = 1,
        pads: tuple[int, int, int, int] | None = None,
        groups: int = 1,
        bias: bool = True,
        out: str | None = None,
    ) -> str:
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        if pads is None:
            pads = (kh // 2, kw // 2, kh // 2, kw // 2)
        w = self.tensor(f"{name}.weight", self.he_weight((out_ch, in_ch // groups, kh, kw), in_ch // groups * kh * kw))
        inputs = [x, w]
        if bias:
            inputs.append(self.tensor(f"{name}.bias", self.rng.normal(0.0, 0.1, size=out_ch)))
        out = out or f"{name}.out"
        self.nodes.append(
            helper.make_node(
                "Conv",
                inputs,
                [out],
                name=name,
                kernel_shape=[kh, kw],
                strides=[stride, stride],
                pads=list(pads),
                group=groups,
            )
        )
        return out

    def op(self, op_type: str, inputs: list[str], name: str, out: str | None = None, **attrs) -> str:
        out = out or f"{name}.out"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def model(self, graph_name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]):
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="precsearch-tests")
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


def _input(channels: int, size: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, size, size])


def _output(shape: list, name: str = "output") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def chain_model(channels: tuple[int, ...] = (8, 16, 16, 16), size: int = 16, classes: int = 10, seed: int = 0):
    """A chain of 3x3 pad-1 Conv+Relu, then GlobalAveragePool, Flatten, Gemm ("logits")."""
    b = _Builder(seed)
    x = "input"
    for i, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
        x = b.op("Relu", [b.conv(f"conv{i}", x, cin, cout)], f"relu{i}")
    x = b.op("GlobalAveragePool", [x], "pool")
    x = b.op("Flatten", [x], "flatten", axis=1)
    w = b.tensor("fc.weight", b.he_weight((classes, channels[-1]), channels[-1]))
    bias = b.tensor("fc.bias", b.rng.normal(0.0, 0.1, size=classes))
    b.op("Gemm", [x, w, bias], "fc", out="logits", transB=1)
    return b.model("chain", [_input(channels[0], size)], [_output([1, classes], "logits")])


def fragile_model(size: int = 16, seed: int = 8):
    """chain_model whose conv1 breaks under int8: a huge weight on an input channel that is always 0.

    conv0's output channel 0 is identically zero (zero weights and bias), so the
    50.0 weights conv1 applies to it change nothing in float, but they set conv1's
    per-channel weight scale to 50/127 and every ordinary weight rounds to 0 or ±0.39.
    """
    proto = chain_model(size=size, seed=seed)
    arrays = {init.name: numpy_helper.to_array(init).copy() for init in proto.graph.initializer}
    arrays["conv0.weight"][0] = 0.0
    arrays["conv0.bias"][0] = 0.0
    arrays["conv1.weight"][:, 0] = 50.0
    for init in proto.graph.initializer:
        if init.name in ("conv0.weight", "conv0.bias", "conv1.weight"):
            init.CopyFrom(numpy_helper.from_array(arrays[init.name], init.name))
    return proto


def residual_model(channels: int = 16, size: int = 16, seed: int = 1):
    """conv0-relu feeds conv1-relu and conv2; Add(relu(conv1), conv2) -> Relu -> conv3.

    Lets a test make conv1 int8 and conv2 float, so the Add meets one int8 and
    one float producer.
    """
    b = _Builder(seed)
    x0 = b.op("Relu", [b.conv("conv0", "input", channels, channels)], "relu0")
    a = b.op("Relu", [b.conv("conv1", x0, channels, channels)], "relu1")
    c = b.conv("conv2", x0, channels, channels)
    y = b.op("Relu", [b.op("Add", [a, c], "add")], "relu2")
    b.conv("conv3", y, channels, channels, out="output")
    return b.model("residual", [_input(channels, size)], [_output([1, channels, size, size])])


def bias_add_model(size: int = 16, seed: int = 2):
    """conv0 (16->32, no bias) -> Relu -> Add of a (1,32,1,1) constant -> conv1 (32->16).

    The shape of the old Relay "Incompatible broadcast dims" bug under NCHWc.
    The Relu keeps ORT's basic optimizer (ConvAddFusion) from folding the Add
    into conv0's bias, so the broadcast add survives model preparation.
    """
    b = _Builder(seed)
    x = b.conv("conv0", "input", 16, 32, bias=False)
    x = b.op("Relu", [x], "relu0")
    const = b.tensor("bias_add.const", b.rng.normal(0.0, 0.5, size=(1, 32, 1, 1)))
    x = b.op("Add", [x, const], "bias_add")
    b.conv("conv1", x, 32, 16, out="output")
    return b.model("bias_add", [_input(16, size)], [_output([1, 16, size, size])])


def kinds_model(size: int = 16, seed: int = 3):
    """One conv of each kind the int8 path must handle.

    ======  ==========================================  =====================
    id      kind                                        in -> out, spatial
    ======  ==========================================  =====================
    conv0   first conv, 3 input channels, 3x3           3 -> 16, 16x16
    conv1   stride 2, 3x3 pad 1                         16 -> 16, 8x8
    conv2   depthwise (groups=16)                       16 -> 16, 8x8
    conv3   grouped (groups=2), 24 channels (not 16k)   16 -> 24, 8x8
    conv4   1x1                                         24 -> 32, 8x8
    conv5   3x3, asymmetric pads (0, 1, 1, 2)           32 -> 16, 7x9
    ======  ==========================================  =====================
    """
    b = _Builder(seed)
    x = b.op("Relu", [b.conv("conv0", "input", 3, 16)], "relu0")
    x = b.op("Relu", [b.conv("conv1", x, 16, 16, stride=2)], "relu1")
    x = b.op("Relu", [b.conv("conv2", x, 16, 16, groups=16)], "relu2")
    x = b.op("Relu", [b.conv("conv3", x, 16, 24, groups=2)], "relu3")
    x = b.op("Relu", [b.conv("conv4", x, 24, 32, kernel=1)], "relu4")
    b.conv("conv5", x, 32, 16, pads=(0, 1, 1, 2), out="output")
    return b.model("kinds", [_input(3, size)], [_output([1, 16, size // 2 - 1, size // 2 + 1])])


def constant_weights_model(size: int = 16, seed: int = 4):
    """conv0 with Constant-node weight and bias, an unfused BatchNormalization, Relu, conv1 (Constant weight)."""
    rng = np.random.default_rng(seed)
    nodes = []

    def constant(name: str, array: np.ndarray) -> str:
        nodes.append(
            helper.make_node(
                "Constant", [], [name], name=f"{name}.const", value=numpy_helper.from_array(array.astype(np.float32))
            )
        )
        return name

    w0 = constant("conv0.weight", rng.normal(0, np.sqrt(2 / 72), size=(16, 8, 3, 3)))
    b0 = constant("conv0.bias", rng.normal(0, 0.1, size=16))
    nodes.append(helper.make_node("Conv", ["input", w0, b0], ["conv0.out"], name="conv0", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    bn = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32), "bn.scale"),
        numpy_helper.from_array(rng.normal(0, 0.2, 16).astype(np.float32), "bn.bias"),
        numpy_helper.from_array(rng.normal(0, 0.2, 16).astype(np.float32), "bn.mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, 16).astype(np.float32), "bn.var"),
    ]
    nodes.append(
        helper.make_node(
            "BatchNormalization",
            ["conv0.out", "bn.scale", "bn.bias", "bn.mean", "bn.var"],
            ["bn.out"],
            name="bn",
            epsilon=1e-5,
        )
    )
    nodes.append(helper.make_node("Relu", ["bn.out"], ["relu.out"], name="relu"))
    w1 = constant("conv1.weight", rng.normal(0, np.sqrt(2 / 144), size=(8, 16, 3, 3)))
    nodes.append(helper.make_node("Conv", ["relu.out", w1], ["output"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "constant_weights", [_input(8, size)], [_output([1, 8, size, size])], initializer=bn)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def dynamic_input_model(seed: int = 5):
    """Input ["N", 3, "H", "W"]: conv0 (3->8) -> Relu -> conv1 (8->8)."""
    b = _Builder(seed)
    x = b.op("Relu", [b.conv("conv0", "input", 3, 8)], "relu0")
    b.conv("conv1", x, 8, 8, out="output")
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])
    return b.model("dynamic", [inp], [_output(["N", 8, "H", "W"])])


def conv_transpose_model(size: int = 8, seed: int = 6):
    """conv0 (8->8) -> Relu -> ConvTranspose "deconv0" (8->4, k2 s2, doubles H, W) -> conv1 (4->8)."""
    b = _Builder(seed)
    x = b.op("Relu", [b.conv("conv0", "input", 8, 8)], "relu0")
    w = b.tensor("deconv0.weight", b.he_weight((8, 4, 2, 2), 8 * 4))
    x = b.op("ConvTranspose", [x, w], "deconv0", kernel_shape=[2, 2], strides=[2, 2])
    b.conv("conv1", x, 4, 8, out="output")
    return b.model("conv_transpose", [_input(8, size)], [_output([1, 8, 2 * size, 2 * size])])


def no_conv_model(seed: int = 7):
    """MatMul -> Relu on a (1, 16) input; no conv at all."""
    b = _Builder(seed)
    w = b.tensor("fc.weight", b.he_weight((16, 8), 16))
    b.op("Relu", [b.op("MatMul", ["input", w], "fc")], "relu", out="output")
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 16])
    return b.model("no_conv", [inp], [_output([1, 8])])


def save(model: onnx.ModelProto, tmp_path: Path, name: str) -> Path:
    """Write ``model`` to ``tmp_path / f"{name}.onnx"`` and return the path."""
    path = Path(tmp_path) / f"{name}.onnx"
    onnx.save_model(model, str(path))
    return path


# --------------------------------------------------------------------------- operators around blocked convs
#
# One tiny model per operator pattern that real detectors put between convs
# (YOLOv5/v8/X, OCR heads).  Each keeps its convs' channels multiples of 16 where
# the pattern allows, so every conv can be blocked in NCHW8c and NCHW16c and the
# operator in between meets blocked tensors.


def _const(b: _Builder, name: str, values, dtype=np.int64) -> str:
    b.initializers.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
    return name


def split_model(parts: tuple[int, ...] = (16, 16), size: int = 8, seed: int = 10):
    """YOLOv8's C2f: conv0 -> Split along channels into ``parts`` -> a conv on each part -> Concat -> conv_out."""
    b = _Builder(seed)
    total = sum(parts)
    x = b.op("Relu", [b.conv("conv0", "input", 16, total, kernel=1)], "relu0")
    pieces = [f"split.out{i}" for i in range(len(parts))]
    b.nodes.append(helper.make_node("Split", [x, _const(b, "split.sizes", parts)], pieces, name="split", axis=1))
    branches = [b.op("Relu", [b.conv(f"conv{i + 1}", piece, part, 16)], f"relu{i + 1}")
                for i, (piece, part) in enumerate(zip(pieces, parts))]
    y = b.op("Concat", branches + [x], "concat", axis=1)
    b.conv("conv_out", y, 16 * len(parts) + total, 16, kernel=1, out="output")
    return b.model("split", [_input(16, size)], [_output([1, 16, size, size])])


def concat_model(size: int = 8, seed: int = 11):
    """Concat of a blockable conv (16 channels) and an unblockable one (6 channels), then a conv."""
    b = _Builder(seed)
    x = b.op("Relu", [b.conv("conv0", "input", 16, 16)], "relu0")
    a = b.op("Relu", [b.conv("conv1", x, 16, 16)], "relu1")
    c = b.op("Relu", [b.conv("conv2", x, 16, 6)], "relu2")
    y = b.op("Concat", [a, c], "concat", axis=1)
    b.conv("conv3", y, 22, 16, out="output")
    return b.model("concat", [_input(16, size)], [_output([1, 16, size, size])])


def focus_model(size: int = 16, seed: int = 12):
    """YOLOX's Focus stem (four strided H/W slices of the input, Concat) and a Slice on C after a blocked conv."""
    b = _Builder(seed)
    slices = []
    for i, (top, left) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        slices.append(b.op("Slice", ["input", _const(b, f"focus{i}.starts", [top, left]),
                                     _const(b, f"focus{i}.ends", [size, size]), _const(b, f"focus{i}.axes", [2, 3]),
                                     _const(b, f"focus{i}.steps", [2, 2])], f"focus{i}"))
    x = b.op("Concat", slices, "focus_concat", axis=1)
    x = b.op("Relu", [b.conv("conv0", x, 16, 32)], "relu0")
    # Channels 8..24 of a blocked tensor: a C slice that does not start on a 16-block.
    c = b.op("Slice", [x, _const(b, "cslice.starts", [8]), _const(b, "cslice.ends", [24]),
                       _const(b, "cslice.axes", [1])], "cslice")
    y = b.op("Relu", [b.conv("conv1", c, 16, 16)], "relu1")
    # And a strided slice on H/W of a blocked tensor.
    s = b.op("Slice", [y, _const(b, "hw.starts", [1, 0]), _const(b, "hw.ends", [size // 2, size // 2]),
                       _const(b, "hw.axes", [2, 3]), _const(b, "hw.steps", [2, 2])], "hwslice")
    b.conv("conv2", s, 16, 16, out="output")
    out = size // 2
    return b.model("focus", [_input(4, size)], [_output([1, 16, (out - 1 + 1) // 2, (out + 1) // 2])])


def resize_model(mode: str = "nearest", size: int = 8, seed: int = 13):
    """An FPN step: a stride-2 conv, Resize x2 (``mode``), Concat with the full-resolution conv, conv."""
    b = _Builder(seed)
    x = b.op("Relu", [b.conv("conv0", "input", 16, 16)], "relu0")
    low = b.op("Relu", [b.conv("conv1", x, 16, 32, stride=2)], "relu1")
    attrs = {"mode": mode}
    if mode == "linear":
        attrs["coordinate_transformation_mode"] = "half_pixel"
    else:
        attrs.update(coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    up = b.op("Resize", [low, "", _const(b, "resize.scales", [1, 1, 2, 2], np.float32)], "resize", **attrs)
    y = b.op("Concat", [up, x], "concat", axis=1)
    b.conv("conv2", y, 48, 16, out="output")
    return b.model("resize", [_input(16, size)], [_output([1, 16, size, size])])


def sppf_model(size: int = 8, seed: int = 14):
    """YOLOv5/v8's SPPF: conv, three chained MaxPool 5x5 s1 p2, Concat of all four, conv."""
    b = _Builder(seed)
    x = b.op("Relu", [b.conv("conv0", "input", 16, 16, kernel=1)], "relu0")
    pools = [x]
    for i in range(3):
        pools.append(b.op("MaxPool", [pools[-1]], f"pool{i}", kernel_shape=[5, 5], strides=[1, 1], pads=[2, 2, 2, 2]))
    y = b.op("Concat", pools, "concat", axis=1)
    b.conv("conv1", y, 64, 16, kernel=1, out="output")
    return b.model("sppf", [_input(16, size)], [_output([1, 16, size, size])])


def activations_model(size: int = 8, seed: int = 15):
    """SiLU (x * Sigmoid(x)), HardSigmoid and HardSwish between convs."""
    b = _Builder(seed)
    x = b.conv("conv0", "input", 16, 16)
    x = b.op("Mul", [x, b.op("Sigmoid", [x], "sigmoid0")], "silu0")
    x = b.conv("conv1", x, 16, 16)
    x = b.op("HardSigmoid", [x], "hardsigmoid1", alpha=0.2, beta=0.5)
    x = b.conv("conv2", x, 16, 16)
    x = b.op("HardSwish", [x], "hardswish2")
    b.conv("conv3", x, 16, 16, out="output")
    return b.model("activations", [_input(16, size)], [_output([1, 16, size, size])])


def clip_model(size: int = 8, seed: int = 21):
    """Clip with its bounds as inputs (opset >= 11, as PyTorch exports ReLU6) between convs: (0, 6), only a
    minimum of 0 (a relu), and (-1, 1)."""
    b = _Builder(seed)
    zero, six, minus_one, one = (b.tensor(name, np.array(value)) for name, value in
                                 (("zero", 0.0), ("six", 6.0), ("minus_one", -1.0), ("one", 1.0)))
    x = b.op("Clip", [b.conv("conv0", "input", 16, 16), zero, six], "relu6_0")
    x = b.op("Clip", [b.conv("conv1", x, 16, 16), zero], "relu1")
    x = b.op("Clip", [b.conv("conv2", x, 16, 16), minus_one, one], "clip2")
    b.conv("conv3", x, 16, 16, out="output")
    return b.model("clips", [_input(16, size)], [_output([1, 16, size, size])])


def dfl_model(size: int = 4, bins: int = 16, seed: int = 16):
    """YOLOv8's DFL head: conv to 4*bins channels, Reshape (1,4,bins,HW), Transpose, Softmax, 1x1 conv, Reshape."""
    b = _Builder(seed)
    x = b.op("Relu", [b.conv("conv0", "input", 16, 16)], "relu0")
    x = b.conv("conv1", x, 16, 4 * bins, kernel=1)
    x = b.op("Reshape", [x, _const(b, "dfl.shape", [1, 4, bins, size * size])], "dfl_reshape")
    x = b.op("Transpose", [x], "dfl_transpose", perm=[0, 2, 1, 3])
    x = b.op("Softmax", [x], "dfl_softmax", axis=1)
    w = b.tensor("dfl.weight", np.arange(bins, dtype=np.float32).reshape(1, bins, 1, 1))
    b.nodes.append(helper.make_node("Conv", [x, w], ["dfl.out"], name="dfl_conv", kernel_shape=[1, 1]))
    b.op("Reshape", ["dfl.out", _const(b, "dfl.out_shape", [1, 4, size * size])], "dfl_out", out="output")
    return b.model("dfl", [_input(16, size)], [_output([1, 4, size * size])])


def nhwc_input_model(size: int = 8, seed: int = 17):
    """An NHWC image input transposed to NCHW before the first conv (TF-exported models)."""
    b = _Builder(seed)
    x = b.op("Transpose", ["input"], "to_nchw", perm=[0, 3, 1, 2])
    x = b.op("Relu", [b.conv("conv0", x, 3, 16)], "relu0")
    b.conv("conv1", x, 16, 16, out="output")
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, size, size, 3])
    return b.model("nhwc", [inp], [_output([1, 16, size, size])])


def grouped_model(size: int = 8, seed: int = 18):
    """Grouped convs that are not depthwise: groups 2 (16->32) and groups 4 (32->32)."""
    b = _Builder(seed)
    x = b.op("Relu", [b.conv("conv0", "input", 16, 16)], "relu0")
    x = b.op("Relu", [b.conv("conv1", x, 16, 32, groups=2)], "relu1")
    x = b.op("Relu", [b.conv("conv2", x, 32, 32, groups=4)], "relu2")
    b.conv("conv3", x, 32, 16, kernel=1, out="output")
    return b.model("grouped", [_input(16, size)], [_output([1, 16, size, size])])


def recurrent_tail_model(cell: str = "LSTM", width: int = 8, hidden: int = 8, seed: int = 19):
    """A CRNN: convs over a 1x16x4xW map, Reshape to a (W, 1, 64) sequence, LSTM or GRU, MatMul to logits.

    The recurrent layer is bidirectional, as OCR recognisers use it.
    """
    b = _Builder(seed)
    x = b.op("Relu", [b.conv("conv0", "input", 16, 16)], "relu0")
    x = b.op("Relu", [b.conv("conv1", x, 16, 16)], "relu1")
    x = b.op("Transpose", [x], "to_seq", perm=[3, 0, 1, 2])  # (W, 1, 16, 4)
    x = b.op("Reshape", [x, _const(b, "seq.shape", [width, 1, 64])], "seq_reshape")
    gates = 4 if cell == "LSTM" else 3
    w = b.tensor("rnn.W", b.rng.normal(0, 0.2, size=(2, gates * hidden, 64)))
    r = b.tensor("rnn.R", b.rng.normal(0, 0.2, size=(2, gates * hidden, hidden)))
    bias = b.tensor("rnn.B", b.rng.normal(0, 0.1, size=(2, 2 * gates * hidden)))
    b.nodes.append(helper.make_node(cell, [x, w, r, bias], ["rnn.y"], name="rnn", hidden_size=hidden,
                                    direction="bidirectional"))
    y = b.op("Transpose", ["rnn.y"], "rnn_transpose", perm=[0, 2, 1, 3])  # (W, 1, 2, hidden)
    y = b.op("Reshape", [y, _const(b, "fc.shape", [width, 2 * hidden])], "fc_reshape")
    fc = b.tensor("fc.weight", b.he_weight((2 * hidden, 10), 2 * hidden))
    b.op("MatMul", [y, fc], "fc", out="output")
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 16, 4, width])
    return b.model("recurrent", [inp], [_output([width, 10])])


def gemm_tail_model(size: int = 8, seed: int = 20):
    """Convs, Flatten, Gemm, Relu, MatMul: the classifier tail stays float."""
    b = _Builder(seed)
    x = b.op("Relu", [b.conv("conv0", "input", 16, 16)], "relu0")
    x = b.op("Relu", [b.conv("conv1", x, 16, 16, stride=2)], "relu1")
    x = b.op("Flatten", [x], "flatten", axis=1)
    features = 16 * (size // 2) ** 2
    w = b.tensor("fc0.weight", b.he_weight((32, features), features))
    x = b.op("Relu", [b.op("Gemm", [x, w], "fc0", transB=1)], "relu2")
    w1 = b.tensor("fc1.weight", b.he_weight((32, 10), 32))
    b.op("MatMul", [x, w1], "fc1", out="output")
    return b.model("gemm_tail", [_input(16, size)], [_output([1, 10])])


def blocked(array, block: int):
    """An NCHW array in the NCHW<block>c layout (unchanged for block 0), as the bridge's blocked convs read it."""
    if not block:
        return array
    n, c, h, w = array.shape
    return np.ascontiguousarray(array.reshape(n, c // block, block, h, w).transpose(0, 1, 3, 4, 2))
