"""bf16 as precsearch runs it: a conv's activations and weights rounded to bfloat16, sums in float32.

The rounding is ml_dtypes' (round to nearest even, what oneDNN's reorders and AVX512-BF16's ``vcvtne2ps2bf16``
do).  :func:`bf16_reference_model` is the ONNX model ONNX Runtime runs to tell what a bf16 build should give:
the same float model with each bf16 conv's input and weights rounded, so the only difference left to the TVM
build is the order of float32 sums.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper


def round_to_bf16(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to the nearest bfloat16 (ties to even), as float32."""
    return np.asarray(values, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def bf16_reference_model(model: onnx.ModelProto, layer_ids) -> onnx.ModelProto:
    """A copy of ``model`` (the prepared float model, or a plan's QDQ model) whose convs ``layer_ids`` (their
    node names) read bf16-rounded inputs and weights: a Cast to bfloat16 and back before the data input, the
    weight initializer rounded."""
    names = set(layer_ids)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type == "Conv" and node.name in names:
            data = node.input[0]
            narrow, wide = f"{node.name}/bf16_in", f"{node.name}/bf16_in_f32"
            nodes.append(helper.make_node("Cast", [data], [narrow], to=onnx.TensorProto.BFLOAT16,
                                          name=f"{node.name}/to_bf16"))
            nodes.append(helper.make_node("Cast", [narrow], [wide], to=onnx.TensorProto.FLOAT,
                                          name=f"{node.name}/to_f32"))
            node.input[0] = wide
            weight = initializers.get(node.input[1])
            if weight is None:
                raise ValueError(f"conv {node.name!r} has no weight initializer to round")
            # a weight two convs share would be rounded for both: the prepared models give each conv its own
            weight.CopyFrom(numpy_helper.from_array(round_to_bf16(numpy_helper.to_array(weight)), weight.name))
            names.discard(node.name)
        nodes.append(node)
    if names:
        raise ValueError(f"no conv node named {sorted(names)} in the model")
    del graph.node[:]
    graph.node.extend(nodes)
    return out
