"""ONNX-level rewrites that make a graph importable and layout-safe before TVM sees it.

Two gaps of TVM 0.27 are closed here, on the ONNX graph, where node names still
exist (they are lost on import) so the build report can name what was changed:

* ``Split`` along channels: ConvertLayout's layout rule for ``relax.split``
  keeps a blocked (NCHW<b>c) layout but does not rescale the split indices to
  the block, so a 32-channel tensor split 16 + 16 in NCHW8c yields 32 + 0
  channels and the build dies (YOLOv8's C2f block).  Each part becomes its own
  ``Slice``; ``strided_slice`` has a correct rule (it falls back to NCHW with
  layout transforms around it).
* ``LSTM`` / ``GRU`` / ``RNN``: the frontend has no converter.  With the input
  shapes fixed the sequence length is static, so they are unrolled into
  primitive ops (:mod:`._rnn`).

:func:`unsupported_operators` names, before any build, the nodes that neither
TVM's frontend nor these rewrites can import.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from precsearch.errors import CompileError

PASS_NAME = "precsearch.RewriteONNX"


@dataclass(frozen=True)
class OperatorNote:
    """One ONNX node precsearch rewrote (or kept out of the blocked layout) so the plan builds."""

    node: str
    op_type: str
    action: str  # "rewritten" or "unrolled"
    detail: str

    def to_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "action": self.action, "detail": self.detail}


def split_sizes(node: onnx.NodeProto, constants: dict[str, np.ndarray], length: int) -> list[int]:
    """The part sizes of an ONNX Split of an axis of ``length`` (input, attribute or equal parts)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if len(node.input) > 1 and node.input[1]:
        if node.input[1] not in constants:
            raise CompileError(f"Split {node.name!r} takes its sizes from a runtime tensor", pass_name=PASS_NAME,
                               layer_id=node.name)
        return [int(v) for v in constants[node.input[1]].reshape(-1)]
    if "split" in attrs:  # opset < 13
        return [int(v) for v in attrs["split"]]
    parts = int(attrs.get("num_outputs", len(node.output)))
    size = -(-length // parts)  # the last part is smaller when the length does not divide (opset 18)
    return [min(size, length - i * size) for i in range(parts)]


def _split_to_slices(node: onnx.NodeProto, sizes: list[int], axis: int) -> tuple[list, list]:
    nodes, initializers = [], []
    begin = 0
    for i, (size, output) in enumerate(zip(sizes, node.output)):
        prefix = f"{node.name}/part{i}"
        for suffix, values in (("starts", [begin]), ("ends", [begin + size]), ("axes", [axis])):
            initializers.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), f"{prefix}/{suffix}"))
        begin += size
        if output:
            nodes.append(helper.make_node("Slice", [node.input[0], f"{prefix}/starts", f"{prefix}/ends",
                                                    f"{prefix}/axes"], [output], name=prefix))
    return nodes, initializers


def rewrite_for_tvm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[OperatorNote]]:
    """Rewrite the nodes TVM 0.27 cannot import or cannot keep correct in blocked layouts.

    Parameters
    ----------
    model : onnx.ModelProto
        A model with static shapes (the prepared model or its QDQ form); not modified.

    Returns
    -------
    model : onnx.ModelProto
        The rewritten copy (``model`` itself when nothing needed rewriting).
    notes : list of OperatorNote
        One per rewritten node, for the build report.
    """
    from ._rnn import UNROLLED_OPS, _constants, _shapes, unroll_recurrent

    graph = model.graph
    channel_splits = [node for node in graph.node if node.op_type == "Split" and node.domain in ("", "ai.onnx")]
    recurrent = [node for node in graph.node if node.op_type in UNROLLED_OPS and node.domain in ("", "ai.onnx")]
    if not channel_splits and not recurrent:
        return model, []
    notes: list[OperatorNote] = []
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    if channel_splits:
        shapes = _shapes(rewritten)
        tensors = _constants(rewritten.graph)
        new_nodes, new_initializers = [], []
        for node in rewritten.graph.node:
            if node.op_type != "Split" or node.domain not in ("", "ai.onnx"):
                new_nodes.append(node)
                continue
            shape = shapes.get(node.input[0])
            axis = next((int(helper.get_attribute_value(a)) for a in node.attribute if a.name == "axis"), 0)
            if shape is None or any(d is None for d in shape):
                raise CompileError(f"Split {node.name!r} has an input of unknown shape", pass_name=PASS_NAME,
                                   layer_id=node.name)
            axis = axis % len(shape)
            if not (len(shape) == 4 and axis == 1):  # only channel splits meet a blocked layout
                new_nodes.append(node)
                continue
            sizes_input = node.input[1] if len(node.input) > 1 else ""
            constants = {sizes_input: numpy_helper.to_array(tensors[sizes_input])} if sizes_input in tensors else {}
            sizes = split_sizes(node, constants, shape[axis])
            if sum(sizes) != shape[axis] or len(sizes) != len(node.output):
                raise CompileError(f"Split {node.name!r} parts {sizes} do not cover its {shape[axis]} channels",
                                   pass_name=PASS_NAME, layer_id=node.name)
            slices, initializers = _split_to_slices(node, sizes, axis)
            new_nodes.extend(slices)
            new_initializers.extend(initializers)
            notes.append(OperatorNote(node.name, "Split", "rewritten",
                                      f"channel split {sizes} → {len(slices)} Slice (TVM's split rule does not "
                                      "rescale indices to the channel block)"))
        del rewritten.graph.node[:]
        rewritten.graph.node.extend(new_nodes)
        rewritten.graph.initializer.extend(new_initializers)
    if recurrent:
        rewritten = unroll_recurrent(rewritten)
        for node in recurrent:
            notes.append(OperatorNote(node.name, node.op_type, "unrolled",
                                      "no TVM converter; unrolled over its static sequence length"))
    return rewritten, notes


def unsupported_operators(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(node name, op type)`` of every node TVM's ONNX frontend cannot import, even after :func:`rewrite_for_tvm`."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    from ._rnn import UNROLLED_OPS

    known = set(_get_convert_map()) | set(UNROLLED_OPS)
    return [(node.name, node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
            for node in model.graph.node
            if node.domain not in ("", "ai.onnx") or node.op_type not in known]
