import math

import numpy as np
import pytest

from precsearch.errors import ConfigError, DataError
from precsearch.fidelity.metrics import (
    METRICS,
    MetricResults,
    compute_metrics,
    cosine_similarity,
    default_eval_batches,
    default_metric,
    is_classifier_output,
    kl_divergence,
    max_abs_error,
    normalized_mse,
    sqnr_db,
    top1_agreement,
    topk_agreement,
    validate_metric,
    wilson_interval,
)


def _all(ref, cand):
    return {
        "top1": top1_agreement(ref, cand),
        "cosine": cosine_similarity(ref, cand),
        "sqnr_db": sqnr_db(ref, cand),
        "nmse": normalized_mse(ref, cand),
        "max_abs_error": max_abs_error(ref, cand),
    }


def test_identical_inputs_are_perfect():
    ref = np.array([[1.0, -2.0, 3.0], [0.5, 0.25, -4.0]], np.float32)
    assert _all(ref, ref.copy()) == {"top1": 1.0, "cosine": 1.0, "sqnr_db": math.inf, "nmse": 0.0, "max_abs_error": 0.0}


def test_orthogonal_opposite_and_close_vectors_by_hand():
    # Orthogonal: signal 1, noise 2.
    assert _all([[1.0, 0.0]], [[0.0, 1.0]]) == pytest.approx(
        {"top1": 0.0, "cosine": 0.0, "sqnr_db": 10 * math.log10(0.5), "nmse": 2.0, "max_abs_error": 1.0}
    )
    # Opposite: signal 5, noise (2**2 + 4**2) = 20.
    assert _all([[1.0, 2.0]], [[-1.0, -2.0]]) == pytest.approx(
        {"top1": 0.0, "cosine": -1.0, "sqnr_db": 10 * math.log10(0.25), "nmse": 4.0, "max_abs_error": 4.0}
    )
    # Close: signal 25, noise 1, cosine (9 + 20) / (5 * sqrt(34)).
    assert _all([[3.0, 4.0]], [[3.0, 5.0]]) == pytest.approx(
        {"top1": 1.0, "cosine": 29 / (5 * math.sqrt(34)), "sqnr_db": 10 * math.log10(25), "nmse": 0.04, "max_abs_error": 1.0}
    )


def test_cosine_is_a_mean_over_samples_and_sqnr_is_over_all_elements():
    ref = np.array([[1.0, 0.0], [0.0, 2.0]])
    cand = np.array([[1.0, 0.0], [2.0, 0.0]])  # sample 0 exact, sample 1 orthogonal
    assert cosine_similarity(ref, cand) == pytest.approx(0.5)
    # signal 1 + 4 = 5, noise 0 + (4 + 4) = 8.
    assert sqnr_db(ref, cand) == pytest.approx(10 * math.log10(5 / 8))
    assert normalized_mse(ref, cand) == pytest.approx(8 / 5)


def test_zero_cases():
    zero = np.zeros((1, 3))
    one = np.array([[0.0, 1.0, 0.0]])
    assert cosine_similarity(zero, zero) == 1.0 and cosine_similarity(zero, one) == 0.0 and cosine_similarity(one, zero) == 0.0
    assert sqnr_db(zero, zero) == math.inf and normalized_mse(zero, zero) == 0.0
    assert sqnr_db(zero, one) == -math.inf and normalized_mse(zero, one) == math.inf
    assert sqnr_db(one, zero) == pytest.approx(0.0) and normalized_mse(one, zero) == pytest.approx(1.0)


def test_topk_ties_and_clipping():
    ref = np.array([[0.1, 0.5, 0.4]])  # reference class 1
    # Equal candidate scores go to the lower index: class 0 ranks above class 1.
    tie = np.array([[0.5, 0.5, 0.0]])
    assert top1_agreement(ref, tie) == 0.0 and topk_agreement(ref, tie, k=2) == 1.0
    flat = np.full((1, 3), 0.3)
    assert top1_agreement(ref, flat) == 0.0 and topk_agreement(ref, flat, k=2) == 1.0
    assert top1_agreement([[0.3, 0.3, 0.3]], flat) == 1.0  # reference ties go to the lowest index too
    # k is clipped to the number of classes: with 3 classes, top-5 always agrees.
    assert topk_agreement(ref, [[9.0, 8.0, -1.0]], k=5) == 1.0
    with pytest.raises(ConfigError, match=r"The 'k' parameter of topk_agreement must be an int >= 1; got 0 instead"):
        topk_agreement(ref, ref, k=0)


def test_topk_over_a_batch():
    ref = np.array([[5, 1, 0, 0, 0], [0, 5, 1, 0, 0], [0, 0, 5, 1, 0], [1, 0, 0, 0, 5]], float)
    cand = np.array([[5, 1, 0, 0, 0], [9, 1, 8, 0, 0], [0, 9, 8, 7, 0], [1, 0, 0, 0, 0]], float)
    # Ranks of the reference class in the candidate: 0, 2, 1, 4 (the last sample's class 4 scores 0: one class
    # scores higher and three equal ones have lower indices).
    assert top1_agreement(ref, cand) == 0.25
    assert topk_agreement(ref, cand, k=2) == 0.5
    assert topk_agreement(ref, cand, k=3) == 0.75
    assert topk_agreement(ref, cand, k=5) == 1.0
    # (batch, classes, 1, 1) outputs are flattened to (batch, classes).
    assert top1_agreement(ref[:, :, None, None], cand[:, :, None, None]) == 0.25


def test_non_finite_candidate_gets_the_worst_value():
    ref = np.array([[1.0, 2.0], [3.0, 4.0]])
    for bad in (np.nan, np.inf, -np.inf):
        cand = ref.copy()
        cand[1, 0] = bad
        got = _all(ref, cand)
        assert got["top1"] == 0.5  # sample 0 agrees, sample 1 is a miss
        assert got["cosine"] == pytest.approx((1.0 + -1.0) / 2)
        assert got["sqnr_db"] == -math.inf and got["nmse"] == math.inf and got["max_abs_error"] == math.inf
    with pytest.raises(DataError, match="reference holds 1 non-finite"):
        sqnr_db([[np.nan, 1.0]], [[0.0, 1.0]])


def test_shape_mismatch_and_empty_arrays():
    with pytest.raises(DataError, match=r"reference's shape \(1, 2\); got \(1, 3\)"):
        cosine_similarity(np.zeros((1, 2)), np.zeros((1, 3)))
    with pytest.raises(DataError, match="no elements"):
        sqnr_db(np.zeros((0, 2)), np.zeros((0, 2)))


def test_is_classifier_output_and_default_metric():
    assert is_classifier_output((1, 10)) and is_classifier_output((4, 2)) and is_classifier_output((1, 1000, 1, 1))
    assert not is_classifier_output((1, 1)) and not is_classifier_output((1, 16, 8, 8)) and not is_classifier_output((10,))
    assert default_metric({"logits": (1, 10), "feat": (1, 8, 4, 4)}) == "top1"
    assert default_metric([(1, 8, 4, 4), (1, 10)]) == "sqnr_db"
    with pytest.raises(ConfigError, match="at least one shape"):
        default_metric({})


def test_validate_metric():
    assert set(METRICS) == {"top1", "top5", "cosine", "sqnr_db", "nmse", "max_abs_error", "kl_div"}
    assert METRICS["sqnr_db"][1] is True and METRICS["nmse"][1] is False
    assert validate_metric("cosine") == "cosine"
    with pytest.raises(ConfigError, match=r"The 'metric' parameter must be one of \['cosine', .*\]; got 'acc' instead"):
        validate_metric("acc")
    with pytest.raises(ConfigError, match=r"needs a classifier main output .* got shape \(1, 8, 4, 4\)"):
        validate_metric("top1", (1, 8, 4, 4))
    with pytest.raises(ConfigError, match="needs a classifier main output"):
        validate_metric("kl_div", (1, 8, 4, 4))
    assert METRICS["top5"][0]([[0, 1, 2, 3, 4, 5, 6]], [[6, 5, 4, 3, 2, 1, 0]]) == 0.0


def test_compute_metrics_over_batches_and_outputs():
    reference = [
        {"logits": np.array([[1.0, 0.0, 0.0]]), "feat": np.ones((1, 2, 2, 2))},
        {"logits": np.array([[0.0, 2.0, 0.0]]), "feat": np.zeros((1, 2, 2, 2))},
    ]
    candidate = [
        {"logits": np.array([[1.0, 0.0, 0.0]]), "feat": np.ones((1, 2, 2, 2))},
        {"logits": np.array([[2.0, 0.0, 0.0]]), "feat": np.full((1, 2, 2, 2), 0.5)},
    ]
    got = compute_metrics(reference, candidate)
    assert isinstance(got, MetricResults) and got.time_s >= 0
    # Main output = first output ("logits"): sample 0 exact, sample 1 orthogonal.
    assert got.values["top1"] == got.values["top1/logits"] == 0.5
    assert got.values["cosine"] == pytest.approx(0.5)
    assert got.values["sqnr_db"] == pytest.approx(10 * math.log10(5 / 8))  # signal 1 + 4, noise 4 + 4
    # feat: not a classifier output, so no top-k; signal 8, noise 8 * 0.25; cosine 1 then 0 (zero reference).
    assert "top1/feat" not in got.values and "top5/feat" not in got.values
    assert got.values["sqnr_db/feat"] == pytest.approx(10 * math.log10(4))
    assert got.values["nmse/feat"] == pytest.approx(0.25)
    assert got.values["cosine/feat"] == pytest.approx(0.5)
    assert got.values["max_abs_error/feat"] == 0.5
    assert got.per_item["top1"] == [1.0, 0.0]
    assert got.per_item["sqnr_db"][0] == math.inf and got.per_item["sqnr_db"][1] == pytest.approx(10 * math.log10(4 / 8))
    assert set(got.per_item) == {"top1", "top5", "cosine", "sqnr_db", "nmse", "max_abs_error", "kl_div"}
    # 1 of 2 agree: the 95 % Wilson interval of 0.5 over two samples.
    assert (got.values["top1_low"], got.values["top1_high"]) == pytest.approx((0.0945, 0.9055), abs=1e-4)
    assert "kl_div/feat" not in got.values and got.per_item["kl_div"][0] == 0.0
    # Choosing the outputs picks the main one.
    feat_first = compute_metrics(reference, candidate, outputs=["feat"])
    assert feat_first.values["sqnr_db"] == got.values["sqnr_db/feat"] and "top1" not in feat_first.values
    assert feat_first.per_item["cosine"] == pytest.approx([1.0, 0.0])


def test_compute_metrics_rejects_mismatches():
    ref = [{"y": np.zeros((1, 3))}]
    with pytest.raises(DataError, match="1 batches but the candidate has 2"):
        compute_metrics(ref, ref * 2)
    with pytest.raises(DataError, match=r"outputs \['y'\] are missing from the candidate"):
        compute_metrics(ref, [{"z": np.zeros((1, 3))}])
    with pytest.raises(DataError, match="Output 'y': reference shape"):
        compute_metrics(ref, [{"y": np.zeros((1, 4))}])
    with pytest.raises(DataError, match="Output 'y': The reference holds 1 non-finite"):
        compute_metrics([{"y": np.array([[np.inf, 0.0]])}], [{"y": np.zeros((1, 2))}])
    with pytest.raises(DataError, match="holds no batch"):
        compute_metrics([], [])


def test_wilson_interval_by_hand():
    # 32 of 32 agree: the interval of "all agree" is not a point, its lower bound is 0.893.
    assert wilson_interval(32, 32) == pytest.approx((0.8928, 1.0), abs=1e-4)
    assert wilson_interval(256, 256)[0] == pytest.approx(0.98522, abs=1e-5)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    with pytest.raises(ConfigError, match="'samples' parameter of wilson_interval"):
        wilson_interval(0, 0)


def test_kl_divergence_of_logits_and_of_probabilities():
    # p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2.
    expected = 0.5 * math.log(2 / 3) + 0.5 * math.log(2)
    assert kl_divergence([[0.0, 0.0]], [[math.log(3), 0.0]]) == pytest.approx(expected)
    assert kl_divergence([[0.5, 0.5]], [[0.75, 0.25]]) == pytest.approx(expected)  # probabilities as they are
    assert kl_divergence([[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]]) == 0.0
    # A mean over samples, continuous where top-1 is a step: same argmax, growing divergence.
    closer, farther = kl_divergence([[2.0, 0.0]], [[1.5, 0.0]]), kl_divergence([[2.0, 0.0]], [[0.5, 0.0]])
    assert 0 < closer < farther and top1_agreement([[2.0, 0.0]], [[0.5, 0.0]]) == 1.0
    assert kl_divergence([[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [math.nan, 0.0]]) == math.inf
    assert METRICS["kl_div"][1] is False


def test_default_evaluation_set_sizes():
    assert default_eval_batches("top1", 1) == 256 and default_eval_batches("top5", 8) == 32
    assert default_eval_batches("top1", 3) == 86  # at least 256 samples
    assert default_eval_batches("sqnr_db", 1) == 32 == default_eval_batches("cosine", 4)
