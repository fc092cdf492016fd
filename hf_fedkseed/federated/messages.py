"""The wire messages of a FedKSeed round, `SyncMessage` down and `UpdateMessage` up, and `decode_message`."""

from __future__ import annotations

from .sync_message import SYNC_ENCODINGS, SyncMessage
from .update_message import UpdateMessage
from .wire import _PREFIX, PROTOCOL_MAGIC, SYNC_MESSAGE_TYPE, UPDATE_MESSAGE_TYPE, ProtocolError

__all__ = ["SYNC_ENCODINGS", "SyncMessage", "UpdateMessage", "decode_message"]


def decode_message(data: bytes | bytearray | memoryview) -> SyncMessage | UpdateMessage:
    """Decode either message type, chosen by the type byte of the header.

    Raises:
        ProtocolError: as `SyncMessage.decode` / `UpdateMessage.decode`, or for an unknown message type.

    Example:
        >>> message = decode_message(payload)
        >>> isinstance(message, UpdateMessage)
        True
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"decode_message needs bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _PREFIX.size:
        raise ProtocolError(f"truncated message: expected at least {_PREFIX.size} bytes, got {len(data)}")
    message_type = data[4]
    if message_type == SYNC_MESSAGE_TYPE:
        return SyncMessage.decode(data)
    if message_type == UPDATE_MESSAGE_TYPE:
        return UpdateMessage.decode(data)
    if data[:3] != PROTOCOL_MAGIC:
        raise ProtocolError(f"bad magic: expected {PROTOCOL_MAGIC!r}, got {data[:3]!r}; not a hf_fedkseed message")
    raise ProtocolError(f"wrong message type: {message_type} is neither SyncMessage (1) nor UpdateMessage (2)")
