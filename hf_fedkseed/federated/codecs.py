"""The codecs of SyncMessage seed probabilities: float32, or log_uint8 (one byte per seed, see docs/protocol.md)."""

from __future__ import annotations

import math

import numpy as np

from .wire import ProtocolError

__all__ = ["PROBABILITY_ENCODINGS"]

PROBABILITY_ENCODINGS = ("float32", "log_uint8")

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
