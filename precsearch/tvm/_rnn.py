"""Unroll ONNX LSTM, GRU and RNN nodes into primitive ops that TVM imports.

TVM 0.27's Relax ONNX frontend has no converter for LSTM, GRU or RNN ("The
following operators are not supported for frontend ONNX: LSTM").  precsearch
fixes every input shape before compiling, so the sequence length of a
recurrent node is a static number and the time loop can be written out as that
many copies of the cell: the same equations as the ONNX spec, only with the
loop unrolled, so the rewrite is exact up to float rounding.

Per direction, the input projection X·Wᵀ + Wb + Rb of every time step is one
MatMul (ONNX Runtime does the same); each step then only adds H·Rᵀ and applies
the gates.  A zero initial state (absent or a constant zero) skips the first
step's recurrent MatMul and forget term.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from precsearch.errors import CompileError

PASS_NAME = "precsearch.UnrollRecurrent"
UNROLLED_OPS = ("LSTM", "GRU", "RNN")

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTIVATIONS = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh"), "RNN": ("tanh",)}
# Which of (alpha, beta) each activation consumes, and the defaults when the lists run out:
# the ONNX spec consumes the lists in activation order; the defaults are ONNX Runtime's.
_ACTIVATION_ARGS = {"sigmoid": (0, 0), "tanh": (0, 0), "relu": (0, 0), "softsign": (0, 0), "softplus": (0, 0),
                    "affine": (1, 1), "scaledtanh": (1, 1), "hardsigmoid": (1, 1), "leakyrelu": (1, 0),
                    "thresholdedrelu": (1, 0), "elu": (1, 0)}
_ACTIVATION_DEFAULTS = {"leakyrelu": (0.01, 0.0), "hardsigmoid": (0.2, 0.5), "elu": (1.0, 0.0)}
_MIN_OPSET = 11  # Clip with min/max inputs; Split/Unsqueeze take attributes below 13 and inputs from 13 on.


def unroll_recurrent(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every LSTM, GRU and RNN node of ``model`` by its unrolled cell equations.

    Parameters
    ----------
    model : onnx.ModelProto
        A model whose recurrent nodes have a static sequence length (from shape
        inference) and constant W, R, B and P (initializers or Constant nodes).
        It is not modified.

    Returns
    -------
    onnx.ModelProto
        A copy in which each recurrent node of the default domain is replaced by
        MatMul, Add, Mul, Sub, Gather, Split, Unsqueeze, Concat, Clip and the
        activation ops, producing the same Y, Y_h and Y_c tensors (only those
        that are consumed).  A model without recurrent nodes comes back equal.

    Raises
    ------
    CompileError
        When a node cannot be unrolled exactly: a ``sequence_lens`` that is not
        a constant equal to the full length, an unknown sequence length,
        non-constant weights, an unsupported activation, a recurrent node inside
        a subgraph or a model opset below 11.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    targets = [node for node in graph.node if _is_recurrent(node)]
    for node in graph.node:
        for sub in _subgraphs(node):
            nested = next((n for n in _all_nodes(sub) if _is_recurrent(n)), None)
            if nested is not None:
                raise CompileError(f"{nested.op_type} inside a subgraph of {node.op_type} {node.name!r} "
                                   "cannot be unrolled", pass_name=PASS_NAME, layer_id=nested.name)
    if not targets:
        return out
    opset = next((op.version for op in out.opset_import if op.domain in ("", "ai.onnx")), 1)
    if opset < _MIN_OPSET:
        raise CompileError(f"model opset {opset} is below {_MIN_OPSET}; upgrade it before unrolling "
                           f"{targets[0].op_type}", pass_name=PASS_NAME, layer_id=targets[0].name)

    shapes, constants = _shapes(out), _constants(graph)
    consumed = {name for node in _all_nodes(graph) for name in node.input} | {o.name for o in graph.output}
    replaced = {name for node in targets for name in node.input if name}
    taken = _names(graph)
    nodes, initializers = [], []
    for index, node in enumerate(graph.node):
        if not _is_recurrent(node):
            nodes.append(_copy(node))
            continue
        cell = _Cell.parse(node, shapes, constants, consumed)
        emit = _Emitter(node.name or f"{node.op_type}_{index}", opset, cell.W.dtype, taken)
        cell.emit(emit)
        nodes.extend(emit.nodes)
        initializers.extend(emit.initializers)
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    _prune(graph, replaced)
    return out


@dataclass
class _Cell:
    """One recurrent node, parsed and checked: everything the unrolling needs."""

    op: str
    hidden: int
    seq: int
    layout: int
    directions: tuple[str, ...]
    W: np.ndarray
    R: np.ndarray
    B: np.ndarray | None
    P: np.ndarray | None
    activations: list[list[tuple[str, float, float]]]  # per direction: (name, alpha, beta) per function
    clip: float | None
    linear_before_reset: bool
    input_forget: bool
    inputs: list[str]
    outputs: list[str]  # Y, Y_h, Y_c; "" when absent or not consumed
    initial: dict[int, np.ndarray]  # constant initial_h (5) / initial_c (6), by input index

    @classmethod
    def parse(cls, node, shapes, constants, consumed) -> "_Cell":
        def fail(message):
            return CompileError(message, pass_name=PASS_NAME, layer_id=node.name)

        op, gates = node.op_type, _GATES[node.op_type]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        inputs = list(node.input) + [""] * (8 - len(node.input))
        direction = attrs.get("direction", b"forward").decode()
        directions = {"forward": ("forward",), "reverse": ("reverse",),
                      "bidirectional": ("forward", "reverse")}.get(direction)
        if directions is None:
            raise fail(f"unknown direction {direction!r}")
        nd = len(directions)

        def constant(index, what):
            name = inputs[index]
            if not name:
                return None
            if name not in constants:
                raise fail(f"{op} input {what} ({name!r}) must be an initializer or a Constant to unroll")
            return numpy_helper.to_array(constants[name])

        W, R, B = constant(1, "W"), constant(2, "R"), constant(3, "B")
        P = constant(7, "P") if op == "LSTM" else None
        if W is None or R is None:
            raise fail(f"{op} needs inputs W and R")
        hidden = int(attrs.get("hidden_size", R.shape[-1]))
        size = W.shape[-1]
        expected = {"W": (W, (nd, gates * hidden, size)), "R": (R, (nd, gates * hidden, hidden)),
                    "B": (B, (nd, 2 * gates * hidden)), "P": (P, (nd, 3 * hidden))}
        for what, (array, shape) in expected.items():
            if array is not None and array.shape != shape:
                raise fail(f"{op} input {what} has shape {array.shape}, expected {shape}")

        layout = int(attrs.get("layout", 0))
        if layout not in (0, 1):
            raise fail(f"unknown layout {layout}")
        x_shape = shapes.get(inputs[0])
        if x_shape is None or len(x_shape) != 3 or not x_shape[layout]:
            raise fail(f"the sequence length of {op} input X ({inputs[0]!r}, shape {x_shape}) is not static; "
                       "fix the model's input shapes")
        seq = x_shape[layout]
        if x_shape[2] not in (None, size):
            raise fail(f"{op} input X has {x_shape[2]} features but W expects {size}")
        if inputs[4]:  # sequence_lens: only the trivial "every sequence is full length" can be unrolled statically
            lens = constants.get(inputs[4])
            if lens is None or not np.all(numpy_helper.to_array(lens) == seq):
                raise fail(f"{op} input sequence_lens ({inputs[4]!r}) must be a constant equal to the sequence length "
                           f"{seq} everywhere to unroll")

        names = [s.decode() if isinstance(s, bytes) else s for s in attrs.get("activations", [])]
        names = [n.lower() for n in names] or list(_DEFAULT_ACTIVATIONS[op]) * nd
        per_direction = len(_DEFAULT_ACTIVATIONS[op])
        if len(names) != per_direction * nd:
            raise fail(f"{op} with {nd} direction(s) needs {per_direction * nd} activations, got {names}")
        alphas, betas = list(attrs.get("activation_alpha", [])), list(attrs.get("activation_beta", []))
        parsed = []
        for name in names:
            if name not in _ACTIVATION_ARGS:
                raise fail(f"unsupported {op} activation {name!r}")
            uses_alpha, uses_beta = _ACTIVATION_ARGS[name]
            default_alpha, default_beta = _ACTIVATION_DEFAULTS.get(name, (0.0, 0.0))
            alpha = (alphas.pop(0) if alphas else default_alpha) if uses_alpha else 0.0
            beta = (betas.pop(0) if betas else default_beta) if uses_beta else 0.0
            parsed.append((name, alpha, beta))
        activations = [parsed[d * per_direction:(d + 1) * per_direction] for d in range(nd)]

        clip = attrs.get("clip")
        if clip is not None and clip <= 0:
            raise fail(f"{op} clip must be positive, got {clip}")
        outputs = [name if name in consumed else "" for name in list(node.output)[:3]]
        outputs += [""] * (3 - len(outputs))
        return cls(op, hidden, seq, layout, directions, W, R, B, P, activations, clip,
                   bool(attrs.get("linear_before_reset", 0)), bool(attrs.get("input_forget", 0)), inputs, outputs,
                   {i: numpy_helper.to_array(constants[inputs[i]]) for i in (5, 6) if inputs[i] in constants})

    def emit(self, e: "_Emitter") -> None:
        """Append the unrolled graph of every direction and assemble Y, Y_h, Y_c."""
        if not any(self.outputs):
            return  # nothing downstream reads the node
        h, layout = self.hidden, self.layout
        ys, last_h, last_c = [], [], []
        for d, direction in enumerate(self.directions):
            acts = self.activations[d]
            h_prev = self._initial(e, 5, d, "h0")
            c_prev = self._initial(e, 6, d, "c0") if self.op == "LSTM" else None
            bias = self._input_bias(d)
            # All time steps projected at once: [seq, batch, G*h] (layout 0) or [batch, seq, G*h] (layout 1).
            xw = e.op("MatMul", self.inputs[0], e.const(self.W[d].T, f"W{d}T"))
            if bias is not None:
                xw = e.op("Add", xw, e.const(bias, f"B{d}"))
            if self.op == "GRU":  # the h gate is added after the reset gate, so keep it apart
                xw = e.split(xw, [2 * h, h], axis=-1)
            steps = range(self.seq) if direction == "forward" else range(self.seq - 1, -1, -1)
            outs = {}
            for t in steps:
                x_t = [e.op("Gather", x, e.const(np.array(t, np.int64), f"t{t}"), axis=layout)
                       for x in (xw if isinstance(xw, list) else [xw])]
                if self.op == "LSTM":
                    h_prev, c_prev = self._lstm_step(e, d, x_t[0], h_prev, c_prev, acts)
                elif self.op == "GRU":
                    h_prev = self._gru_step(e, d, x_t, h_prev, acts)
                else:
                    pre = x_t[0] if h_prev is None else e.op("Add", x_t[0], e.op("MatMul", h_prev, self._rt(e, d)))
                    h_prev = e.act(acts[0], e.clip(pre, self.clip))
                if self.outputs[0]:
                    # [1, 1, batch, h] (layout 0) or [batch, 1, 1, h] (layout 1), ready to concatenate.
                    outs[t] = e.unsqueeze(h_prev, [0, 1] if layout == 0 else [1, 2])
            if self.outputs[0]:
                ys.append(e.concat([outs[t] for t in range(self.seq)], axis=layout))
            last_h.append(h_prev)
            last_c.append(c_prev)
        y, y_h, y_c = self.outputs
        if y:
            e.concat(ys, axis=1 + layout, out=y)
        if y_h:
            e.concat([e.unsqueeze(s, [layout]) for s in last_h], axis=layout, out=y_h)
        if y_c:
            e.concat([e.unsqueeze(s, [layout]) for s in last_c], axis=layout, out=y_c)

    def _input_bias(self, d: int) -> np.ndarray | None:
        """Wb + Rb, folded into the input projection (GRU with linear_before_reset keeps Rbh per step)."""
        if self.B is None:
            return None
        n = _GATES[self.op] * self.hidden
        wb, rb = self.B[d, :n], self.B[d, n:].copy()
        if self.op == "GRU" and self.linear_before_reset:
            rb[2 * self.hidden:] = 0
        return wb + rb

    def _initial(self, e: "_Emitter", index: int, d: int, tag: str) -> str | None:
        """Direction d's initial state as [batch, h]; None for zeros (absent or a constant zero)."""
        name = self.inputs[index]
        if not name:
            return None
        axis = 0 if self.layout == 0 else 1
        if index in self.initial:
            part = np.take(self.initial[index], d, axis=axis)
            return None if not part.any() else e.const(part.astype(self.W.dtype), f"{tag}_{d}")
        return e.op("Gather", name, e.const(np.array(d, np.int64), f"dir{d}"), axis=axis)

    def _rt(self, e: "_Emitter", d: int) -> str:
        return e.const(self.R[d].T, f"R{d}T")

    def _lstm_step(self, e, d, x_t, h_prev, c_prev, acts):
        f_act, g_act, h_act = acts
        h = self.hidden
        gates = x_t if h_prev is None else e.op("Add", x_t, e.op("MatMul", h_prev, self._rt(e, d)))
        i, o, f, c = e.split(gates, [h] * 4, axis=-1)  # ONNX gate order i, o, f, c
        peepholes = None if self.P is None else [e.const(p, f"P{d}{g}") for g, p in zip("iof", np.split(self.P[d], 3))]
        p_i, p_o, p_f = peepholes or (None, None, None)
        if p_i is not None and c_prev is not None:
            i = e.op("Add", i, e.op("Mul", c_prev, p_i))
        i = e.act(f_act, e.clip(i, self.clip))
        cell = e.op("Mul", i, e.act(g_act, e.clip(c, self.clip)))
        if c_prev is not None:
            if self.input_forget:  # coupled gates: f = 1 - i
                f = e.op("Sub", e.const(np.array(1, self.W.dtype), "one"), i)
            else:
                if p_f is not None:
                    f = e.op("Add", f, e.op("Mul", c_prev, p_f))
                f = e.act(f_act, e.clip(f, self.clip))
            cell = e.op("Add", e.op("Mul", f, c_prev), cell)
        if p_o is not None:  # the output gate peeks at the new cell state
            o = e.op("Add", o, e.op("Mul", cell, p_o))
        o = e.act(f_act, e.clip(o, self.clip))
        return e.op("Mul", o, e.act(h_act, cell)), cell

    def _gru_step(self, e, d, x_t, h_prev, acts):
        f_act, g_act = acts
        h = self.hidden
        x_zr, x_h = x_t
        rb_h = None
        if self.linear_before_reset and self.B is not None and self.B[d, 5 * h:].any():
            rb_h = e.const(self.B[d, 5 * h:], f"Rbh{d}")
        if h_prev is None:
            z, r = e.split(x_zr, [h, h], axis=-1)
            # Zero state: r·(0·Rhᵀ) vanishes with linear_before_reset=0; with 1 only r·Rbh is left.
            pre_h = x_h if rb_h is None else e.op("Add", x_h, e.op("Mul", e.act(f_act, e.clip(r, self.clip)), rb_h))
        elif self.linear_before_reset:
            hr_zr, hr_h = e.split(e.op("MatMul", h_prev, self._rt(e, d)), [2 * h, h], axis=-1)
            z, r = e.split(e.op("Add", x_zr, hr_zr), [h, h], axis=-1)
            if rb_h is not None:
                hr_h = e.op("Add", hr_h, rb_h)
            pre_h = e.op("Add", x_h, e.op("Mul", e.act(f_act, e.clip(r, self.clip)), hr_h))
        else:
            rt = self.R[d].T
            rt_zr, rt_h = e.const(rt[:, :2 * h], f"R{d}Tzr"), e.const(rt[:, 2 * h:], f"R{d}Th")
            z, r = e.split(e.op("Add", x_zr, e.op("MatMul", h_prev, rt_zr)), [h, h], axis=-1)
            r = e.act(f_act, e.clip(r, self.clip))
            pre_h = e.op("Add", x_h, e.op("MatMul", e.op("Mul", r, h_prev), rt_h))
        z = e.act(f_act, e.clip(z, self.clip))
        cand = e.act(g_act, e.clip(pre_h, self.clip))
        # Ht = (1 - z)·h + z·Ht-1, written as h + z·(Ht-1 - h) to save a constant and a Sub.
        if h_prev is None:
            return e.op("Sub", cand, e.op("Mul", z, cand))
        return e.op("Add", cand, e.op("Mul", z, e.op("Sub", h_prev, cand)))


class _Emitter:
    """Collects the new nodes and initializers of one recurrent node, with unique names."""

    def __init__(self, base: str, opset: int, dtype: np.dtype, taken: set[str]):
        self.prefix = re.sub(r"[^0-9A-Za-z_.]", "_", base) + "_unrolled"
        self.opset, self.dtype, self.taken = opset, dtype, taken
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._consts: dict[str, str] = {}

    def name(self, tag: str) -> str:
        name, k = f"{self.prefix}/{tag}", 1
        while name in self.taken:
            name, k = f"{self.prefix}/{tag}_{k}", k + 1
        self.taken.add(name)
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, outputs: int = 1, **attrs):
        names = [out] if out else [self.name(f"{op_type}") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.name(f"{op_type}_node"), **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value: np.ndarray, tag: str) -> str:
        """An initializer; the same tag always means the same value, so it is created once."""
        if tag not in self._consts:
            self._consts[tag] = self.name(tag)
            self.initializers.append(numpy_helper.from_array(np.array(value, order="C"), self._consts[tag]))
        return self._consts[tag]

    def split(self, x: str, sizes: list[int], axis: int) -> list[str]:
        if self.opset >= 13:
            return self.op("Split", x, self.const(np.array(sizes, np.int64), f"split_{'_'.join(map(str, sizes))}"),
                           outputs=len(sizes), axis=axis)
        return self.op("Split", x, outputs=len(sizes), axis=axis, split=sizes)

    def unsqueeze(self, x: str, axes: list[int]) -> str:
        if self.opset >= 13:
            return self.op("Unsqueeze", x, self.const(np.array(axes, np.int64), f"axes_{'_'.join(map(str, axes))}"))
        return self.op("Unsqueeze", x, axes=axes)

    def concat(self, xs: list[str], axis: int, out: str | None = None) -> str:
        if len(xs) == 1:
            return self.op("Identity", xs[0], out=out) if out else xs[0]
        return self.op("Concat", *xs, axis=axis, out=out)

    def clip(self, x: str, threshold: float | None) -> str:
        if threshold is None:
            return x
        return self.op("Clip", x, self.const(np.array(-threshold, self.dtype), "clip_lo"),
                       self.const(np.array(threshold, self.dtype), "clip_hi"))

    def act(self, spec: tuple[str, float, float], x: str) -> str:
        """Apply one activation of the ONNX RNN list (names are lower case here)."""
        name, alpha, beta = spec
        scalar = lambda v, tag: self.const(np.array(v, self.dtype), f"{tag}_{v!r}")
        simple = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu", "softsign": "Softsign", "softplus": "Softplus"}
        if name in simple:
            return self.op(simple[name], x)
        if name == "leakyrelu":
            return self.op("LeakyRelu", x, alpha=alpha)
        if name == "thresholdedrelu":
            return self.op("ThresholdedRelu", x, alpha=alpha)
        if name == "elu":
            return self.op("Elu", x, alpha=alpha)
        if name == "hardsigmoid":
            return self.op("HardSigmoid", x, alpha=alpha, beta=beta)
        if name == "affine":
            return self.op("Add", self.op("Mul", x, scalar(alpha, "alpha")), scalar(beta, "beta"))
        # scaledtanh: alpha·tanh(beta·x)
        return self.op("Mul", self.op("Tanh", self.op("Mul", x, scalar(beta, "beta"))), scalar(alpha, "alpha"))


def _is_recurrent(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in UNROLLED_OPS


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))]


def _all_nodes(graph: onnx.GraphProto):
    """Every node of the graph and of its subgraphs (If/Loop/Scan bodies may read outer tensors)."""
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _all_nodes(sub)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    for node in _all_nodes(graph):
        names.update(node.input, node.output, [node.name])
    return names


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and the outputs of Constant nodes (as tensors; converted only when a node reads one)."""
    values = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.attribute:
            a = node.attribute[0]
            if a.name == "value":
                values[node.output[0]] = a.t
            elif a.name in ("value_float", "value_floats", "value_int", "value_ints"):
                kind = np.float32 if "float" in a.name else np.int64
                values[node.output[0]] = numpy_helper.from_array(np.array(helper.get_attribute_value(a), kind))
    return values


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor shapes after ONNX shape inference (None for a symbolic dimension)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # an un-inferable model still has its declared shapes
        inferred = model
    graph = inferred.graph
    shapes = {}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        if vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    shapes.update((t.name, list(t.dims)) for t in graph.initializer)
    return shapes


def _prune(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Drop the initializers and Constant nodes only the replaced nodes read (the transposed copies replace them)."""
    used = {name for node in _all_nodes(graph) for name in node.input} | {o.name for o in graph.output}
    dead = candidates - used - {i.name for i in graph.input}
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name in dead:
            del graph.initializer[i]
    for i in reversed(range(len(graph.node))):
        node = graph.node[i]
        if node.op_type == "Constant" and node.output and node.output[0] in dead:
            del graph.node[i]
