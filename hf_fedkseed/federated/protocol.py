"""Compatibility module: re-exports the public names of `messages`, `wire` and `codecs` (see docs/protocol.md)."""

from __future__ import annotations

from .codecs import PROBABILITY_ENCODINGS
from .messages import SYNC_ENCODINGS, SyncMessage, UpdateMessage, decode_message
from .wire import (
    PROTOCOL_MAGIC,
    PROTOCOL_VERSION,
    SYNC_MESSAGE_TYPE,
    UPDATE_MESSAGE_TYPE,
    ProtocolError,
    seed_index_dtype,
)

__all__ = [
    "PROBABILITY_ENCODINGS",
    "PROTOCOL_MAGIC",
    "PROTOCOL_VERSION",
    "SYNC_ENCODINGS",
    "SYNC_MESSAGE_TYPE",
    "UPDATE_MESSAGE_TYPE",
    "ProtocolError",
    "SyncMessage",
    "UpdateMessage",
    "decode_message",
    "seed_index_dtype",
]
