import logging

import numpy as np
import onnxruntime as ort
import pytest

import models
from precsearch.model.data import image_batches
from precsearch.errors import DataError
from precsearch.fidelity.reference import (
    Agreement,
    agreement,
    max_relative_error,
    ort_session,
    reference_key,
    reference_outputs,
    run_ort,
)
from precsearch.model import load_model


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


@pytest.fixture
def counted_sessions(monkeypatch):
    """Counts every ORT session created from now on."""
    created = []
    real = ort.InferenceSession

    def counting(*args, **kwargs):
        created.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    return created


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return load_model(models.save(models.chain_model(), tmp_path_factory.mktemp("m"), "chain"))


def test_reference_outputs_are_computed_once(chain, tmp_path, counted_sessions):
    batches = image_batches(chain, None, count=3)
    first = reference_outputs(chain, batches, cache_dir=tmp_path)
    assert len(counted_sessions) == 1
    assert [p.name for p in tmp_path.iterdir()] == [f"reference-{reference_key(chain, batches)}.npz"]
    expected = run_ort(chain.proto, batches, optimized=True)
    for got, want in zip(first, expected):
        assert list(got) == ["logits"] and np.array_equal(got["logits"], want["logits"])
    del counted_sessions[:]
    second = reference_outputs(chain, batches, cache_dir=tmp_path)
    assert counted_sessions == []  # loaded from the file: no session at all
    assert all(np.array_equal(a["logits"], b["logits"]) and a["logits"].dtype == b["logits"].dtype for a, b in zip(first, second))
    # Other data, other key, other file.
    other = image_batches(chain, None, count=3, offset=3)
    assert reference_key(chain, other) != reference_key(chain, batches)
    reference_outputs(chain, other, cache_dir=tmp_path)
    assert len(counted_sessions) == 1 and len(list(tmp_path.glob("reference-*.npz"))) == 2
    # Without a cache directory nothing is written.
    assert len(reference_outputs(chain, batches)) == 3


def test_corrupt_reference_cache_is_recomputed_with_a_warning(chain, tmp_path, caplog, counted_sessions):
    batches = image_batches(chain, None, count=2)
    path = tmp_path / f"reference-{reference_key(chain, batches)}.npz"
    expected = reference_outputs(chain, batches, cache_dir=tmp_path)
    good = path.read_bytes()
    short = {"0:0": expected[0]["logits"], "__output_names__": np.array(["logits"])}  # one batch of two
    for corrupt in (lambda: path.write_bytes(b"not an npz"), lambda: path.write_bytes(good[: len(good) // 2]), lambda: np.savez(path, **short)):
        corrupt()
        del counted_sessions[:]
        with caplog.at_level(logging.WARNING, logger="precsearch.fidelity.reference"):
            got = reference_outputs(chain, batches, cache_dir=tmp_path)
        assert f"ignoring the unreadable cache file {path}" in caplog.text and len(counted_sessions) == 1
        assert np.array_equal(got[1]["logits"], expected[1]["logits"])
        caplog.clear()
        # The rewritten file is good again.
        del counted_sessions[:]
        assert np.array_equal(reference_outputs(chain, batches, cache_dir=tmp_path)[1]["logits"], expected[1]["logits"])
        assert counted_sessions == []
    with pytest.raises(DataError, match="at least one batch"):
        reference_outputs(chain, [])
