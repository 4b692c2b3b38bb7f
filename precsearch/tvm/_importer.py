"""ONNX (QDQ) → Relax import that keeps track of which conv layer is which.

ONNX node names do not survive ``from_onnx``, but parameter names do when they
are valid identifiers (``keep_params_in_input=True``).  So before import every
conv weight initializer is renamed to ``ps_w<index>``: from then on a Relax
parameter named that way *is* layer ``index``, in every pass that follows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from precsearch.errors import CompileError
from precsearch.model import LoadedModel
from ._naming import weight_name
from ._onnx_rewrite import OperatorNote, rewrite_for_tvm, unsupported_operators
from ._trace import tvm_error_line

if TYPE_CHECKING:
    import tvm

PASS_NAME = "precsearch.Import"


@dataclass(frozen=True)
class ImportedModel:
    """A Relax module whose conv weights are parameters named ``ps_w<index>``."""

    mod: "tvm.IRModule"
    params: dict[str, np.ndarray]  # every parameter of ``main`` beyond the inputs, by name
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    int8_weights: dict[int, np.ndarray]  # layer index → int8 OIHW weights the QDQ model holds
    float_weights: dict[int, np.ndarray]  # layer index → float OIHW weights of float convs
    operator_notes: tuple[OperatorNote, ...] = ()  # ONNX nodes rewritten before import


def _rename_weights(qdq: onnx.ModelProto, model: LoadedModel) -> tuple[onnx.ModelProto, dict, dict]:
    qdq = copy.deepcopy(qdq)
    graph = qdq.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    nodes_by_name = {node.name: node for node in graph.node}
    renames: dict[str, str] = {}
    int8_weights: dict[int, np.ndarray] = {}
    float_weights: dict[int, np.ndarray] = {}
    for layer in model.layers:
        node = nodes_by_name.get(layer.id)
        if node is None:
            raise CompileError(f"conv node {layer.id!r} is missing from the QDQ model", pass_name=PASS_NAME,
                               layer_id=layer.id)
        if node.op_type == "Conv" and node.attribute:
            _explicit_pads(node, layer.pads)
        weight_input = node.input[1]
        producer = producers.get(weight_input)
        if producer is not None and producer.op_type == "DequantizeLinear" and producer.input[0] in initializers:
            source = producer.input[0]
            int8_weights[layer.index] = numpy_helper.to_array(initializers[source])
        elif weight_input in initializers:
            source = weight_input
            float_weights[layer.index] = numpy_helper.to_array(initializers[source])
        else:
            raise CompileError(f"the weight of conv {layer.id!r} is neither an initializer nor a dequantized one",
                               pass_name=PASS_NAME, layer_id=layer.id)
        if source in renames:
            raise CompileError(f"conv {layer.id!r} shares its weight {source!r} with another conv; "
                               "shared weights are not supported", pass_name=PASS_NAME, layer_id=layer.id)
        renames[source] = weight_name(layer.index)
    for init in graph.initializer:
        if init.name in renames:
            init.name = renames[init.name]
    _inline_other_initializers(graph, set(renames.values()))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    return qdq, int8_weights, float_weights


def _inline_other_initializers(graph: onnx.GraphProto, keep: set[str]) -> None:
    # With keep_params_in_input every initializer becomes a function parameter, and
    # the importer then treats a Clip bound or a scale as a runtime tensor (Clip
    # becomes an opaque call_tir that pins its input to NCHW).  Only conv weights
    # need to stay parameters (they carry layer identity); the rest become Constant
    # nodes, which import as Relax constants.
    inline = [init for init in graph.initializer if init.name not in keep]
    constants = [onnx.helper.make_node("Constant", [], [init.name], name=f"ps_const_{i}", value=init)
                 for i, init in enumerate(inline)]
    kept = [init for init in graph.initializer if init.name in keep]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inline_names = {init.name for init in inline}
    inputs = [value for value in graph.input if value.name not in inline_names]
    del graph.input[:]
    graph.input.extend(inputs)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(constants + nodes)


def _explicit_pads(node: onnx.NodeProto, pads: tuple[int, ...]) -> None:
    # Relax's importer turns auto_pad=SAME_* into a separate pad op in front of the
    # conv, which would hide the conv from the QDQ pattern; the inventory already
    # resolved the padding, so write it out explicitly.
    for i, attr in enumerate(node.attribute):
        if attr.name == "auto_pad" and attr.s.decode() != "NOTSET":
            del node.attribute[i]
            for j, other in enumerate(node.attribute):
                if other.name == "pads":
                    del node.attribute[j]
                    break
            node.attribute.append(onnx.helper.make_attribute("pads", list(pads)))
            return


def _without_untyped_value_info(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` without ``value_info`` entries that have no type.

    Some exported models carry them (EfficientNet-Lite0's Clip outputs); they say
    nothing, but TVM's frontend runs ``onnx.checker`` first and prints a
    ``UserWarning`` for each, into the search's output.
    """
    if all(info.type.WhichOneof("value") is not None for info in proto.graph.value_info):
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    kept = [info for info in copy.graph.value_info if info.type.WhichOneof("value") is not None]
    del copy.graph.value_info[:]
    copy.graph.value_info.extend(kept)
    return copy


def import_qdq_model(qdq: onnx.ModelProto, model: LoadedModel) -> ImportedModel:
    """Import a (mixed) QDQ model into Relax with layer-identifying parameter names.

    Parameters
    ----------
    qdq : onnx.ModelProto
        The QDQ model built for a plan (or the float model itself).
    model : LoadedModel
        The prepared model the QDQ model was made from; gives layer ids and input shapes.
    """
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx

    unsupported = unsupported_operators(qdq)
    if unsupported:
        names = ", ".join(f"{node!r} ({op_type})" for node, op_type in unsupported[:5])
        raise CompileError(f"TVM's ONNX frontend cannot import {len(unsupported)} node(s): {names}",
                           pass_name=PASS_NAME, layer_id=unsupported[0][0])
    rewritten, notes = rewrite_for_tvm(qdq)
    renamed, int8_weights, float_weights = _rename_weights(rewritten, model)
    renamed = _without_untyped_value_info(renamed)
    shape_dict = {name: list(shape) for name, shape in model.input_shapes.items()}
    try:
        mod = from_onnx(renamed, shape_dict=shape_dict, keep_params_in_input=True)
    except Exception as exc:  # the frontend raises many types; name the pass and move on
        raise CompileError(f"ONNX import failed: {tvm_error_line(exc)}", pass_name=PASS_NAME) from exc
    mod, params = detach_params(mod)
    func = mod["main"]
    num_inputs = len(model.input_shapes)
    param_vars = list(func.params)[num_inputs:]
    values = params.get("main", [])
    param_values = {var.name: np.asarray(value.numpy()) for var, value in zip(param_vars, values)}
    for index in list(int8_weights) + list(float_weights):
        if weight_name(index) not in param_values:
            layer = model.layers[index]
            raise CompileError(f"weight parameter of conv {layer.id!r} was lost on import", pass_name=PASS_NAME,
                               layer_id=layer.id)
    return ImportedModel(
        mod=mod,
        params=param_values,
        input_names=tuple(model.input_shapes),
        output_names=tuple(model.output_names),
        int8_weights=int8_weights,
        float_weights=float_weights,
        operator_notes=tuple(notes),
    )


def emit_like(builder, old_var, value):
    """Emit ``value`` in place of ``old_var``'s binding, keeping its name and kind.

    A dataflow block's outputs must stay non-dataflow vars; re-emitting them as
    dataflow vars leaves the function returning an unbound var.
    """
    from tvm import relax

    if isinstance(old_var, relax.DataflowVar):
        return builder.emit(value, old_var.name)
    return builder.emit_output(value, old_var.name)
