import numpy as np
import onnxruntime as ort
import pytest

import models
from precsearch.errors import DataError
from precsearch.evaluate import Agreement, agreement, max_relative_error, ort_session, run_ort


def test_agreement_counts_elements_within_one_step():
    reference = [{"a": np.array([0.0, 1.0, 2.0, 3.0]), "b": np.array([[10.0]])}, {"a": np.array([0.0, 0.0, 0.0, 0.0]), "b": np.array([[0.0]])}]
    candidate = [{"a": np.array([0.1, 1.2, 2.0, 3.1]), "b": np.array([[10.5]])}, {"a": np.array([0.0, 0.0, -0.3, 0.0]), "b": np.array([[0.0]])}]
    got = agreement(reference, candidate, {"a": 0.1, "b": 1.0})
    # a: errors 0.1 (ok, exactly one step), 0.2, 0, 0.1 (ok), 0, 0, 0.3, 0 -> 2 bad of 8; b: 0.5, 0 -> ok.
    assert got == Agreement(fraction=8 / 10, max_abs_error=pytest.approx(0.5), max_error_steps=pytest.approx(3.0), elements=10)


def test_agreement_of_identical_outputs_is_perfect():
    outputs = [{"y": np.arange(6, dtype=np.float32).reshape(2, 3)}]
    assert agreement(outputs, outputs, {"y": 1e-8}) == Agreement(1.0, 0.0, 0.0, 6)


def test_agreement_rejects_mismatches():
    ref = [{"y": np.zeros(3)}]
    with pytest.raises(DataError, match="positive step for output 'y'"):
        agreement(ref, ref, {"y": 0.0})
    with pytest.raises(DataError, match="shape"):
        agreement(ref, [{"y": np.zeros(4)}], {"y": 1.0})
    with pytest.raises(DataError, match="1 batches but the candidate has 2"):
        agreement(ref, ref * 2, {"y": 1.0})
    with pytest.raises(DataError, match="outputs"):
        agreement(ref, [{"z": np.zeros(3)}], {"y": 1.0})


def test_max_relative_error():
    reference = [{"a": np.array([1.0, -4.0]), "b": np.array([100.0])}, {"a": np.array([2.0, 0.0]), "b": np.array([50.0])}]
    candidate = [{"a": np.array([1.0, -3.0]), "b": np.array([99.0])}, {"a": np.array([2.5, 0.0]), "b": np.array([50.0])}]
    # a: max error 1.0 over max |ref| 4 -> 0.25; b: 1 / 100 -> 0.01.
    assert max_relative_error(reference, candidate) == pytest.approx(0.25)
    assert max_relative_error([{"z": np.zeros(2)}], [{"z": np.full(2, 1e-13)}]) == pytest.approx(0.1)
    assert max_relative_error(reference, reference) == 0.0


def test_sessions_and_runs():
    proto = models.chain_model()
    reference = ort_session(proto)
    assert isinstance(reference, ort.InferenceSession)
    batches = [{"input": np.random.default_rng(i).normal(size=(1, 8, 16, 16)).astype(np.float32)} for i in range(3)]
    plain = run_ort(proto, batches)
    fast = run_ort(proto, batches, optimized=True)
    assert len(plain) == 3 and set(plain[0]) == {"logits"} and plain[0]["logits"].shape == (1, 10)
    assert not np.array_equal(plain[0]["logits"], plain[1]["logits"])
    assert max_relative_error(plain, fast) < 1e-5
