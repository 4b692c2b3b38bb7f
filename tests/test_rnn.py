"""Unrolling LSTM / GRU / RNN into primitive ops: ONNX Runtime on the original against the unrolled model."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from precsearch.tvm._rnn import UNROLLED_OPS, unroll_recurrent
from precsearch.errors import CompileError

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
OUTPUTS = {"LSTM": ("Y", "Y_h", "Y_c"), "GRU": ("Y", "Y_h"), "RNN": ("Y", "Y_h")}


def recurrent_model(op, *, seq=5, batch=3, size=4, hidden=6, direction="forward", bias=True, initial_h=None,
                    initial_c=None, peepholes=False, layout=0, outputs=None, sequence_lens=None, opset=17, seed=0,
                    **attrs):
    """One recurrent node with seeded weights; initial states are 'input' (a graph input), 'const' or None."""
    rng = np.random.default_rng(seed)
    nd, g = (2 if direction == "bidirectional" else 1), GATES[op]
    init = lambda name, shape: numpy_helper.from_array((0.5 * rng.standard_normal(shape)).astype(np.float32), name)
    initializers = [init("W", (nd, g * hidden, size)), init("R", (nd, g * hidden, hidden))]
    x_shape = [seq, batch, size] if layout == 0 else [batch, seq, size]
    state_shape = [nd, batch, hidden] if layout == 0 else [batch, nd, hidden]
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    names = ["X", "W", "R", "", "", "", "", ""]
    if bias:
        initializers.append(init("B", (nd, 2 * g * hidden)))
        names[3] = "B"
    if sequence_lens is not None:
        if isinstance(sequence_lens, str):
            graph_inputs.append(helper.make_tensor_value_info(sequence_lens, TensorProto.INT32, [batch]))
        else:
            initializers.append(numpy_helper.from_array(np.array(sequence_lens, np.int32), "lens"))
            sequence_lens = "lens"
        names[4] = sequence_lens
    for index, kind, name in ((5, initial_h, "h0"), (6, initial_c, "c0")):
        if kind == "input":
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, state_shape))
        elif kind == "const":
            initializers.append(init(name, state_shape))
        elif kind == "zeros":
            initializers.append(numpy_helper.from_array(np.zeros(state_shape, np.float32), name))
        if kind:
            names[index] = name
    if peepholes:
        initializers.append(init("P", (nd, 3 * hidden)))
        names[7] = "P"
    while names[-1] == "":
        names.pop()
    outputs = OUTPUTS[op] if outputs is None else outputs
    node_outputs = [name if name in outputs else "" for name in OUTPUTS[op]]
    while node_outputs[-1] == "":
        node_outputs.pop()
    node = helper.make_node(op, names, node_outputs, name=f"my {op}", hidden_size=hidden, direction=direction,
                            **({"layout": layout} if layout else {}), **attrs)
    shapes = {"Y": [seq, nd, batch, hidden] if layout == 0 else [batch, seq, nd, hidden], "Y_h": state_shape,
              "Y_c": state_shape}
    graph = helper.make_graph([node], "rnn", graph_inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, shapes[o]) for o in outputs],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def feeds(model, seed=1):
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        shape = [d.dim_value or 3 for d in vi.type.tensor_type.shape.dim]  # a symbolic batch runs as 3
        out[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def run(model, inputs):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))


def check(model, reference=None, inputs=None, tolerance=1e-5):
    """Unroll, check no recurrent node is left, and compare ORT outputs."""
    unrolled = unroll_recurrent(model)
    onnx.checker.check_model(unrolled, full_check=True)
    assert not [n for n in unrolled.graph.node if n.op_type in UNROLLED_OPS]
    inputs = feeds(model) if inputs is None else inputs
    expected = run(model, inputs) if reference is None else reference
    got = run(unrolled, inputs)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        np.testing.assert_allclose(got[name], value, rtol=0, atol=tolerance, err_msg=name)
    return unrolled


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("bias,initial_h,initial_c", [(True, "input", "input"), (False, None, None),
                                                      (True, "const", None), (False, None, "input")])
def test_lstm(direction, bias, initial_h, initial_c):
    check(recurrent_model("LSTM", direction=direction, bias=bias, initial_h=initial_h, initial_c=initial_c))


@pytest.mark.parametrize("initial", [None, "input"])
def test_lstm_peepholes(initial):
    check(recurrent_model("LSTM", direction="bidirectional", peepholes=True, initial_h=initial, initial_c=initial))


@pytest.mark.parametrize("outputs", [("Y",), ("Y_h",), ("Y_c",), ("Y_h", "Y_c")])
def test_lstm_partial_outputs(outputs):
    check(recurrent_model("LSTM", direction="bidirectional", outputs=outputs, initial_c="input"))


def test_lstm_clip_input_forget_activations_and_full_sequence_lens():
    check(recurrent_model("LSTM", direction="bidirectional", peepholes=True, initial_c="input", clip=0.7,
                          input_forget=1, sequence_lens=[5, 5, 5],
                          activations=["HardSigmoid", "LeakyRelu", "Tanh", "Sigmoid", "ScaledTanh", "Affine"],
                          activation_alpha=[0.3, 0.2, 0.9, 1.5], activation_beta=[0.4, 0.8, 0.1]))


def test_lstm_opset11_and_zero_initial_state():
    unrolled = check(recurrent_model("LSTM", direction="bidirectional", opset=11, clip=1.5, initial_h="zeros",
                                     initial_c="zeros"))
    assert not {"h0", "c0", "W", "R", "B"} & {t.name for t in unrolled.graph.initializer}


@pytest.mark.parametrize("op,outputs", [("LSTM", ("Y", "Y_h", "Y_c")), ("GRU", ("Y", "Y_h")), ("RNN", ("Y_h",))])
def test_layout_1(op, outputs):
    """ORT has no batch-first kernels: the reference is the layout-0 model on transposed inputs."""
    kwargs = dict(direction="bidirectional", initial_h="input", outputs=outputs)
    batch_first = recurrent_model(op, layout=1, **kwargs)
    time_first = recurrent_model(op, layout=0, **kwargs)
    inputs = feeds(batch_first)
    expected = run(time_first, {"X": inputs["X"].transpose(1, 0, 2), "h0": inputs["h0"].transpose(1, 0, 2)})
    perms = {"Y": (2, 0, 1, 3), "Y_h": (1, 0, 2), "Y_c": (1, 0, 2)}
    check(batch_first, {k: v.transpose(perms[k]) for k, v in expected.items()}, inputs)


@pytest.mark.parametrize("linear_before_reset", [0, 1])
@pytest.mark.parametrize("direction,bias,initial_h", [("forward", True, None), ("reverse", False, "input"),
                                                      ("bidirectional", True, "input"), ("bidirectional", True, None)])
def test_gru(linear_before_reset, direction, bias, initial_h):
    check(recurrent_model("GRU", direction=direction, bias=bias, initial_h=initial_h,
                          linear_before_reset=linear_before_reset))


def test_gru_clip_and_activations():
    check(recurrent_model("GRU", direction="bidirectional", initial_h="input", clip=0.8, linear_before_reset=1,
                          activations=["HardSigmoid", "Tanh", "Sigmoid", "Softsign"], activation_alpha=[0.25],
                          activation_beta=[0.45]))


@pytest.mark.parametrize("activation", ["Tanh", "Relu"])
@pytest.mark.parametrize("direction,initial_h", [("forward", None), ("reverse", "input"), ("bidirectional", "input")])
def test_rnn(activation, direction, initial_h):
    acts = [activation] * (2 if direction == "bidirectional" else 1)
    check(recurrent_model("RNN", direction=direction, initial_h=initial_h, activations=acts))


def test_rnn_default_activation_and_clip():
    check(recurrent_model("RNN", direction="bidirectional", clip=0.5))


def test_stacked_and_unnamed_nodes_get_unique_names():
    first = recurrent_model("LSTM", outputs=("Y",))
    graph = first.graph
    graph.node[0].name = ""
    rng = np.random.default_rng(3)
    graph.initializer.extend([numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.5, n)
                              for n, s in (("W2", (1, 9, 6)), ("R2", (1, 9, 3)))])
    graph.node.extend([helper.make_node("Squeeze", ["Y", "axis1"], ["Ysq"]),
                       helper.make_node("GRU", ["Ysq", "W2", "R2"], ["Y2", "Y2_h"], hidden_size=3)])
    graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("Y2", TensorProto.FLOAT, [5, 1, 3, 3]),
                         helper.make_tensor_value_info("Y2_h", TensorProto.FLOAT, [1, 3, 3])])
    check(first)


def test_model_without_recurrent_nodes_is_unchanged():
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph)
    out = unroll_recurrent(model)
    assert out == model and out is not model


def test_input_is_not_mutated():
    model = recurrent_model("LSTM", direction="bidirectional")
    before = model.SerializeToString()
    unroll_recurrent(model)
    assert model.SerializeToString() == before


@pytest.mark.parametrize("kwargs,match", [
    (dict(sequence_lens="lens_in"), "sequence_lens"),
    (dict(sequence_lens=[5, 4, 5]), "sequence_lens"),
    (dict(activations=["Sigmoid", "Gelu", "Tanh"]), "activation 'gelu'"),
    (dict(opset=9), "opset 9"),
])
def test_errors_name_the_node(kwargs, match):
    with pytest.raises(CompileError, match=match) as info:
        unroll_recurrent(recurrent_model("LSTM", **kwargs))
    assert info.value.layer_id == "my LSTM" and info.value.pass_name == "precsearch.UnrollRecurrent"
    assert "my LSTM" in str(info.value)


def test_unknown_sequence_length_and_non_constant_weights_raise():
    model = recurrent_model("GRU")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "T"
    with pytest.raises(CompileError, match="not static"):
        unroll_recurrent(model)
    model = recurrent_model("RNN")
    weights = model.graph.initializer[0]
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(weights.dims)))
    del model.graph.initializer[0]
    with pytest.raises(CompileError, match="W .*initializer"):
        unroll_recurrent(model)


def test_unrolled_model_runs_in_tvm():
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    model = recurrent_model("LSTM", direction="bidirectional", initial_h="input", initial_c="input", peepholes=True)
    inputs = feeds(model)
    expected = run(model, inputs)
    mod, params = relax.frontend.detach_params(from_onnx(unroll_recurrent(model)))
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    args = [tvm.runtime.tensor(inputs[vi.name]) for vi in model.graph.input] + list(params.get("main", []))
    outputs = vm["main"](*args)
    for value, (name, reference) in zip(outputs, expected.items()):
        np.testing.assert_allclose(value.numpy(), reference, rtol=0, atol=1e-4, err_msg=name)


def test_symbolic_batch_and_constant_node_weights():
    model = recurrent_model("LSTM", direction="bidirectional", initial_h="input", peepholes=True)
    graph = model.graph
    for vi in graph.input:
        vi.type.tensor_type.shape.dim[1].dim_param = "N"  # the batch of X [T, N, C] and h0 [D, N, H]
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in graph.initializer if t.name in "WRP"]
    keep = [t for t in graph.initializer if t.name not in "WRP"]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = constants + [graph.node[0]]
    graph.ClearField("node")
    graph.node.extend(nodes)
    unrolled = check(model)
    assert not [n for n in unrolled.graph.node if n.op_type == "Constant"]
