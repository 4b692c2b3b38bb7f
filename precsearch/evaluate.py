"""ONNX Runtime runs and the fidelity metrics that compare two sets of outputs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from precsearch.errors import DataError

logger = logging.getLogger(__name__)

# Relative slack on the one-step tolerance, so that an error of exactly one
# step computed in float32 is not rejected by the last bit of rounding.
STEP_RELATIVE_SLACK = 1e-6


def ort_session(proto: onnx.ModelProto, optimized: bool = False, threads: int = 2) -> ort.InferenceSession:
    """An ORT CPU session on ``proto``.

    Parameters
    ----------
    proto : onnx.ModelProto
    optimized : bool, default False
        False disables every graph optimization: the numerics reference for
        QDQ models (the optimizer may fuse Q/DQ around an excluded conv into a
        QLinearConv, changing the plan).  True (all optimizations) is for latency.
    threads : int, default 2
        Intra-op threads.

    Returns
    -------
    onnxruntime.InferenceSession
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_ort(
    proto: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]], optimized: bool = False
) -> list[dict[str, np.ndarray]]:
    """Run ``proto`` on every batch.

    Parameters
    ----------
    proto : onnx.ModelProto
    batches : sequence of dict
        ``{input_name: array}`` per batch.
    optimized : bool, default False
        See :func:`ort_session`.

    Returns
    -------
    list of dict
        ``{output_name: array}`` per batch.
    """
    session = ort_session(proto, optimized=optimized)
    names = [out.name for out in session.get_outputs()]
    return [dict(zip(names, session.run(names, batch))) for batch in batches]


@dataclass(frozen=True)
class Agreement:
    """How closely a candidate's outputs follow the reference's.

    ``fraction`` of all output elements within one output quantization step,
    the largest absolute error, that error in steps, and the element count.
    """

    fraction: float
    max_abs_error: float
    max_error_steps: float
    elements: int


def _pairs(reference: Sequence[dict], candidate: Sequence[dict]):
    if len(reference) != len(candidate):
        raise DataError(f"The reference has {len(reference)} batches but the candidate has {len(candidate)}.")
    for b, (ref, cand) in enumerate(zip(reference, candidate)):
        if set(ref) != set(cand):
            raise DataError(f"Batch {b}: reference outputs {sorted(ref)} differ from candidate outputs {sorted(cand)}.")
        for name in ref:
            r = np.asarray(ref[name], dtype=np.float64)
            c = np.asarray(cand[name], dtype=np.float64)
            if r.shape != c.shape:
                raise DataError(f"Batch {b}, output {name!r}: reference shape {r.shape} differs from candidate shape {c.shape}.")
            yield name, r, c


def agreement(reference: Sequence[dict], candidate: Sequence[dict], steps: dict[str, float]) -> Agreement:
    """Agreement of ``candidate`` with ``reference`` in output quantization steps.

    An element agrees when ``|ref - cand| <= step * (1 + 1e-6)``.

    Parameters
    ----------
    reference, candidate : sequence of dict
        ``{output_name: array}`` per batch, same names and shapes.
    steps : dict of str to float
        Positive step per output (:func:`precsearch.quantize.output_steps`).

    Returns
    -------
    Agreement
    """
    agreeing = elements = 0
    max_abs = max_steps = 0.0
    for name, r, c in _pairs(reference, candidate):
        step = steps.get(name)
        if step is None or not step > 0:
            raise DataError(f"The 'steps' parameter of agreement needs a positive step for output {name!r}; got {step!r}.")
        error = np.abs(r - c)
        agreeing += int(np.count_nonzero(error <= step * (1 + STEP_RELATIVE_SLACK)))
        elements += error.size
        if error.size:
            max_abs = max(max_abs, float(error.max()))
            max_steps = max(max_steps, float(error.max()) / step)
    if elements == 0:
        raise DataError("The outputs to compare in agreement hold no elements.")
    return Agreement(fraction=agreeing / elements, max_abs_error=max_abs, max_error_steps=max_steps, elements=elements)


def max_relative_error(reference: Sequence[dict], candidate: Sequence[dict]) -> float:
    """Largest output-wise ``max|ref - cand| / max(max|ref|, 1e-12)``.

    Each output is taken over all batches together.

    Parameters
    ----------
    reference, candidate : sequence of dict

    Returns
    -------
    float
    """
    abs_error: dict[str, float] = {}
    magnitude: dict[str, float] = {}
    for name, r, c in _pairs(reference, candidate):
        if r.size:
            abs_error[name] = max(abs_error.get(name, 0.0), float(np.abs(r - c).max()))
            magnitude[name] = max(magnitude.get(name, 0.0), float(np.abs(r).max()))
    return max((abs_error[n] / max(magnitude[n], 1e-12) for n in abs_error), default=0.0)
