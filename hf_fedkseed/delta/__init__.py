"""The KSeed delta: a tuned model as K scalars over its base (save, verify, load from a folder or the Hub, apply)."""

from __future__ import annotations

from .apply import apply_kseed, base_weights_sha256
from .files import (
    DELTA_FORMAT,
    DELTA_FORMAT_VERSION,
    DTYPE_POLICY,
    KSEED_CONFIG_NAME,
    KSEED_DELTA_NAME,
    KSeedDelta,
    load_kseed_delta,
    save_kseed_delta,
)

__all__ = [
    "DELTA_FORMAT",
    "DELTA_FORMAT_VERSION",
    "DTYPE_POLICY",
    "KSEED_CONFIG_NAME",
    "KSEED_DELTA_NAME",
    "KSeedDelta",
    "apply_kseed",
    "base_weights_sha256",
    "load_kseed_delta",
    "save_kseed_delta",
]
