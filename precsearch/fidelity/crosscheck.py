"""Is a TVM build that disagrees with ONNX Runtime wrong, or just rounding differently?

Exact integer arithmetic (TVM) and ORT's float emulation of a QDQ model round a
value that sits within ~1e-6 of a .5 tie differently, and a deep network can
amplify that one-step flip into several output steps.  So output agreement alone
cannot tell a compiler bug from rounding.  This module traces each divergence to
its origin: it builds a *probe* of the plan whose outputs include every
quantized tensor, finds per image the first quantized tensor where TVM and ORT
differ, and checks that ORT's value there was within ``tie_window`` of a
rounding tie and, after an int8 conv, that TVM holds the exactly rounded
integer result.  A conv that requantizes in float32 (oneDNN's int8 primitives,
or ``requant_dtype="float32"``) may round a near-tie either way, as ORT's own
float32 arithmetic does: there TVM must hold one of the two integers next to
the exact value.  A divergence that starts anywhere else is a compiler problem.

A plan's bf16 convs are held to ORT on the same model with those convs' inputs
and weights rounded to bf16 (:func:`~precsearch.model.bf16.bf16_reference_model`).
Rounding to bf16 is a quantization too: a float32 difference in the last bits
(sums in another order) moves a value that sits near a bf16 tie to the other
neighbour, 2⁻⁸ away, and 53 such layers amplify that past float tolerance
(measured on MobileNetV3: ORT's own optimized and unoptimized sessions part by
2.9e-4 relative on the rounded model).  So each bf16 conv's input is probed as
a quantized tensor is: a divergence that starts there must start where ORT's
and TVM's float32 values lie within ``BF16_TIE_WINDOW`` (float32 noise, at the
tensor's scale) of each other, so that the bf16 boundary between them was a tie.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from precsearch.tvm import CompileOptions, build_plan
from precsearch.fidelity.reference import Agreement, agreement, max_relative_error, run_ort
from precsearch.model import LoadedModel
from precsearch.model.bf16 import bf16_reference_model, round_to_bf16
from precsearch.model.plan import Plan

logger = logging.getLogger(__name__)

AGREES, NEAR_TIES, COMPILER_PROBLEM = "agrees", "near-ties", "compiler problem"

# Relative error allowed on outputs of an image whose quantized tensors all match:
# what is left is float arithmetic in a different order.
FLOAT_TAIL_RTOL = 1e-4
# How far apart ORT's and TVM's float32 values of a bf16 conv's input may be, relative to the tensor's largest
# value, for a bf16 rounding flip there to count as rounding: float32 sums in another order left 1.9e-7 on the
# detector (and fast_exp's SiLU 5e-6 at most); a bf16 step is 3.9e-3.
BF16_TIE_WINDOW = 1e-5
# A quantized tensor whose value float ops computed (a float conv, its fused activation): ORT and TVM sum in
# another order, so the value before rounding may part by float32 noise at the tensor's scale, not by 1e-3 of
# a step.  Seen on EfficientNet-Lite0: a float oneDNN conv + ReLU6 quantized to u8 (step 6/255) flipped a value
# 1.4e-3 steps from a tie; 1e-5 of the tensor's largest value (255 steps) is 2.6e-3 steps.
FLOAT_TIE_RTOL = 1e-5
BF16_INPUT = "Conv (bf16 input)"  # a divergence's op_type when it starts where a bf16 conv rounds its input


@dataclass(frozen=True)
class Divergence:
    """Where TVM and ORT first part ways on one check image."""

    batch: int
    tensor: str  # the quantized tensor, or "" when only float outputs differ
    producer: str  # node name of the op whose output was quantized there
    op_type: str
    elements: int  # differing elements of that tensor
    near_tie: bool  # ORT's pre-rounding value was within the tie window everywhere
    tie_distance: float  # worst distance of ORT's value from a .5 tie, in steps
    exact: bool | None  # after an int8 conv: TVM holds the exactly rounded value (None otherwise)

    @property
    def explained(self) -> bool:
        return self.near_tie and self.exact is not False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CrossCheck:
    """Agreement with ORT on the same QDQ model, and what explains any divergence."""

    agreement: Agreement
    verdict: str  # AGREES, NEAR_TIES or COMPILER_PROBLEM
    divergences: tuple[Divergence, ...]

    def summary(self) -> str:
        if self.verdict == AGREES:
            return "every output within one step"
        origins = sorted({f"{d.producer} ({d.op_type})" for d in self.divergences})
        if self.verdict == NEAR_TIES:
            return (f"{len(self.divergences)} image(s) diverge, each from a rounding near-tie at "
                    f"{', '.join(origins[:4])}{' …' if len(origins) > 4 else ''}: not a compiler problem")
        bad = [d for d in self.divergences if not d.explained]
        where = (f"the input of bf16 conv {bad[0].producer}" if bad[0].op_type == BF16_INPUT
                 else f"after {bad[0].producer} ({bad[0].op_type})")
        return (f"compiler problem: image {bad[0].batch} diverges at {bad[0].tensor or 'a float output'} "
                f"{where}, {bad[0].tie_distance:.3g} steps from a tie")


def cross_check(model: LoadedModel, qdq: onnx.ModelProto, int8_ids, batches, candidate_outputs,
                steps: dict[str, float], *, reference=None, options: CompileOptions | None = None,
                tie_window: float = 1e-3, bf16_ids=()) -> CrossCheck:
    """Agreement of a build with ORT on the same QDQ model, and what explains any divergence.

    Parameters
    ----------
    model, qdq, int8_ids
        The plan as built (the probe is built from the same QDQ model).
    batches : list of dict
        The check inputs.
    candidate_outputs : list of dict
        The build's outputs on ``batches``.
    steps : dict of str to float
        Output quantization step per output.
    reference : list of dict, optional
        ORT's outputs on ``batches`` (graph optimizations disabled), when the
        caller already has them; computed otherwise.
    options : CompileOptions, optional
        As used for the build.
    tie_window : float
        How close to a .5 tie (in steps) ORT's value must be for a flip to count as rounding.
    bf16_ids : iterable of str
        The plan's bf16 convs: ORT runs them on bf16-rounded inputs and weights.
    """
    bf16_ids = frozenset(bf16_ids)
    ort_qdq = bf16_reference_model(qdq, bf16_ids) if bf16_ids else qdq
    if reference is None:
        reference = run_ort(ort_qdq, batches)
    if steps is not None:
        result = agreement(reference, candidate_outputs, steps)
        diverging = [i for i, (ref, ours) in enumerate(zip(reference, candidate_outputs))
                     if any(np.max(np.abs(ref[name] - ours[name])) > steps[name] * (1 + 1e-6) for name in ref)]
    else:  # no int8 layer, so no output step: float outputs within float tolerance agree
        result = None
        diverging = [i for i, (ref, ours) in enumerate(zip(reference, candidate_outputs))
                     if max_relative_error([ref], [ours]) > FLOAT_TAIL_RTOL]
    if not diverging:
        return CrossCheck(result, AGREES, ())
    bf16_inputs = _bf16_inputs(qdq, bf16_ids)
    probe, ort_probe, quantized = _probe_models(qdq, bf16_inputs)
    if bf16_ids:  # ORT's probe of the bf16-rounded model (the same tensor names)
        _, ort_probe, _ = _probe_models(ort_qdq, bf16_inputs)
    probed = dataclasses.replace(model, output_names=tuple(out.name for out in probe.graph.output))
    logger.info("tracing %d diverging image(s) through a probe build", len(diverging))
    plan = Plan(frozenset(model.capable_ids()) - set(int8_ids), bf16_ids=bf16_ids) if bf16_ids else int8_ids
    built = build_plan(probed, probe, plan, options=options)
    initializers = {init.name: numpy_helper.to_array(init) for init in qdq.graph.initializer}
    producers = {out: node for node in qdq.graph.node for out in node.output}
    int8 = set(int8_ids)
    # layers whose requantization runs in float32 (a near-tie may round either way there)
    float32_requant = int8 if (options or CompileOptions()).requant_dtype == "float32" else \
        {layer for layer in built.onednn_kernels if layer in int8}
    divergences = []
    ort_outputs = run_ort(ort_probe, [batches[i] for i in diverging])
    for batch_index, ref in zip(diverging, ort_outputs):
        ours = built.run(batches[batch_index])
        first = next((name for name in quantized if not np.array_equal(*_as_quantized(name, bf16_inputs, ref, ours))),
                     None)
        if first in bf16_inputs:
            divergences.append(_bf16_divergence(batch_index, first, bf16_inputs[first], ref[first], ours[first]))
            continue
        if first is None:
            error = max_relative_error([{n: ref[n] for n in model.output_names}],
                                       [{n: ours[n] for n in model.output_names}])
            divergences.append(Divergence(batch_index, "", "float ops", "float", 0, error <= FLOAT_TAIL_RTOL,
                                          error, None))
            continue
        quantize = producers[first]
        scale = float(initializers[quantize.input[1]])
        source = producers.get(quantize.input[0])
        elements = [tuple(e) for e in np.argwhere(ref[first] != ours[first])]
        values = np.array([float(ref[quantize.input[0]][e]) / scale for e in elements])
        tie_distance = float(np.max(np.abs(np.abs(values - np.floor(values)) - 0.5)))
        exact, window = None, tie_window
        if source is not None and source.op_type == "Conv" and source.name in int8:
            exact = all(_tvm_holds_exact_rounding(source, initializers, producers, ref, ours[first], e,
                                                  either_neighbour=source.name in float32_requant)
                        for e in elements)
        elif source is not None:  # float arithmetic made the value: float32 noise at the tensor's scale
            largest_steps = float(np.abs(ref[quantize.input[0]]).max()) / scale
            window = max(tie_window, FLOAT_TIE_RTOL * largest_steps)
        divergences.append(Divergence(batch_index, first, source.name if source is not None else "",
                                      source.op_type if source is not None else "", len(elements),
                                      tie_distance < window, tie_distance, exact))
    verdict = NEAR_TIES if all(d.explained for d in divergences) else COMPILER_PROBLEM
    return CrossCheck(result, verdict, tuple(divergences))


def _bf16_inputs(qdq: onnx.ModelProto, bf16_ids) -> dict[str, str]:
    """The data input of each bf16 conv (what the conv rounds to bf16) → the conv's name; graph inputs left out
    (both runtimes read them as given)."""
    graph_inputs = {value.name for value in qdq.graph.input}
    return {node.input[0]: node.name for node in qdq.graph.node
            if node.op_type == "Conv" and node.name in bf16_ids and node.input[0] not in graph_inputs}


def _as_quantized(name: str, bf16_inputs, ref: dict, ours: dict):
    """A probed tensor as its consumer sees it: a bf16 conv's input rounded to bf16, a quantized tensor as is."""
    if name in bf16_inputs:
        return round_to_bf16(ref[name]), round_to_bf16(ours[name])
    return ref[name], ours[name]


def _bf16_divergence(batch_index: int, tensor: str, conv: str, ref: np.ndarray, ours: np.ndarray) -> Divergence:
    """Where a bf16 conv's rounded input first differs: were ORT's and TVM's float32 values there within float32
    noise of each other (so the bf16 boundary between them is a tie either could land on)?

    The distance is the largest ``|ORT - TVM|`` of a flipped element relative to the tensor's largest value: a
    value near zero that one side keeps as a tiny denormal and the other flushes differs by a whole bf16 step of
    its own but by nothing at the tensor's scale (seen on the detector's SiLU outputs).
    """
    flipped = tuple(np.argwhere(round_to_bf16(ref) != round_to_bf16(ours)).T)
    scale = max(float(np.abs(ref).max()), np.finfo(np.float32).tiny)
    gap = np.abs(ref[flipped].astype(np.float64) - ours[flipped].astype(np.float64)) / scale
    distance = float(gap.max()) if gap.size else 0.0
    return Divergence(batch_index, tensor, conv, BF16_INPUT, int(gap.size), distance < BF16_TIE_WINDOW, distance,
                      None)


def _probe_models(qdq: onnx.ModelProto, extra=()):
    """The QDQ model with every quantized tensor (and the ``extra`` ones, in node order) as an output; ORT's copy
    also has the quantized tensors' float inputs."""
    extra = set(extra)
    quantize_nodes = [node for node in qdq.graph.node if node.op_type == "QuantizeLinear"]
    quantized = []
    for node in qdq.graph.node:
        if node.op_type == "QuantizeLinear":
            quantized.append(node.output[0])
        quantized.extend(name for name in node.input if name in extra and name not in quantized)
    probe = copy.deepcopy(qdq)
    for name in quantized:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    probe = onnx.shape_inference.infer_shapes(probe)
    ort_probe = copy.deepcopy(probe)
    for node in quantize_nodes:
        ort_probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(node.input[0]))
    return probe, ort_probe, quantized


def exact_conv_value(node: onnx.NodeProto, initializers, producers, tensors, element) -> tuple[float, int]:
    """Exact ``acc·sx·sw/sy`` of one output element of a QDQ conv, and the output zero point.

    Written by hand, in integers, because it is the independent reference the
    compiled kernel is held to: no library computes a single element exactly.
    """
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    dq_x, dq_w = producers[node.input[0]], producers[node.input[1]]
    x_q = tensors[dq_x.input[0]].astype(np.int64)
    x_scale, x_zero = float(initializers[dq_x.input[1]]), int(initializers[dq_x.input[2]])
    w_q = initializers[dq_w.input[0]].astype(np.int64)
    w_scale = initializers[dq_w.input[1]].reshape(-1)
    bias = np.zeros(w_q.shape[0], dtype=np.int64)
    if len(node.input) > 2 and node.input[2]:
        bias = initializers[producers[node.input[2]].input[0]].astype(np.int64)
    group = attrs.get("group", 1)
    strides, dilations = attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    padded = np.pad(x_q, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=x_zero)
    batch, channel, y, x = element
    per_group = w_q.shape[1]
    first = channel // (w_q.shape[0] // group) * per_group
    kernel_h, kernel_w = w_q.shape[2:]
    patch = padded[batch, first:first + per_group,
                   y * strides[0]:y * strides[0] + (kernel_h - 1) * dilations[0] + 1:dilations[0],
                   x * strides[1]:x * strides[1] + (kernel_w - 1) * dilations[1] + 1:dilations[1]]
    acc = int(((patch - x_zero) * w_q[channel]).sum() + bias[channel])
    quantize = next(n for n in producers.values() if n.op_type == "QuantizeLinear" and n.input[0] == node.output[0])
    y_scale = float(initializers[quantize.input[1]])
    scale = float(w_scale[channel if w_scale.size > 1 else 0])
    return acc * x_scale * scale / y_scale, int(initializers[quantize.input[2]])


def _tvm_holds_exact_rounding(node, initializers, producers, tensors, ours, element, *,
                              either_neighbour: bool = False) -> bool:
    exact, zero = exact_conv_value(node, initializers, producers, tensors, element)
    if either_neighbour:
        allowed = {int(np.clip(np.floor(exact) + zero, 0, 255)), int(np.clip(np.ceil(exact) + zero, 0, 255))}
        return int(ours[element]) in allowed
    return int(ours[element]) == int(np.clip(np.round(exact) + zero, 0, 255))


@dataclass(frozen=True)
class BuildCheck:
    """A build checked against ONNX Runtime, as ``build --check`` and the zoo report it.

    All-float builds are held to ORT float (``max_relative_error`` within
    FLOAT_TAIL_RTOL); plans with int8 convs to ORT on the same QDQ model with
    graph optimizations disabled, with any divergence traced by :func:`cross_check`,
    and ORT's own int8 kernels (its optimized session) as a yardstick.
    """

    verdict: str
    summary: str
    agreement: Agreement | None = None
    ort_int8_agreement: Agreement | None = None
    traced: CrossCheck | None = None
    max_relative_error: float | None = None

    def to_dict(self) -> dict:
        out = {"divergence_verdict": self.verdict, "divergence_summary": self.summary}
        if self.max_relative_error is not None:
            out["max_relative_error"] = self.max_relative_error
        if self.agreement is not None:
            out.update(agreement=self.agreement.fraction, max_abs_error=self.agreement.max_abs_error,
                       max_error_steps=self.agreement.max_error_steps, checked_elements=self.agreement.elements)
        if self.traced is not None:
            out["divergences"] = [d.to_dict() for d in self.traced.divergences]
        if self.ort_int8_agreement is not None:
            out.update(ort_int8_agreement=self.ort_int8_agreement.fraction,
                       ort_int8_max_error_steps=self.ort_int8_agreement.max_error_steps)
        return out


def check_build(model: LoadedModel, qdq: onnx.ModelProto, int8_ids, batches, candidate_outputs,
                steps: dict[str, float] | None, *, options: CompileOptions | None = None,
                float_reference=None, yardstick: bool = True, bf16_ids=()) -> BuildCheck:
    """Check a build's outputs on ``batches`` against ONNX Runtime (see :class:`BuildCheck`).

    ``qdq`` is ignored for a plan without int8 convs (``int8_ids`` empty), which
    is compared with the float model itself, or with ``float_reference`` (ORT
    float's outputs on ``batches``) when the caller has them.  ``yardstick``
    also runs ORT's own int8 kernels for comparison (``build --check`` and the
    zoo show it; the search skips it).  With ``bf16_ids`` ORT runs those convs on
    bf16-rounded inputs and weights (``float_reference`` is then not used).
    """
    bf16_ids = frozenset(bf16_ids)
    if not int8_ids:
        if bf16_ids:
            reference = run_ort(bf16_reference_model(model.proto, bf16_ids), batches)
            against = f"ONNX Runtime float with the {len(bf16_ids)} bf16 convs' inputs and weights rounded to bf16"
        else:
            reference = float_reference if float_reference is not None else run_ort(model.proto, batches)
            against = "ONNX Runtime float"
        error = max_relative_error(reference, candidate_outputs)
        if error <= FLOAT_TAIL_RTOL:
            return BuildCheck(AGREES, f"no int8 layers: max relative error {error:.2g} from {against}, "
                                      f"within {FLOAT_TAIL_RTOL:g}", max_relative_error=error)
        if bf16_ids:  # bf16 rounding flips near ties: trace where the images part ways
            traced = cross_check(model, model.proto, (), batches, candidate_outputs, None, reference=reference,
                                 options=options, bf16_ids=bf16_ids)
            summary = (f"no int8 layers: max relative error {error:.2g} from {against}; {traced.summary()}")
            return BuildCheck(traced.verdict, summary, traced=traced, max_relative_error=error)
        return BuildCheck(COMPILER_PROBLEM, f"compiler problem: the all-float build differs from "
                                            f"{against} by {error:.3g} relative (tolerance {FLOAT_TAIL_RTOL:g})",
                          max_relative_error=error)
    reference = run_ort(bf16_reference_model(qdq, bf16_ids) if bf16_ids else qdq, batches, optimized=False)
    # A yardstick: how closely ONNX Runtime's own int8 kernels (its optimized
    # session) follow the same float-emulated reference.  Exact integer
    # arithmetic and float emulation part ways on near-ties, and deep nets can
    # amplify one such flip into several output steps.
    ort_int8 = agreement(reference, run_ort(qdq, batches, optimized=True), steps) if yardstick else None
    traced = cross_check(model, qdq, int8_ids, batches, candidate_outputs, steps, reference=reference,
                         options=options, bf16_ids=bf16_ids)
    return BuildCheck(traced.verdict, traced.summary(), traced.agreement, ort_int8, traced)
