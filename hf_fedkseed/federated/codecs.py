"""The codecs of SyncMessage values: int8 accumulators, and seed probabilities as float32 or log_uint8."""

from __future__ import annotations

import math

import numpy as np

from .wire import ProtocolError

__all__ = ["PROBABILITY_ENCODINGS", "SYNC_PRECISIONS", "dequantise_int8", "quantise_int8"]

PROBABILITY_ENCODINGS = ("float32", "log_uint8")
# How a sync carries the accumulators: float32 (the paper's, 4 bytes each) or int8 (1 byte each and one float32
# scale); see docs/protocol.md, "Compact sync".
SYNC_PRECISIONS = ("float32", "int8")

_INT8_LEVELS = 127  # codes in [-127, 127]: symmetric, -128 is never written
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32: the int8 scale never goes below it


def quantise_int8(values: np.ndarray) -> tuple[float, np.ndarray]:
    """Quantise float64 values to one float32 scale and int8 codes: `codes = clamp(rint(values / scale), +-127)`.

    `scale = float32(max|values| / 127)` (raised to the smallest normal float32 `tiny` for tinier values), or 0 when
    every code is zero, so each value is within `max(scale, tiny) / 2` of `codes * scale`. The result is canonical:
    quantising
    `dequantise_int8(scale, codes)` again gives the same scale and codes, which lets a decoder refuse anything an
    encoder would not write.

    Args:
        values: a 1-D float64 array of finite values.

    Returns:
        `(scale, codes)`: a Python float that is exactly a float32, and an int8 array of the values' shape.

    Raises:
        ProtocolError: if `max|values| / 127` overflows float32.

    Example:
        >>> scale, codes = quantise_int8(np.array([0.5, -1.27, 0.0]))
        >>> scale, codes.tolist()
        (0.009999999776482582, [50, -127, 0])
    """
    largest = float(np.abs(values).max()) if values.size else 0.0
    if largest == 0.0:
        return 0.0, np.zeros(values.shape, dtype=np.int8)
    with np.errstate(over="ignore"):
        scale = float(np.float32(largest / _INT8_LEVELS))
    if not math.isfinite(scale):
        raise ProtocolError(f"accumulators up to {largest:.3g} overflow the float32 scale of an int8 sync")
    scale = max(scale, _FLOAT32_TINY)
    codes = np.clip(np.rint(values / scale), -_INT8_LEVELS, _INT8_LEVELS).astype(np.int8)
    if not codes.any():  # values below half the smallest normal float32: all zero, and so is the canonical scale
        return 0.0, codes
    return scale, codes


def dequantise_int8(scale: float, codes: np.ndarray) -> np.ndarray:
    """The float64 values `codes * scale` of `quantise_int8` (exact: an int8 times a float32 fits in a float64).

    Example:
        >>> dequantise_int8(*quantise_int8(np.array([0.5, -1.27, 0.0]))).tolist()
        [0.4999999888241291, -1.269999971613288, 0.0]
    """
    return codes.astype(np.float64) * scale


def _check_int8_codes(scale: float, codes: np.ndarray) -> None:
    """Refuse int8 data that no encoder writes, before dequantising it (the canonical form is checked after)."""
    if not (math.isfinite(scale) and scale >= 0.0):
        raise ProtocolError(f"SyncMessage int8 scale {scale!r} is not a finite number >= 0")
    if codes.size and int(codes.min()) < -_INT8_LEVELS:
        raise ProtocolError("SyncMessage int8 accumulators hold the code -128; codes are in [-127, 127]")


# log_uint8 probabilities: codes 0..254 quantise log(p_max / p_j); 255 marks an exact zero.
_LOG_LEVELS = 254
_ZERO_CODE = 255
_MIN_LOG_RANGE = 1e-6  # below this (a relative spread of 1e-6) the distribution is sent as uniform over its support
_MAX_LOG_RANGE = 100.0  # e^100 between the likeliest and least likely seed; beyond it use float32 probabilities


def _quantise_log_probabilities(probabilities: np.ndarray) -> tuple[float, np.ndarray]:
    """(float32 step, uint8 codes) with `code_j = round(log(p_max / p_j) / step)`, 255 for `p_j == 0`."""
    positive = probabilities > 0
    logs = np.log(probabilities[positive])
    log_max = logs.max()
    log_range = float(log_max - logs.min())
    if log_range > _MAX_LOG_RANGE:
        raise ProtocolError(
            f"SyncMessage `seed_probabilities` spans {log_range:.1f} nats (a ratio of e^{log_range:.0f}); "
            f"log_uint8 handles at most {_MAX_LOG_RANGE:.0f}: use probability_encoding='float32'"
        )
    step = float(np.float32(log_range / _LOG_LEVELS)) if log_range >= _MIN_LOG_RANGE else 0.0
    codes = np.full(probabilities.shape, _ZERO_CODE, dtype=np.uint8)
    if step > 0:
        codes[positive] = np.clip(np.rint((log_max - logs) / step), 0, _LOG_LEVELS).astype(np.uint8)
    else:
        codes[positive] = 0
    return step, codes


def _dequantise_log_probabilities(step: float, codes: np.ndarray) -> np.ndarray:
    weights = np.exp(-codes.astype(np.float64) * step)
    weights[codes == _ZERO_CODE] = 0.0
    return weights / weights.sum()


def _check_log_codes(step: float, codes: np.ndarray) -> tuple[float, np.ndarray]:
    """Refuse log_uint8 data that no encoder writes, before dequantising it."""
    if not (math.isfinite(step) and 0.0 <= step * _LOG_LEVELS <= _MAX_LOG_RANGE * (1 + 1e-6)):
        raise ProtocolError(f"SyncMessage log_uint8 step {step!r} is not a finite number in [0, {_MAX_LOG_RANGE}/254]")
    if not (codes == 0).any():
        raise ProtocolError("SyncMessage log_uint8 probabilities have no code 0 (the likeliest seed); corrupt")
    return step, codes
