"""The numbers of an integer conv's requantization, from the QDQ model's scales and zero points.

Pure numpy, no TVM: :class:`~precsearch.tvm._int8_rewrite.Int8ConvRewrite` bakes
these values into constants of the integer chain::

    acc  = conv2d(x_u8, w_s8) + integer_bias          # int32, exact
    y_u8 = clip(round(acc · multiplier[c]) + zy, 0, 255)

which is MLAS's rule (see DESIGN.md): one multiply by ``sx·sw[c]/sy`` per
accumulator, rounded half to even, in floating point rather than a fixed-point
multiplier and shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UINT8_RANGE = (0, 255)
# ORT stores the bias quantized with scale sx·sw[c], rounded to float32.
BIAS_SCALE_RTOL = 1e-5
INT32_LIMIT = 2**31


@dataclass(frozen=True)
class Requantization:
    """Per-output-channel constants of one integer conv."""

    accumulator_scale: np.ndarray  # (C,) float64: sx·sw[c], the real value of one accumulator unit
    multiplier: np.ndarray | None  # (C,) float64: sx·sw[c]/sy, accumulator units → output steps; None: float output
    output_zero_point: int  # zy (0 for a float output)


@dataclass(frozen=True)
class Int8Quantization:
    """One int8 conv's quantization as the QDQ model states it (what a oneDNN int8 primitive is given)."""

    src_scale: float
    src_zero: int
    weight_scales: np.ndarray  # (C,) float64
    bias_q: np.ndarray | None  # (C,) the model's integer bias (scale src_scale·weight_scales), or None
    dst_scale: float | None  # None: the conv's output is dequantized to float (no output quantization)
    dst_zero: int = 0

    def float_bias(self) -> np.ndarray:
        """The bias in real units, float32 (oneDNN adds it after scaling the accumulator)."""
        if self.bias_q is None:
            return np.zeros(self.weight_scales.size, dtype=np.float32)
        scale = np.float32(self.src_scale) * self.weight_scales.astype(np.float32)
        return (self.bias_q.astype(np.float64) * scale).astype(np.float32)


def _positive_scale(value, what: str) -> float:
    scale = float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"the {what} must be a positive finite number; got {scale!r}")
    return scale


def channel_scales(w_scale, out_channels: int) -> np.ndarray:
    """The weight scale of each output channel (float64, shape (C,)); a per-tensor scale is repeated."""
    scales = np.asarray(w_scale, dtype=np.float64).reshape(-1)
    if scales.size == 1:
        scales = np.full(out_channels, scales[0])
    if scales.size != out_channels:
        raise ValueError(f"the weight scale has {scales.size} values for {out_channels} output channels")
    bad = ~np.isfinite(scales) | (scales <= 0)
    if bad.any():
        channel = int(np.flatnonzero(bad)[0])
        raise ValueError(f"the weight scale of channel {channel} must be a positive finite number; "
                         f"got {float(scales[channel])!r}")
    return scales


def _representable(values: np.ndarray, dtype: str, what: str) -> None:
    # A product of tiny scales can underflow to 0, a quotient by one overflow to inf,
    # once the constant is stored in the dtype the graph computes in.
    with np.errstate(over="ignore"):
        stored = values.astype(dtype)
    bad = ~np.isfinite(stored) | (stored == 0)
    if bad.any():
        channel = int(np.flatnonzero(bad)[0])
        raise ValueError(f"the {what} of channel {channel} ({float(values[channel])!r}) is not representable "
                         f"in {dtype}")


def requantization(x_scale, w_scale, out_channels: int, y_scale=None, y_zero_point=0, *,
                   dtype: str = "float64") -> Requantization:
    """The scale constants of one integer conv.

    Parameters
    ----------
    x_scale : float
        Input (activation) scale, per tensor.
    w_scale : float or array
        Weight scale, per tensor or per output channel.
    out_channels : int
    y_scale, y_zero_point : float, int, optional
        Output quantization; None for a conv whose output stays float (it is
        dequantized by ``accumulator_scale``, in float32).
    dtype : {"float64", "float32"}
        What the requantization multiply runs in (``CompileOptions.requant_dtype``).

    Raises
    ------
    ValueError
        For a zero, negative or non-finite scale, a constant that underflows or
        overflows ``dtype``, or an output zero point outside uint8.
    """
    accumulator_scale = _positive_scale(x_scale, "input scale") * channel_scales(w_scale, out_channels)
    if y_scale is None:
        _representable(accumulator_scale, "float32", "input scale × weight scale")
        return Requantization(accumulator_scale, None, 0)
    multiplier = accumulator_scale / _positive_scale(y_scale, "output scale")
    _representable(multiplier, dtype, "requantization multiplier")
    zero_point = int(np.asarray(y_zero_point).reshape(-1)[0])
    if not UINT8_RANGE[0] <= zero_point <= UINT8_RANGE[1]:
        raise ValueError(f"the output zero point must be in [0, 255]; got {zero_point}")
    return Requantization(accumulator_scale, multiplier, zero_point)


def bias_scale_matches(b_scale, x_scale, w_scale) -> bool:
    """Whether the bias was quantized with scale sx·sw[c], so its int32 values add onto the accumulator."""
    b_scale = np.asarray(b_scale, dtype=np.float64).reshape(-1)
    expected = float(x_scale) * np.asarray(w_scale, dtype=np.float64).reshape(-1)
    return bool(np.allclose(b_scale, expected, rtol=BIAS_SCALE_RTOL, atol=0))


def valid_weight_sums(weight: np.ndarray, input_hw: tuple[int, int], output_hw: tuple[int, int],
                      strides, padding, dilation, groups: int) -> np.ndarray:
    """``S[o, y, x]``: sum of the weights of output channel ``o`` that land on real input.

    Written by hand because no library computes it: it is the zero-point
    correction of an asymmetrically quantized input under zero padding.
    """
    out_c, _, kernel_h, kernel_w = weight.shape
    tap_sums = weight.astype(np.int64).sum(axis=1)  # (O, kh, kw): channels of one group
    height, width = input_hw
    out_h, out_w = output_hw
    pad_top, pad_left = int(padding[0]), int(padding[1])
    rows = np.arange(out_h)[:, None] * int(strides[0]) - pad_top + np.arange(kernel_h)[None, :] * int(dilation[0])
    cols = np.arange(out_w)[:, None] * int(strides[1]) - pad_left + np.arange(kernel_w)[None, :] * int(dilation[1])
    row_valid = ((rows >= 0) & (rows < height)).astype(np.int64)  # (OH, kh)
    col_valid = ((cols >= 0) & (cols < width)).astype(np.int64)  # (OW, kw)
    return np.einsum("okl,yk,xl->oyx", tap_sums, row_valid, col_valid)


def integer_bias(out_channels: int, bias_q=None, x_zero_point: int = 0, weight_sums=None) -> np.ndarray:
    """What is added to the int32 accumulator: ``b_q[c] − zx·S[c, y, x]``, int32.

    Shape (1, C, 1, 1) when the correction does not depend on position (no
    padding reaches a weight, or zx = 0), else (1, C, OH, OW).

    Raises
    ------
    OverflowError
        When a value does not fit int32.
    """
    bias = np.zeros((1, out_channels, 1, 1), dtype=np.int64)
    if bias_q is not None:
        bias = bias + np.asarray(bias_q).astype(np.int64).reshape(1, -1, 1, 1)
    if x_zero_point != 0:
        sums = np.asarray(weight_sums, dtype=np.int64)
        if np.all(sums == sums[:, :1, :1]):
            sums = sums[:, :1, :1]  # no border effect: one value per channel
        bias = bias - int(x_zero_point) * sums[None]
    if np.abs(bias).max(initial=0) >= INT32_LIMIT:
        raise OverflowError("bias correction overflows int32")
    return bias.astype(np.int32)


def requantize(accumulator: np.ndarray, multiplier: np.ndarray, zero_point: int, dtype: str = "float64") -> np.ndarray:
    """The output the integer chain computes from biased int32 accumulators (N, C, ...), as numpy does it.

    ``np.rint`` rounds half to even, like the ``nearbyint`` TVM's ``round`` lowers to.
    """
    shape = (1, -1) + (1,) * (accumulator.ndim - 2)
    scaled = np.rint(accumulator.astype(dtype) * np.asarray(multiplier).astype(dtype).reshape(shape))
    return np.clip(scaled + zero_point, *UINT8_RANGE).astype(np.uint8)
