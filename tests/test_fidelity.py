"""Multi-fidelity evaluation: a plan that cannot reach the goal stops after the first batches."""

import numpy as np
import pytest

from precsearch.errors import ConfigError
from precsearch.fidelity.early_stop import evaluate_plan


def _batches(n, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return [{"logits": rng.normal(size=(1, classes)).astype(np.float32)} for _ in range(n)]


class Counting:
    def __init__(self, outputs):
        self.outputs = outputs
        self.seen = 0

    def __call__(self, batches):
        start = self.seen
        self.seen += len(batches)
        return self.outputs[start:start + len(batches)]


def test_identical_plan_runs_everything():
    reference = _batches(10)
    run = Counting(reference)
    result = evaluate_plan(run, reference, [{"x": np.zeros((1, 1))}] * 10, "top1", goal=0.99, first_batches=4)
    assert run.seen == 10 and not result.stopped_early and result.values["top1"] == 1.0


def test_hopeless_plan_stops_after_the_subset():
    reference = _batches(10)
    wrong = [{"logits": -batch["logits"]} for batch in reference]  # top-1 flips on every sample
    run = Counting(wrong)
    result = evaluate_plan(run, reference, [{"x": np.zeros((1, 1))}] * 10, "top1", goal=0.99, first_batches=4)
    assert run.seen == 4 and result.stopped_early and result.batches_used == 4
    assert result.values["top1"] == 0.0


def test_top1_stop_is_exact_not_a_guess():
    # 3 of 4 agree on the subset: 9/10 is still possible, so a 0.9 goal must run everything.
    reference = _batches(10)
    candidate = [dict(batch) for batch in reference]
    candidate[0] = {"logits": -reference[0]["logits"]}
    run = Counting(candidate)
    result = evaluate_plan(run, reference, [{"x": np.zeros((1, 1))}] * 10, "top1", goal=0.9, first_batches=4)
    assert run.seen == 10 and not result.stopped_early and result.values["top1"] == pytest.approx(0.9)


def test_goal_on_the_lower_bound_stops_what_the_value_would_keep():
    # 1 miss in the first 4 of 256: the best case is 255/256 = 0.996 (meets 0.99), but its 95 % lower
    # bound is 0.978, which can never reach 0.99.
    reference = _batches(256)
    candidate = [dict(batch) for batch in reference]
    candidate[0] = {"logits": -reference[0]["logits"]}
    inputs = [{"x": np.zeros((1, 1))}] * 256
    on_value = evaluate_plan(Counting(candidate), reference, inputs, "top1", goal=0.99, first_batches=4)
    assert not on_value.stopped_early and on_value.values["top1"] == pytest.approx(255 / 256)
    assert on_value.values["top1_low"] == pytest.approx(0.9782, abs=1e-4)
    on_bound = evaluate_plan(Counting(candidate), reference, inputs, "top1", goal=0.99, first_batches=4,
                             goal_on="lower_bound")
    assert on_bound.stopped_early and on_bound.batches_used == 4
    exact = evaluate_plan(Counting(reference), reference, inputs, "top1", goal=0.98, goal_on="lower_bound")
    assert not exact.stopped_early and exact.values["top1_low"] == pytest.approx(0.98522, abs=1e-5)
    with pytest.raises(ConfigError, match="'lower_bound' only for the metrics"):
        evaluate_plan(Counting(reference), reference, inputs, "sqnr_db", goal=20.0, goal_on="lower_bound")
    with pytest.raises(ConfigError, match="'goal_on' parameter of evaluate_plan"):
        evaluate_plan(Counting(reference), reference, inputs, "top1", goal=0.9, goal_on="upper")


def test_sqnr_stops_only_beyond_its_margin():
    reference = _batches(8, classes=16)
    noisy = [{"logits": batch["logits"] * 1.5} for batch in reference]  # SQNR = 20*log10(1/0.5) ≈ 6.0 dB
    stopped = evaluate_plan(Counting(noisy), reference, [{}] * 8, "sqnr_db", goal=20.0, first_batches=2)
    assert stopped.stopped_early and stopped.values["sqnr_db"] == pytest.approx(6.02, abs=0.01)
    kept = evaluate_plan(Counting(noisy), reference, [{}] * 8, "sqnr_db", goal=8.0, first_batches=2)
    assert not kept.stopped_early


def test_unknown_metric():
    with pytest.raises(ConfigError, match="'metric'"):
        evaluate_plan(lambda b: b, [{}], [{}], "accuracy")


def test_outputs_of_the_first_batches_are_kept_for_the_cross_check():
    reference = _batches(10)
    run = Counting(reference)
    kept = evaluate_plan(run, reference, [{"x": np.zeros((1, 1))}] * 10, "top1", goal=0.99, first_batches=4, keep=2)
    assert run.seen == 10 and len(kept.outputs) == 2  # kept from the one pass, not run again
    assert all(got is want for got, want in zip(kept.outputs, reference[:2]))
    wrong = [{"logits": -batch["logits"]} for batch in reference]
    stopped = evaluate_plan(Counting(wrong), reference, [{}] * 10, "top1", goal=0.99, first_batches=4, keep=6)
    assert stopped.stopped_early and len(stopped.outputs) == 4  # no more than were run
    assert evaluate_plan(Counting(reference), reference, [{}] * 10, "top1").outputs == ()
