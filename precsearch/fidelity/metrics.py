"""Fidelity metrics: how close a candidate's outputs are to the float reference's.

Pure numpy, no I/O.  "Accuracy" in precsearch means fidelity to the float model
as run by ONNX Runtime, on the user's inputs, without labels: every metric
compares a *reference* array (ORT float) with a *candidate* array of the same
shape (a mixed int8/float build).

Conventions shared by every function here:

* Every metric takes ``(ref, cand)``, two array_likes of the same shape, and
  returns a float.
* Arrays are compared in float64.  The first axis is the sample (batch) axis;
  a per-sample value flattens all the other axes (an output of shape ``(N,)``
  is ``N`` one-element samples, a 0-d array one sample).
* The reference must be finite: fidelity to a NaN is undefined, so a
  non-finite reference raises :class:`~precsearch.errors.DataError`.
* A non-finite candidate (NaN or +-Inf anywhere in a sample) gets the worst
  value of the metric for that sample: a top-k miss, cosine ``-1.0``,
  SQNR ``-inf`` dB, normalized MSE ``inf``, max abs error ``inf``.  A broken
  build therefore always ranks below any finite one and never poisons a mean
  with NaN.
* Zero cases: two all-zero samples have cosine 1.0, exactly one all-zero
  sample cosine 0.0.  A candidate identical to the reference has SQNR
  ``+inf`` and normalized MSE 0, even when the reference is all zero; an
  all-zero reference with any error has SQNR ``-inf`` and normalized MSE
  ``inf``.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from precsearch.errors import ConfigError, DataError, check_int

logger = logging.getLogger(__name__)

#: Default ``k`` of the "top5" metric.
TOP_K = 5
#: Two-sided 95 % normal quantile, for the Wilson interval of top-k agreement.
Z_95 = 1.959963984540054
# A candidate probability below this counts as this (float32 softmax underflows to 0).
_KL_FLOOR = 1e-30


# --------------------------------------------------------------------------- helpers


def _pair(ref, cand) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as float64 ``(samples, features)``; checks shapes and the reference."""
    r = np.asarray(ref, dtype=np.float64)
    c = np.asarray(cand, dtype=np.float64)
    if r.shape != c.shape:
        raise DataError(f"The 'cand' array must have the reference's shape {r.shape}; got {c.shape} instead.")
    if r.size == 0:
        raise DataError(f"The arrays to compare hold no elements (shape {r.shape}).")
    bad = int(np.count_nonzero(~np.isfinite(r)))
    if bad:
        raise DataError(
            f"The reference holds {bad} non-finite (NaN/Inf) values of {r.size}; fidelity to it is undefined."
        )
    r2 = r.reshape(1, -1) if r.ndim == 0 else r.reshape(r.shape[0], -1)
    c2 = c.reshape(r2.shape)
    return r2, c2


def _finite_rows(c: np.ndarray) -> np.ndarray:
    return np.isfinite(c).all(axis=1)


def _topk_hits(r: np.ndarray, c: np.ndarray, k: int) -> np.ndarray:
    """1.0 where the reference top-1 class is in the candidate's top-k, per sample."""
    check_int(k, "k", "topk_agreement", 1)
    n, classes = r.shape
    k = min(int(k), classes)
    ref_class = np.argmax(r, axis=1)  # lowest index among ties
    finite = _finite_rows(c)
    c = np.where(np.isfinite(c), c, 0.0)  # masked out below; keeps comparisons warning-free
    score = c[np.arange(n), ref_class][:, None]
    # Rank of the reference class in the candidate, ties going to the lower index
    # (the order of a stable sort on descending score).
    rank = (c > score).sum(axis=1) + ((c == score) & (np.arange(classes) < ref_class[:, None])).sum(axis=1)
    return ((rank < k) & finite).astype(np.float64)


def _cosine_rows(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    finite = _finite_rows(c)
    c = np.where(finite[:, None], c, 0.0)
    norm_r = np.linalg.norm(r, axis=1)
    norm_c = np.linalg.norm(c, axis=1)
    dot = np.einsum("ij,ij->i", r, c)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.clip(dot / (norm_r * norm_c), -1.0, 1.0)
    cos = np.where((norm_r == 0) & (norm_c == 0), 1.0, cos)
    cos = np.where((norm_r == 0) != (norm_c == 0), 0.0, cos)
    return np.where(finite, cos, -1.0)


def _energies(r: np.ndarray, c: np.ndarray, axis) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signal, noise, finite) summed over ``axis``; noise is 0 where non-finite."""
    finite = np.isfinite(c).all(axis=axis)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(np.isfinite(c), r - c, 0.0)
    return (r * r).sum(axis=axis), (diff * diff).sum(axis=axis), finite


def _sqnr_from(signal, noise, finite) -> np.ndarray:
    signal, noise, finite = np.broadcast_arrays(*(np.asarray(a) for a in (signal, noise, finite)))
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(np.where(noise > 0, signal, 1.0) / np.where(noise > 0, noise, 1.0))
    out = np.where(noise == 0, np.inf, out)
    out = np.where((noise > 0) & (signal == 0), -np.inf, out)
    return np.where(finite, out, -np.inf)


def _nmse_from(signal, noise, finite) -> np.ndarray:
    signal, noise, finite = np.broadcast_arrays(*(np.asarray(a) for a in (signal, noise, finite)))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = noise / signal
    out = np.where(noise == 0, 0.0, out)
    out = np.where((noise > 0) & (signal == 0), np.inf, out)
    return np.where(finite, out, np.inf)


def _probabilities(x: np.ndarray) -> np.ndarray:
    """Rows as class probabilities: kept when they already are (>= 0, summing to 1), else a softmax of them."""
    sums = x.sum(axis=1)
    if (x >= 0).all() and np.allclose(sums, 1.0, atol=1e-3):
        return x / sums[:, None]
    shifted = x - x.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def _kl_rows(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """KL(reference class distribution || candidate's) per sample, in nats; inf for a non-finite candidate."""
    finite = _finite_rows(c)
    p = _probabilities(r)
    q = _probabilities(np.where(finite[:, None], c, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, _KL_FLOOR))), 0.0)
    return np.where(finite, np.maximum(terms.sum(axis=1), 0.0), np.inf)


def _max_abs_rows(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    finite = _finite_rows(c)
    with np.errstate(invalid="ignore"):
        err = np.abs(np.where(np.isfinite(c), r - c, 0.0)).max(axis=1)
    return np.where(finite, err, np.inf)


# --------------------------------------------------------------------------- public metrics


def topk_agreement(ref, cand, k: int = TOP_K) -> float:
    """Fraction of samples whose reference top-1 class is in the candidate's top-k.

    The reference class of a sample is ``argmax`` of its reference scores (the
    lowest index among exact ties).  The candidate's top-k are its ``k``
    highest scores, exact ties going to the lower class index (a stable sort on
    descending score): the sample agrees when fewer than ``k`` classes score
    higher than the reference class, counting equal scores at lower indices as
    higher.  ``k`` is clipped to the number of classes.  A sample whose
    candidate holds NaN/Inf disagrees.

    Parameters
    ----------
    ref, cand : array_like
        Same shape; first axis samples, the flattened rest the class scores.
    k : int, default 5

    Returns
    -------
    float
        In [0, 1].
    """
    r, c = _pair(ref, cand)
    return float(_topk_hits(r, c, k).mean())


def top1_agreement(ref, cand) -> float:
    """Fraction of samples whose reference top-1 class is the candidate's top-1.

    ``topk_agreement(ref, cand, k=1)``; see there for ties and NaN.
    """
    return topk_agreement(ref, cand, k=1)


def cosine_similarity(ref, cand) -> float:
    """Mean over samples of the cosine between reference and candidate.

    Two all-zero samples count 1.0, one all-zero sample 0.0, a candidate with
    NaN/Inf -1.0 (the worst value).
    """
    r, c = _pair(ref, cand)
    return float(_cosine_rows(r, c).mean())


def sqnr_db(ref, cand) -> float:
    """Signal to quantization noise ratio over all elements, in dB.

    ``10 * log10(sum(ref**2) / sum((ref - cand)**2))``.  Identical arrays give
    ``+inf`` (also when both are zero); a zero reference with a non-zero error
    gives ``-inf``; a candidate with NaN/Inf gives ``-inf``.
    """
    r, c = _pair(ref, cand)
    return float(_sqnr_from(*_energies(r, c, axis=None)))


def normalized_mse(ref, cand) -> float:
    """``sum((ref - cand)**2) / sum(ref**2)`` over all elements.

    A zero reference gives 0 when the candidate is zero too and ``inf``
    otherwise; a candidate with NaN/Inf gives ``inf``.
    """
    r, c = _pair(ref, cand)
    return float(_nmse_from(*_energies(r, c, axis=None)))


def kl_divergence(ref, cand) -> float:
    """Mean over samples of KL(reference || candidate) between class distributions, in nats.

    Rows that already are probabilities (non-negative, summing to 1) are used
    as they are, other rows (logits) go through a softmax.  It is continuous
    where top-k agreement moves in steps of one sample, so it ranks plans with
    equal agreement.  0 for identical outputs; ``inf`` when the candidate holds
    NaN/Inf.
    """
    r, c = _pair(ref, cand)
    return float(_kl_rows(r, c).mean())


def wilson_interval(successes: float, samples: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion, 95 % by default: ``(low, high)``.

    Chosen over the normal (Wald) interval because agreement is often exactly
    1.0, where Wald's interval collapses to a point; Wilson's lower bound for
    32 of 32 is 0.893, for 256 of 256 0.985.
    """
    check_int(samples, "samples", "wilson_interval", 1)
    p = float(successes) / samples
    denominator = 1.0 + z * z / samples
    centre = (p + z * z / (2 * samples)) / denominator
    half = z * math.sqrt(p * (1 - p) / samples + z * z / (4 * samples * samples)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def max_abs_error(ref, cand) -> float:
    """Largest ``|ref - cand|``; ``inf`` when the candidate holds NaN/Inf.
    """
    r, c = _pair(ref, cand)
    return float(_max_abs_rows(r, c).max())


#: Metric name -> (function(ref, cand) -> float, higher_is_better).
METRICS: dict[str, tuple[Callable[..., float], bool]] = {
    "top1": (top1_agreement, True),
    "top5": (functools.partial(topk_agreement, k=TOP_K), True),
    "cosine": (cosine_similarity, True),
    "sqnr_db": (sqnr_db, True),
    "nmse": (normalized_mse, False),
    "max_abs_error": (max_abs_error, False),
    "kl_div": (kl_divergence, False),
}
#: Metrics that only make sense on classifier outputs (see :func:`is_classifier_output`).
CLASSIFIER_METRICS = ("top1", "top5", "kl_div")
#: Proportions over samples: each gets a 95 % interval, ``<metric>_low`` / ``<metric>_high``.
PROPORTION_METRICS = ("top1", "top5")
#: The continuous metric that orders plans of equal agreement (lower is better).
TIE_BREAK = {"top1": "kl_div", "top5": "kl_div"}
#: Evaluation samples a search takes by default: agreement needs many (one
#: sample of 256 is 0.4 %), the continuous metrics few.
DEFAULT_EVAL_SAMPLES = {"top1": 256, "top5": 256}
DEFAULT_EVAL_BATCHES = 32

# Per-sample versions, for MetricResults.per_item: (r, c) 2-D float64 -> (N,).
_PER_SAMPLE: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "top1": lambda r, c: _topk_hits(r, c, 1),
    "top5": lambda r, c: _topk_hits(r, c, TOP_K),
    "cosine": _cosine_rows,
    "sqnr_db": lambda r, c: _sqnr_from(*_energies(r, c, axis=1)),
    "nmse": lambda r, c: _nmse_from(*_energies(r, c, axis=1)),
    "max_abs_error": _max_abs_rows,
    "kl_div": _kl_rows,
}


def default_eval_batches(metric: str, batch_size: int) -> int:
    """Evaluation batches a search uses unless told: 256 samples for top-k agreement, else 32 batches."""
    samples = DEFAULT_EVAL_SAMPLES.get(metric)
    if samples is None:
        return DEFAULT_EVAL_BATCHES
    return max(1, math.ceil(samples / max(1, int(batch_size))))


def is_classifier_output(shape: Sequence[int]) -> bool:
    """Whether an output of this shape holds class scores.

    The heuristic: ``(batch, classes)`` or ``(batch, classes, 1, 1)`` (a
    classifier ending in a 1x1 conv) with ``classes >= 2``.  Anything else
    (feature maps, boxes, a single logit) is not, and gets the regression
    metrics only.

    Parameters
    ----------
    shape : sequence of int
        Including the batch axis.

    Returns
    -------
    bool
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) == 2:
        return shape[1] >= 2
    if len(shape) == 4:
        return shape[1] >= 2 and shape[2:] == (1, 1)
    return False


def _shapes(model_output_shapes) -> list[tuple[int, ...]]:
    if isinstance(model_output_shapes, Mapping):
        return [tuple(s) for s in model_output_shapes.values()]
    return [tuple(s) for s in model_output_shapes]


def default_metric(model_output_shapes: Mapping[str, Sequence[int]] | Sequence[Sequence[int]]) -> str:
    """``"top1"`` when the main (first) output is a classifier output, else ``"sqnr_db"``.

    Parameters
    ----------
    model_output_shapes : mapping of str to shape, or sequence of shapes
        In the model's output order.

    Returns
    -------
    str
    """
    shapes = _shapes(model_output_shapes)
    if not shapes:
        raise ConfigError(
            f"The 'model_output_shapes' parameter of default_metric must hold at least one shape; "
            f"got {model_output_shapes!r} instead."
        )
    return "top1" if is_classifier_output(shapes[0]) else "sqnr_db"


def validate_metric(name: str, main_output_shape: Sequence[int] | None = None) -> str:
    """Check a metric name (and, given the main output's shape, that it applies).

    Parameters
    ----------
    name : str
        A key of :data:`METRICS`.
    main_output_shape : sequence of int, optional
        With it, ``top1``/``top5`` are refused for a non-classifier output.

    Returns
    -------
    str
        ``name``.

    Raises
    ------
    ConfigError
    """
    if name not in METRICS:
        raise ConfigError(f"The 'metric' parameter must be one of {sorted(METRICS)}; got {name!r} instead.")
    if name in CLASSIFIER_METRICS and main_output_shape is not None and not is_classifier_output(main_output_shape):
        raise ConfigError(
            f"The 'metric' parameter {name!r} needs a classifier main output (batch, classes); "
            f"got shape {tuple(main_output_shape)} instead."
        )
    return name


@dataclass(frozen=True)
class MetricResults:
    """Fidelity of one candidate over a batch set.

    ``values`` maps ``"<metric>"`` to the value on the main (first) output and
    ``"<metric>/<output name>"`` to the value on each output, every batch
    together.  ``top1``/``top5``/``kl_div`` appear only for classifier
    outputs; ``top1_low``/``top1_high`` (and top5's) are the 95 % Wilson
    interval of the main output's agreement over its samples.  ``per_item`` maps each metric to its per-sample values on the main output,
    in batch order.  ``time_s`` is the wall time of the computation.
    """

    values: dict[str, float]
    per_item: dict[str, list[float]]
    time_s: float


def _stack(batches: Sequence[Mapping[str, np.ndarray]], name: str, role: str) -> np.ndarray:
    arrays = [np.asarray(batch[name]) for batch in batches]
    if any(a.ndim == 0 for a in arrays):
        return np.stack(arrays)
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"The {role} output {name!r} changes shape across batches: {sorted(shapes)}.")
    return np.concatenate(arrays)


def compute_metrics(
    reference_batches: Sequence[Mapping[str, np.ndarray]],
    candidate_batches: Sequence[Mapping[str, np.ndarray]],
    outputs: Sequence[str] | None = None,
) -> MetricResults:
    """Every metric for every output, over all batches.

    Parameters
    ----------
    reference_batches, candidate_batches : sequence of dict
        ``{output_name: array}`` per batch (as :func:`precsearch.fidelity.reference.run_ort`
        returns), same batch count, names and shapes.  The first axis of each
        array is its sample axis; batches are concatenated along it.
    outputs : sequence of str, optional
        Outputs to compare, main output first; default every output of the
        first reference batch, in its order.

    Returns
    -------
    MetricResults

    Raises
    ------
    DataError
        Mismatched batch counts, names or shapes, or a non-finite reference.
    """
    start = time.perf_counter()
    if len(reference_batches) != len(candidate_batches):
        raise DataError(
            f"The reference has {len(reference_batches)} batches but the candidate has {len(candidate_batches)}."
        )
    if not reference_batches:
        raise DataError("The 'reference_batches' parameter of compute_metrics holds no batch.")
    names = list(outputs) if outputs is not None else list(reference_batches[0])
    if not names:
        raise DataError("The 'outputs' parameter of compute_metrics names no output.")
    for b, (ref, cand) in enumerate(zip(reference_batches, candidate_batches)):
        missing_ref = [n for n in names if n not in ref]
        missing_cand = [n for n in names if n not in cand]
        if missing_ref or missing_cand:
            raise DataError(
                f"Batch {b}: outputs {missing_ref or missing_cand} are missing from the "
                f"{'reference' if missing_ref else 'candidate'} (it has {sorted(ref if missing_ref else cand)})."
            )
    values: dict[str, float] = {}
    per_item: dict[str, list[float]] = {}
    for position, name in enumerate(names):
        r = _stack(reference_batches, name, "reference")
        c = _stack(candidate_batches, name, "candidate")
        if r.shape != c.shape:
            raise DataError(f"Output {name!r}: reference shape {r.shape} differs from candidate shape {c.shape}.")
        try:
            r2, c2 = _pair(r, c)
        except DataError as exc:
            raise DataError(f"Output {name!r}: {exc}") from None
        classifier = is_classifier_output(np.asarray(reference_batches[0][name]).shape)
        for metric, (function, _) in METRICS.items():
            if metric in CLASSIFIER_METRICS and not classifier:
                continue
            per_sample = _PER_SAMPLE[metric](r2, c2)
            if metric in ("sqnr_db", "nmse", "max_abs_error"):
                value = function(r, c)  # over all elements, not a mean of samples
            else:
                value = float(per_sample.mean())
            values[f"{metric}/{name}"] = value
            if position == 0:
                values[metric] = value
                per_item[metric] = [float(v) for v in per_sample]
                if metric in PROPORTION_METRICS:
                    values[f"{metric}_low"], values[f"{metric}_high"] = wilson_interval(per_sample.sum(),
                                                                                        len(per_sample))
    elapsed = time.perf_counter() - start
    logger.debug("metrics over %d batches, outputs %s: %s", len(reference_batches), names, values)
    return MetricResults(values=values, per_item=per_item, time_s=elapsed)
