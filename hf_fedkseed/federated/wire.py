"""Framing of the wire messages: header, CRC32, byte readers and writers, field validators (see docs/protocol.md)."""

from __future__ import annotations

import dataclasses
import numbers
import struct
import zlib
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "PROTOCOL_MAGIC",
    "PROTOCOL_VERSION",
    "SYNC_MESSAGE_TYPE",
    "UPDATE_MESSAGE_TYPE",
    "ProtocolError",
    "seed_index_dtype",
]

PROTOCOL_MAGIC = b"KSD"
PROTOCOL_VERSION = 1
SYNC_MESSAGE_TYPE = 1
UPDATE_MESSAGE_TYPE = 2

# magic, version, type, flags: the part every message shares, read before anything else.
_PREFIX = struct.Struct("<3sBBB")
# + num_seeds, server_round and three uint32 fields of the message type (SyncMessage: base_round, num_entries,
# num_scheduled; UpdateMessage: client_id, num_samples, num_steps).
_HEADER = struct.Struct("<3sBBBIIIII")
_CRC = struct.Struct("<I")
_FLOAT32 = struct.Struct("<f")
_UINT32_MAX = 2**32 - 1
_MESSAGE_NAMES = {SYNC_MESSAGE_TYPE: "SyncMessage", UPDATE_MESSAGE_TYPE: "UpdateMessage"}


class ProtocolError(ValueError):
    """A wire message that is malformed, or a message field that cannot be encoded; the text names the problem.

    Example:
        >>> try:
        ...     SyncMessage.decode(b"KSD")
        ... except ProtocolError as error:
        ...     print(error)
        truncated SyncMessage: expected at least 6 bytes, got 3
    """


def seed_index_dtype(num_seeds: int) -> np.dtype:
    """The smallest little-endian unsigned integer type that holds every seed index in `[0, num_seeds)`.

    Raises:
        ProtocolError: if `num_seeds` is not in `[1, 2**32 - 1]`.

    Example:
        >>> seed_index_dtype(4096).itemsize
        2
    """
    num_seeds = _check_uint32(num_seeds, "num_seeds", "message", minimum=1)
    if num_seeds <= 2**8:
        return np.dtype("<u1")
    if num_seeds <= 2**16:
        return np.dtype("<u2")
    return np.dtype("<u4")


# ---------------------------------------------------------------------------------------------------- validation
def _check_uint32(value, name: str, owner: str, *, minimum: int = 0) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not minimum <= value <= _UINT32_MAX:
        raise ProtocolError(f"{owner} `{name}` must be an integer in [{minimum}, 2**32 - 1], got {value!r}")
    return int(value)


def _set_uint32(message, name: str, owner: str, *, minimum: int = 0) -> int:
    """Check the field `name` of the frozen dataclass `message` with `_check_uint32`, store it as an int, return it."""
    value = _check_uint32(getattr(message, name), name, owner, minimum=minimum)
    object.__setattr__(message, name, value)
    return value


def _to_tensor(values, name: str, owner: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(values).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ProtocolError(f"{owner} `{name}` could not be read as a tensor: {error}") from error
    if tensor.ndim != 1:
        raise ProtocolError(f"{owner} `{name}` must be 1-D, got shape {tuple(tensor.shape)}")
    return tensor


def _as_int64_indices(tensor: torch.Tensor) -> torch.Tensor | None:
    """An int64 copy of `tensor`, or None if it holds values of a non-integer dtype (an empty tensor always passes)."""
    if tensor.numel() and (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool):
        return None
    return tensor.to(torch.int64, copy=True)  # `torch.as_tensor([])` is float32


def _first_out_of_range(indices: torch.Tensor, num_seeds: int) -> int | None:
    """The position of the first entry of the 1-D `indices` outside `[0, num_seeds)`, or None."""
    outside = ((indices < 0) | (indices >= num_seeds)).nonzero()
    return int(outside[0, 0]) if outside.numel() else None


def _first_non_finite(values: torch.Tensor) -> int | None:
    """The position of the first NaN or inf of the 1-D `values`, or None."""
    bad = (~torch.isfinite(values)).nonzero()
    return int(bad[0, 0]) if bad.numel() else None


def _check_indices(values, name: str, owner: str, num_seeds: int) -> torch.Tensor:
    """A flat int64 copy of `values`, every entry a seed index in `[0, num_seeds)`."""
    tensor = _to_tensor(values, name, owner)
    indices = _as_int64_indices(tensor)
    if indices is None:
        raise ProtocolError(f"{owner} `{name}` must hold integer seed indices, got dtype {tensor.dtype}")
    position = _first_out_of_range(indices, num_seeds)
    if position is not None:
        raise ProtocolError(
            f"{owner} `{name}` holds seed index {int(indices[position])} at position {position}, out of range: "
            f"indices must be in [0, K={num_seeds})"
        )
    return indices


def _check_values(values, name: str, owner: str, wire_dtype: torch.dtype) -> torch.Tensor:
    """A flat float64 copy of `values` rounded to `wire_dtype`, every entry finite."""
    tensor = _to_tensor(values, name, owner)
    if tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ProtocolError(f"{owner} `{name}` must hold real numbers, got dtype {tensor.dtype}")
    tensor = tensor.to(wire_dtype).to(torch.float64, copy=True)
    position = _first_non_finite(tensor)
    if position is not None:
        raise ProtocolError(
            f"{owner} `{name}` holds a non-finite value ({tensor[position].item()}) at position {position} "
            f"(as {str(wire_dtype).removeprefix('torch.')}); NaN and inf cannot be sent"
        )
    return tensor


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _fields_equal(a, b) -> bool:
    """Whether two messages of one dataclass hold the same fields, tensors compared by dtype, shape and values."""
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not _same(x, y):
                return False
        elif x != y:
            return False
    return True


# ---------------------------------------------------------------------------------------------------- framing
def _frame_length(payload_size: int) -> int:
    """The encoded length of a message whose payload (between the header and the CRC32) has `payload_size` bytes."""
    return _HEADER.size + payload_size + _CRC.size


def _frame(
    message_type: int,
    flags: int,
    num_seeds: int,
    server_round: int,
    fields: tuple[int, int, int],
    payload: Sequence[bytes],
) -> bytes:
    """header | payload | CRC32 of both; `fields` are the header's three uint32 fields of the message type."""
    header = _HEADER.pack(PROTOCOL_MAGIC, PROTOCOL_VERSION, message_type, flags, num_seeds, server_round, *fields)
    body = header + b"".join(payload)
    return body + _CRC.pack(zlib.crc32(body))


def _read_header(data, expected_type: int, known_flags: int) -> tuple[bytes, tuple[int, ...]]:
    """Check magic, version, type and flags; unpack `(flags, num_seeds, server_round, three type fields)`."""
    name = _MESSAGE_NAMES[expected_type]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{name}.decode needs bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _PREFIX.size:
        raise ProtocolError(f"truncated {name}: expected at least {_PREFIX.size} bytes, got {len(data)}")
    magic, version, message_type, _ = _PREFIX.unpack_from(data)
    if magic != PROTOCOL_MAGIC:
        raise ProtocolError(
            f"bad magic in {name}: expected {PROTOCOL_MAGIC!r}, got {magic!r}; not a hf_fedkseed message"
        )
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported {name} version {version}: this hf_fedkseed reads protocol version {PROTOCOL_VERSION}"
        )
    if message_type != expected_type:
        got = _MESSAGE_NAMES.get(message_type, "unknown")
        raise ProtocolError(
            f"wrong message type: expected {name} (type {expected_type}), got type {message_type} ({got})"
        )
    if len(data) < _HEADER.size:
        raise ProtocolError(f"truncated {name}: expected at least {_HEADER.size} header bytes, got {len(data)}")
    _, _, _, flags, *fields = _HEADER.unpack_from(data)
    if flags & ~known_flags:
        raise ProtocolError(f"{name} has unknown flags {flags & ~known_flags:#04x}")
    return data, (flags, *fields)


def _payload_reader(data: bytes, expected: int, name: str) -> _Reader:
    """Check the total length (`expected` bytes) and the CRC32 of `data`; read its payload with the result."""
    if len(data) < expected:
        raise ProtocolError(f"truncated {name}: expected {expected} bytes, got {len(data)}")
    if len(data) > expected:
        raise ProtocolError(f"trailing bytes after {name}: expected {expected} bytes, got {len(data)}")
    (stored,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    computed = zlib.crc32(memoryview(data)[: -_CRC.size])
    if stored != computed:
        raise ProtocolError(f"corrupted {name}: CRC32 mismatch (stored {stored:#010x}, computed {computed:#010x})")
    return _Reader(data, _HEADER.size)


class _Reader:
    """Reads consecutive little-endian arrays out of a length-checked message."""

    def __init__(self, data: bytes, offset: int):
        self.data, self.offset = data, offset

    def array(self, dtype: np.dtype | str, count: int) -> np.ndarray:
        dtype = np.dtype(dtype)
        values = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.offset)
        self.offset += dtype.itemsize * count
        return values.astype(dtype.newbyteorder("="))  # a writable native-order copy

    def float32(self) -> float:
        (value,) = _FLOAT32.unpack_from(self.data, self.offset)
        self.offset += _FLOAT32.size
        return value


def _index_bytes(indices: torch.Tensor, num_seeds: int) -> bytes:
    return indices.numpy().astype(seed_index_dtype(num_seeds)).tobytes()


def _float_bytes(values: torch.Tensor, dtype: str = "<f4") -> bytes:
    return values.numpy().astype(dtype).tobytes()
