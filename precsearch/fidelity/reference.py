"""ONNX Runtime runs and the fidelity metrics that compare two sets of outputs."""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort

from precsearch.model.data import data_hash
from precsearch.errors import DataError, first_line
from precsearch.files import atomic_write, cache_file

if TYPE_CHECKING:
    from precsearch.model import LoadedModel

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


# The float reference runs ORT's optimized session (ORT_ENABLE_ALL): on a float
# model its fusions are exact rewrites up to float32 summation order, and it is
# what a user deploying the float model would run.  Part of the cache key.
REFERENCE_OPTIMIZED = True
_REFERENCE_NAMES = "__output_names__"


def reference_key(model: LoadedModel, batches: Sequence[dict[str, np.ndarray]]) -> str:
    """Cache key of the float reference: model, data, ORT version (and session level).

    Returns
    -------
    str
        16 hex characters.
    """
    level = "optimized" if REFERENCE_OPTIMIZED else "plain"
    text = "|".join((model.sha256, data_hash(batches), ort.__version__, level))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reference_outputs(
    model: LoadedModel, batches: Sequence[dict[str, np.ndarray]], cache_dir: Path | None = None
) -> list[dict[str, np.ndarray]]:
    """The float model's ONNX Runtime outputs on ``batches``, computed once.

    The reference is the prepared float model (``model.proto``) run by ORT's
    optimized CPU session (see :data:`REFERENCE_OPTIMIZED`).  With a
    ``cache_dir`` the outputs are stored as ``reference-<key>.npz``
    (:func:`reference_key`) and a later call with the same model, data and ORT
    version loads them without creating a session.  A cache file that cannot
    be read or does not match the batches is recomputed and rewritten, with a
    warning.

    Parameters
    ----------
    model : LoadedModel
    batches : sequence of dict
        ``{input_name: array}`` per batch.
    cache_dir : Path, optional

    Returns
    -------
    list of dict
        ``{output_name: array}`` per batch, in the model's output order.
    """
    if not batches:
        raise DataError("The 'batches' parameter of reference_outputs must hold at least one batch; got none.")
    cache_path = cache_file(cache_dir, f"reference-{reference_key(model, batches)}.npz")
    if cache_path is not None and cache_path.is_file():
        try:
            outputs = _read_reference(cache_path, len(batches))
            logger.info("reference: cache hit %s", cache_path)
            return outputs
        except Exception as exc:  # zipfile, numpy and our own checks raise various types
            logger.warning("reference: ignoring the unreadable cache file %s (%s); recomputing", cache_path,
                           first_line(exc))
    logger.info("reference: running the float model on %d batches", len(batches))
    outputs = run_ort(model.proto, batches, optimized=REFERENCE_OPTIMIZED)
    if cache_path is not None:
        _write_reference(cache_path, outputs)
        logger.info("reference: wrote %s", cache_path)
    return outputs


def _write_reference(path: Path, outputs: list[dict[str, np.ndarray]]) -> None:
    names = list(outputs[0])
    arrays = {f"{b}:{i}": batch[name] for b, batch in enumerate(outputs) for i, name in enumerate(names)}
    arrays[_REFERENCE_NAMES] = np.array(names, dtype=str)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, buffer.getvalue())


def _read_reference(path: Path, batch_count: int) -> list[dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as archive:
        names = [str(n) for n in archive[_REFERENCE_NAMES]]
        expected = {f"{b}:{i}" for b in range(batch_count) for i in range(len(names))} | {_REFERENCE_NAMES}
        if set(archive.files) != expected:
            raise ValueError(f"it holds {len(archive.files) - 1} arrays, not {batch_count} batches of {names}")
        return [{name: archive[f"{b}:{i}"] for i, name in enumerate(names)} for b in range(batch_count)]


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
        Positive step per output (:func:`precsearch.model.quantize.output_steps`).

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
