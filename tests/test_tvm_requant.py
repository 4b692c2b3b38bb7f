"""Requantization constants of the integer conv: pure arithmetic, checked against known values."""

from fractions import Fraction

import numpy as np
import pytest

from precsearch.tvm._requant import (bias_scale_matches, channel_scales, integer_bias, requantization, requantize,
                                     valid_weight_sums)


def test_scales_multiply_per_output_channel():
    scales = requantization(0.02, [0.01, 0.005, 0.04], 3, y_scale=0.1, y_zero_point=np.uint8(7))
    np.testing.assert_allclose(scales.accumulator_scale, [2e-4, 1e-4, 8e-4], rtol=1e-15)
    np.testing.assert_allclose(scales.multiplier, [2e-3, 1e-3, 8e-3], rtol=1e-15)
    assert scales.output_zero_point == 7
    assert scales.multiplier.dtype == np.float64 and scales.multiplier.shape == (3,)


def test_a_per_tensor_weight_scale_serves_every_channel():
    np.testing.assert_array_equal(channel_scales(np.float32(0.5), 4), [0.5] * 4)
    scales = requantization(np.array([0.25], np.float32), np.array([0.5], np.float32), 2, y_scale=0.125)
    np.testing.assert_array_equal(scales.multiplier, [1.0, 1.0])


def test_a_float_output_has_only_the_dequantization_scale():
    scales = requantization(0.5, [0.25, 0.125], 2)
    assert scales.multiplier is None and scales.output_zero_point == 0
    np.testing.assert_array_equal(scales.accumulator_scale, [0.125, 0.0625])


def _exact_quantize(acc: int, x_scale: float, w_scale: float, y_scale: float, zero_point: int) -> int:
    """ORT's QuantizeLinear of the dequantized accumulator, in exact rationals, rounding half to even."""
    value = Fraction(acc) * Fraction(x_scale) * Fraction(w_scale) / Fraction(y_scale)
    return min(255, max(0, round(value) + zero_point))  # Fraction rounds half to even


def test_multiplying_by_the_multiplier_rounds_like_dividing_by_the_output_scale():
    rng = np.random.default_rng(0)
    x_scale, y_scale, zero_point = 0.0173, 0.0419, 113
    w_scale = rng.uniform(1e-3, 2e-2, size=4)
    acc = rng.integers(-60000, 60000, size=(1, 4, 8, 8))
    scales = requantization(x_scale, w_scale, 4, y_scale, zero_point)
    got = requantize(acc, scales.multiplier, scales.output_zero_point)
    exact = np.array([[[[_exact_quantize(int(acc[0, c, i, j]), x_scale, w_scale[c], y_scale, zero_point)
                         for j in range(8)] for i in range(8)] for c in range(4)]])
    np.testing.assert_array_equal(got, exact)
    assert got.dtype == np.uint8 and 0 < (got == 255).sum() < got.size  # the clip was exercised, not everything


@pytest.mark.parametrize("dtype, expected", [("float64", [119, 81]), ("float32", [118, 82])])
def test_a_near_tie_rounds_right_in_float64_and_wrong_in_float32(dtype, expected):
    # 37000001 · 5e-7 = 18.5000005: float32 holds neither factor exactly and lands on the tie 18.5
    acc = np.array([37000001, -37000001]).reshape(1, 2)
    got = requantize(acc, np.array([5e-7, 5e-7]), 100, dtype)
    assert got.tolist() == [expected]
    assert [_exact_quantize(int(a), 5e-7, 1.0, 1.0, 100) for a in acc[0]] == [119, 81]


@pytest.mark.parametrize("kwargs, message", [
    (dict(x_scale=0.0), "input scale must be a positive finite number; got 0.0"),
    (dict(x_scale=-0.5), "input scale must be a positive finite number; got -0.5"),
    (dict(x_scale=np.nan), "input scale must be a positive finite number"),
    (dict(y_scale=0.0), "output scale must be a positive finite number; got 0.0"),
    (dict(y_scale=np.inf), "output scale must be a positive finite number; got inf"),
    (dict(w_scale=[0.01, 0.0]), "weight scale of channel 1 must be a positive finite number; got 0.0"),
    (dict(w_scale=[0.01, 0.02, 0.03]), "weight scale has 3 values for 2 output channels"),
    (dict(y_zero_point=300), "output zero point must be in \\[0, 255\\]; got 300"),
])
def test_unusable_scales_are_named(kwargs, message):
    arguments = dict(x_scale=0.02, w_scale=[0.01, 0.02], out_channels=2, y_scale=0.1, y_zero_point=0) | kwargs
    with pytest.raises(ValueError, match=message):
        requantization(**arguments)


def test_tiny_scales_work_until_the_stored_constant_underflows_or_overflows():
    tiny = requantization(1e-20, [1e-20], 1, y_scale=1e-30)
    np.testing.assert_allclose(tiny.multiplier, [1e-10], rtol=1e-12)
    with pytest.raises(ValueError, match="input scale × weight scale of channel 0 .* not representable in float32"):
        requantization(1e-30, [1e-20], 1)  # a float output stores sx·sw in float32: 1e-50 is 0 there
    with pytest.raises(ValueError, match="requantization multiplier of channel 0 .* not representable in float64"):
        requantization(1e-200, [1e-200], 1, y_scale=1.0)
    assert requantization(1.0, [1.0], 1, y_scale=1e-45).multiplier[0] == pytest.approx(1e45)
    with pytest.raises(ValueError, match="not representable in float32"):
        requantization(1.0, [1.0], 1, y_scale=1e-45, dtype="float32")  # beyond float32's 3.4e38


def test_the_bias_scale_must_be_the_product_of_input_and_weight_scales():
    w_scale = np.array([0.01, 0.02])
    assert bias_scale_matches(0.5 * w_scale, 0.5, w_scale)
    assert bias_scale_matches((0.3 * w_scale).astype(np.float32), 0.3, w_scale)  # ORT stores it in float32
    assert not bias_scale_matches(0.5 * w_scale * 1.01, 0.5, w_scale)
    assert not bias_scale_matches([0.005, 0.005], 0.5, w_scale)


def test_valid_weight_sums_count_only_taps_on_real_input():
    weight = np.ones((1, 1, 3, 3), dtype=np.int8)
    sums = valid_weight_sums(weight, (3, 3), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    np.testing.assert_array_equal(sums[0], [[4, 6, 4], [6, 9, 6], [4, 6, 4]])
    unpadded = valid_weight_sums(weight * 2, (5, 5), (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 1)
    np.testing.assert_array_equal(unpadded, np.full((1, 3, 3), 18))


def test_integer_bias_adds_the_bias_and_subtracts_the_zero_point_correction():
    assert integer_bias(3).shape == (1, 3, 1, 1) and not integer_bias(3).any()
    assert integer_bias(2, np.array([5, -7])).reshape(-1).tolist() == [5, -7]
    uniform = np.full((2, 4, 4), 10)
    uniform[1] = 20
    bias = integer_bias(2, np.array([5, -7]), x_zero_point=3, weight_sums=uniform)
    assert bias.shape == (1, 2, 1, 1) and bias.dtype == np.int32  # no border effect: one value per channel
    assert bias.reshape(-1).tolist() == [5 - 30, -7 - 60]
    border = np.array([[[4, 6], [6, 9]]])
    bias = integer_bias(1, None, x_zero_point=2, weight_sums=border)
    assert bias.shape == (1, 1, 2, 2) and bias[0, 0].tolist() == [[-8, -12], [-12, -18]]
    assert integer_bias(1, None, x_zero_point=0, weight_sums=border).shape == (1, 1, 1, 1)  # zx = 0: sums unused


def test_a_bias_that_overflows_int32_is_refused():
    assert integer_bias(1, np.array([2**31 - 1]))[0, 0, 0, 0] == 2**31 - 1
    with pytest.raises(OverflowError, match="overflows int32"):
        integer_bias(1, np.array([2**31 - 1]), x_zero_point=255, weight_sums=np.full((1, 1, 1), -1000))
