"""The versioned, length-checked binary wire messages of a FedKSeed round: `SyncMessage` down, `UpdateMessage` up.

Layout (every integer and float little-endian, no pickle, nothing but `struct` and numpy buffers):

    SyncMessage   = header(26) | [sparse indices] | accumulator values | [probabilities] | [seed schedule] | crc32(4)
    UpdateMessage = header(26) | seed indices | scalars or projected grads | [learning rate(s)] | crc32(4)
    header        = magic b"KSD" | version u8 | type u8 | flags u8 | K u32 | round u32 | three u32 fields per type

Seed indices travel in the smallest unsigned type that holds K (`seed_index_dtype`: uint8 for K <= 256, uint16 for
K <= 65536, else uint32), values as float32 (SyncMessage accumulators may opt into float64). `decode` checks, in this
order, the magic, the version, the message type, the flags, the exact total length announced by the header (so a
truncated message or trailing bytes are named as such), the CRC32 of everything before it, and then the content
(indices in `[0, K)`, finite values); every failure raises `ProtocolError` (a `ValueError`) naming the problem.

Agreement. A message holds exactly what its receiver will see: the constructor rounds values to their wire type, so
`SyncMessage.decode(m.encode()) == m` for every message `m`. The accumulators live in float64 on the server, but the
default wire type is float32 (that is what meets the paper's byte budget), so the client's model is
`w0 - sum_j float32(A_j) z_j`. The client must apply exactly the decoded values, and a server that wants to
reconstruct the very model a client holds uses `message.accumulator_values` (or `apply_to`), not its own float64
accumulators; `value_dtype=torch.float64` sends the accumulators exactly at 8 bytes each. A sparse SyncMessage
carries the *new values* of the accumulators that changed since the client's last sync (not differences), so a
client that applies it holds bit-for-bit what a full sync would have given it.

FedKSeed-Pro. The client samples its seeds from the server's probabilities, a softmax over min-max normalised
importances, so every probability moves whenever any importance moves, and a delta of probabilities is no cheaper
than the full vector. Three exact-or-bounded ways to carry them, measured with `message_bytes_report` at K = 4096,
tau = 200 (full accumulators down, a constant learning rate):

    encoding                                        down     up   total   fidelity
    FedKSeed (no probabilities)                   16,414  1,230  17,644   -
    Pro, seed schedule (default, tau x uint16)    16,814  1,234  18,048   exact draws from the float64 distribution
    Pro, log_uint8 probabilities (K bytes + 4)    20,514  1,234  21,748   each p_j within a factor e^step, step <= 1/254
    Pro, float32 probabilities (K x 4 bytes)      32,798  1,234  34,032   float32 rounding of p_j (6e-8 relative)

The default for Pro is the *seed schedule*: the server draws the client's tau seed indices itself, from the exact
float64 probabilities with a seeded generator, and sends them (`seed_schedule`); the client uses them in order
instead of sampling. The draws have exactly the distribution FedKSeed-Pro prescribes and cost tau index bytes,
independent of K, so Pro fits in 18,432 bytes; the server can also check that an update's seed indices are the ones
it scheduled. Its limit: the client runs at most that many steps per round. Where
the client must sample itself, `probability_encoding="log_uint8"` sends one byte per seed: the log-probability
relative to the most likely seed, quantised to 254 levels over the log-range (code 255 marks an exact zero); each
decoded probability is within a factor `e^step` of the sent one (`step = log-range / 254`), and Pro's log-range is
at most 1 nat (its softmax inputs lie in [0, 1]), so the error is below 0.4% (measured 0.2% on the report's
distribution, against 6e-8 for float32). The three can be combined. A sparse sync costs 6 bytes per changed seed at
K = 4096 (uint16 + float32), so `build` takes it below 2,731 changed seeds: 1,000 changed give a 6,030-byte sync.

The UpdateMessage of FedKSeed carries `scalars = lr_t * g_t` (what the step added to `A_j`) as float32. Pro also
needs each step's projected gradient g_t for the importance, and with a learning-rate schedule `lr_t * g_t` does not
give `g_t` back, so a Pro update carries `projected_grads` as float32 plus the learning rate: one float32 when it
is constant over the round (+4 bytes), one per step when it varies (+4 bytes x tau: the Pro round above then costs
18,844 bytes, up 2,030). The server then takes `scalars = float64(lr_t) * float64(g_t)`, an exact product of two
float32 values, so the sender and every receiver agree bit for bit. `UpdateMessage` has the fields of the server's
`ClientUpdate` (`client_id`, `num_samples`, `seed_indices`, `scalars`, `projected_grads`), so a decoded one can be
aggregated as is.
"""

from __future__ import annotations

import math
import numbers
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

PROTOCOL_MAGIC = b"KSD"
PROTOCOL_VERSION = 1
SYNC_MESSAGE_TYPE = 1
UPDATE_MESSAGE_TYPE = 2
PROBABILITY_ENCODINGS = ("float32", "log_uint8")
SYNC_ENCODINGS = ("auto", "full", "sparse")

# magic, version, type, flags: the part every message shares, read before anything else.
_PREFIX = struct.Struct("<3sBBB")
# + num_seeds, server_round, base_round, num_entries (accumulator values), num_scheduled (seed schedule length)
_SYNC_HEADER = struct.Struct("<3sBBBIIIII")
# + num_seeds, server_round, client_id, num_samples, num_steps
_UPDATE_HEADER = struct.Struct("<3sBBBIIIII")
_CRC = struct.Struct("<I")
_FLOAT32 = struct.Struct("<f")
_UINT32_MAX = 2**32 - 1
_MESSAGE_NAMES = {SYNC_MESSAGE_TYPE: "SyncMessage", UPDATE_MESSAGE_TYPE: "UpdateMessage"}

# SyncMessage flags
_SYNC_SPARSE = 0x01  # accumulator values come with their indices (new values of the changed entries only)
_SYNC_FLOAT64 = 0x02  # accumulator values are float64 instead of float32
_SYNC_PROBABILITIES = 0x04  # K seed probabilities follow the accumulators
_SYNC_LOG_UINT8 = 0x08  # ... encoded as a float32 log step and K uint8 codes instead of K float32
_SYNC_SCHEDULE = 0x10  # the client's seed indices for its local steps follow
_SYNC_FLAGS = _SYNC_SPARSE | _SYNC_FLOAT64 | _SYNC_PROBABILITIES | _SYNC_LOG_UINT8 | _SYNC_SCHEDULE

# UpdateMessage flags
_UPDATE_PROJECTED_GRADS = 0x01  # values are g_t (with learning rates), not lr_t * g_t
_UPDATE_PER_STEP_LR = 0x02  # one learning rate per step instead of one for the message
_UPDATE_FLAGS = _UPDATE_PROJECTED_GRADS | _UPDATE_PER_STEP_LR

# log_uint8 probabilities: codes 0..254 quantise log(p_max / p_j); 255 marks an exact zero.
_LOG_LEVELS = 254
_ZERO_CODE = 255
_MIN_LOG_RANGE = 1e-6  # below this (a relative spread of 1e-6) the distribution is sent as uniform over its support
_MAX_LOG_RANGE = 100.0  # e^100 between the likeliest and least likely seed; beyond it use float32 probabilities


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


def _to_tensor(values, name: str, owner: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(values).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ProtocolError(f"{owner} `{name}` could not be read as a tensor: {error}") from error
    if tensor.ndim != 1:
        raise ProtocolError(f"{owner} `{name}` must be 1-D, got shape {tuple(tensor.shape)}")
    return tensor


def _check_indices(values, name: str, owner: str, num_seeds: int) -> torch.Tensor:
    """A flat int64 copy of `values`, every entry a seed index in `[0, num_seeds)`."""
    tensor = _to_tensor(values, name, owner)
    if tensor.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)  # `torch.as_tensor([])` is float32
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ProtocolError(f"{owner} `{name}` must hold integer seed indices, got dtype {tensor.dtype}")
    tensor = tensor.to(torch.int64, copy=True)
    outside = ((tensor < 0) | (tensor >= num_seeds)).nonzero()
    if outside.numel():
        position = int(outside[0, 0])
        raise ProtocolError(
            f"{owner} `{name}` holds seed index {int(tensor[position])} at position {position}, out of range: "
            f"indices must be in [0, K={num_seeds})"
        )
    return tensor


def _check_values(values, name: str, owner: str, wire_dtype: torch.dtype) -> torch.Tensor:
    """A flat float64 copy of `values` rounded to `wire_dtype`, every entry finite."""
    tensor = _to_tensor(values, name, owner)
    if tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ProtocolError(f"{owner} `{name}` must hold real numbers, got dtype {tensor.dtype}")
    tensor = tensor.to(wire_dtype).to(torch.float64, copy=True)
    bad = (~torch.isfinite(tensor)).nonzero()
    if bad.numel():
        position = int(bad[0, 0])
        raise ProtocolError(
            f"{owner} `{name}` holds a non-finite value ({tensor[position].item()}) at position {position} "
            f"(as {str(wire_dtype).removeprefix('torch.')}); NaN and inf cannot be sent"
        )
    return tensor


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------- log_uint8
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


# ---------------------------------------------------------------------------------------------------- wire helpers
def _read_header(data, expected_type: int, header: struct.Struct) -> tuple[bytes, tuple]:
    """Check magic, version and type, and unpack the type's fixed header."""
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
    if len(data) < header.size:
        raise ProtocolError(f"truncated {name}: expected at least {header.size} header bytes, got {len(data)}")
    return data, header.unpack_from(data)


def _check_length_and_crc(data: bytes, expected: int, name: str) -> None:
    if len(data) < expected:
        raise ProtocolError(f"truncated {name}: expected {expected} bytes, got {len(data)}")
    if len(data) > expected:
        raise ProtocolError(f"trailing bytes after {name}: expected {expected} bytes, got {len(data)}")
    (stored,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    computed = zlib.crc32(memoryview(data)[: -_CRC.size])
    if stored != computed:
        raise ProtocolError(f"corrupted {name}: CRC32 mismatch (stored {stored:#010x}, computed {computed:#010x})")


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


def _finish(body: bytes) -> bytes:
    return body + _CRC.pack(zlib.crc32(body))


def _sync_length(flags: int, num_seeds: int, num_entries: int, num_scheduled: int) -> int:
    """The exact encoded length of a SyncMessage, from the fields its header announces."""
    index_size = seed_index_dtype(num_seeds).itemsize
    value_size = 8 if flags & _SYNC_FLOAT64 else 4
    length = _SYNC_HEADER.size + num_entries * value_size + num_scheduled * index_size + _CRC.size
    if flags & _SYNC_SPARSE:
        length += num_entries * index_size
    if flags & _SYNC_PROBABILITIES:
        length += _FLOAT32.size + num_seeds if flags & _SYNC_LOG_UINT8 else 4 * num_seeds
    return length


def _update_length(flags: int, num_seeds: int, num_steps: int) -> int:
    """The exact encoded length of an UpdateMessage, from the fields its header announces."""
    length = _UPDATE_HEADER.size + num_steps * (seed_index_dtype(num_seeds).itemsize + 4) + _CRC.size
    if flags & _UPDATE_PROJECTED_GRADS:
        length += 4 * num_steps if flags & _UPDATE_PER_STEP_LR else 4
    return length


# ---------------------------------------------------------------------------------------------------- SyncMessage
@dataclass(frozen=True, eq=False)
class SyncMessage:
    """Server -> client: the accumulators the client's model is built from, and optional FedKSeed-Pro data.

    The client's model after the sync is `w0 - sum_j A_j z_j` with `A = message.apply_to(cached_accumulators)`.
    The constructor rounds every value to its wire type, so the message holds exactly what the client will decode.

    Args:
        server_round: the round this sync opens (uint32).
        num_seeds: K, the size of the candidate seed pool.
        accumulator_values: all K accumulators (full form), or the new values of the changed ones (sparse form).
        accumulator_indices: None for the full form; for the sparse form the ascending seed indices whose
            accumulators changed since the client's sync at `base_round` (the values replace, not add).
        base_round: the round of the client's last sync that a sparse message builds on; None for the full form.
        value_dtype: the wire type of the accumulators, torch.float32 (default, 4 bytes each) or torch.float64.
        seed_probabilities: FedKSeed-Pro sampling distribution over the K seeds (non-negative, finite, not all
            zero), or None.
        probability_encoding: "float32" (4 bytes per seed, float32 rounding) or "log_uint8" (1 byte per seed,
            each probability within a factor `e^step` of the original, see the module docstring).
        seed_schedule: FedKSeed-Pro's cheaper alternative: the seed indices the client uses for its local steps, in
            order, drawn by the server from the Pro distribution; or None.

    Raises:
        ProtocolError: for a field out of range (a seed index >= K, a non-finite value, a full form whose length is
            not K, unsorted or repeated sparse indices, a sparse form without `base_round`, ...).

    Example:
        >>> message = SyncMessage.build(server_round=3, accumulators=server.accumulators)
        >>> payload = message.encode()  # 16,414 bytes for K = 4096
        >>> received = SyncMessage.decode(payload)
        >>> accumulators = received.apply_to(None)  # float64 tensor of the float32 values the server sent
    """

    server_round: int
    num_seeds: int
    accumulator_values: torch.Tensor
    accumulator_indices: torch.Tensor | None = None
    base_round: int | None = None
    value_dtype: torch.dtype = torch.float32
    seed_probabilities: torch.Tensor | None = None
    probability_encoding: Literal["float32", "log_uint8"] = "float32"
    seed_schedule: torch.Tensor | None = None

    message_type: ClassVar[int] = SYNC_MESSAGE_TYPE

    def __post_init__(self) -> None:
        owner = "SyncMessage"
        set_field = object.__setattr__  # the dataclass is frozen; normalise the fields once, here
        set_field(self, "server_round", _check_uint32(self.server_round, "server_round", owner))
        num_seeds = _check_uint32(self.num_seeds, "num_seeds", owner, minimum=1)
        set_field(self, "num_seeds", num_seeds)
        if self.value_dtype not in (torch.float32, torch.float64):
            raise ProtocolError(f"{owner} `value_dtype` must be torch.float32 or torch.float64, got {self.value_dtype}")
        values = _check_values(self.accumulator_values, "accumulator_values", owner, self.value_dtype)
        set_field(self, "accumulator_values", values)
        if self.accumulator_indices is None:
            if values.numel() != num_seeds:
                raise ProtocolError(
                    f"{owner} carries {values.numel()} accumulators in full form but K is {num_seeds}; pass "
                    "`accumulator_indices` for a sparse message"
                )
            if self.base_round is not None:
                raise ProtocolError(f"{owner} `base_round` is only for sparse messages; a full message replaces all")
        else:
            indices = _check_indices(self.accumulator_indices, "accumulator_indices", owner, num_seeds)
            if indices.numel() != values.numel():
                raise ProtocolError(
                    f"{owner} has {indices.numel()} accumulator indices but {values.numel()} values; one each"
                )
            if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
                raise ProtocolError(f"{owner} `accumulator_indices` must be strictly ascending (sorted, no repeats)")
            set_field(self, "accumulator_indices", indices)
            if self.base_round is None:
                raise ProtocolError(f"{owner} is sparse, so it needs `base_round`: the round of the client's last sync")
            set_field(self, "base_round", _check_uint32(self.base_round, "base_round", owner))
        if self.probability_encoding not in PROBABILITY_ENCODINGS:
            raise ProtocolError(
                f"{owner} `probability_encoding` must be one of {PROBABILITY_ENCODINGS}, "
                f"got {self.probability_encoding!r}"
            )
        wire_probabilities = None
        if self.seed_probabilities is not None:
            probabilities = _check_values(self.seed_probabilities, "seed_probabilities", owner, torch.float64)
            if probabilities.numel() != num_seeds:
                raise ProtocolError(
                    f"{owner} `seed_probabilities` has {probabilities.numel()} entries; it needs one per seed "
                    f"(K={num_seeds})"
                )
            if self.probability_encoding == "float32":
                probabilities = probabilities.to(torch.float32).to(torch.float64)
            if bool((probabilities < 0).any()) or probabilities.sum().item() <= 0:
                raise ProtocolError(
                    f"{owner} `seed_probabilities` must be non-negative with a positive sum (after float32 rounding)"
                )
            if self.probability_encoding == "log_uint8":
                wire_probabilities = _quantise_log_probabilities(probabilities.numpy())
                probabilities = torch.from_numpy(_dequantise_log_probabilities(*wire_probabilities))
            set_field(self, "seed_probabilities", probabilities)
        set_field(self, "_wire_probabilities", wire_probabilities)
        if self.seed_schedule is not None:
            schedule = _check_indices(self.seed_schedule, "seed_schedule", owner, num_seeds)
            _check_uint32(schedule.numel(), "seed_schedule length", owner)
            set_field(self, "seed_schedule", schedule)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        *,
        server_round: int,
        accumulators: torch.Tensor | Sequence[float],
        changed_indices: torch.Tensor | Sequence[int] | None = None,
        base_round: int | None = None,
        encoding: Literal["auto", "full", "sparse"] = "auto",
        value_dtype: torch.dtype = torch.float32,
        seed_probabilities: torch.Tensor | None = None,
        probability_encoding: Literal["float32", "log_uint8"] = "float32",
        seed_schedule: torch.Tensor | Sequence[int] | None = None,
    ) -> SyncMessage:
        """Build the sync for one client from the server's K accumulators, in full or sparse form.

        Args:
            server_round: the round this sync opens.
            accumulators: the server's K accumulators (float64 on the server).
            changed_indices: the seed indices whose accumulators changed since the client's sync at `base_round`
                (for example `server.delta_since(...).indices`, or the seeds whose last-change round is above
                `base_round`); None when the client has no usable copy.
            base_round: the round of the client's last sync; without it the full form is sent.
            encoding: "auto" takes the sparse form when `changed_indices` is given and it is smaller, "full" always
                sends K values, "sparse" always sends the changed ones.
            value_dtype, seed_probabilities, probability_encoding, seed_schedule: as in `SyncMessage`.

        Raises:
            ValueError: for an unknown `encoding`, or "sparse" without `changed_indices` and `base_round`.
            ProtocolError: for values the message cannot carry (see `SyncMessage`).

        Example:
            >>> message = SyncMessage.build(server_round=7, accumulators=acc, changed_indices=idx, base_round=5)
            >>> message.accumulator_indices is None  # True when the full vector was the smaller encoding
        """
        if encoding not in SYNC_ENCODINGS:
            raise ValueError(f"Invalid `encoding`: {encoding!r}; choose one of {SYNC_ENCODINGS}.")
        accumulators = _to_tensor(accumulators, "accumulators", "SyncMessage.build")
        num_seeds = accumulators.numel()
        if encoding == "sparse" and (changed_indices is None or base_round is None):
            raise ValueError("`encoding='sparse'` needs `changed_indices` and `base_round` (the client's last sync).")
        common = dict(
            server_round=server_round,
            num_seeds=num_seeds,
            value_dtype=value_dtype,
            seed_probabilities=seed_probabilities,
            probability_encoding=probability_encoding,
            seed_schedule=seed_schedule,
        )
        if encoding != "full" and changed_indices is not None and base_round is not None:
            changed = _check_indices(changed_indices, "changed_indices", "SyncMessage.build", max(num_seeds, 1))
            changed = torch.unique(changed)  # sorted, no repeats
            flags = _SYNC_FLOAT64 if value_dtype == torch.float64 else 0
            sparse_size = _sync_length(flags | _SYNC_SPARSE, max(num_seeds, 1), changed.numel(), 0)
            full_size = _sync_length(flags, max(num_seeds, 1), num_seeds, 0)
            if encoding == "sparse" or sparse_size < full_size:
                return cls(
                    accumulator_values=accumulators[changed],
                    accumulator_indices=changed,
                    base_round=base_round,
                    **common,
                )
        return cls(accumulator_values=accumulators, **common)

    # ------------------------------------------------------------------ client side
    @property
    def is_sparse(self) -> bool:
        return self.accumulator_indices is not None

    def apply_to(
        self, accumulators: torch.Tensor | Sequence[float] | None, *, client_round: int | None = None
    ) -> torch.Tensor:
        """The client's accumulators after this sync, as a new float64 tensor of the values the server sent.

        Args:
            accumulators: the client's cached K accumulators (from its sync at `base_round`); ignored, and may be
                None, for a full message.
            client_round: the round of the client's cached copy; if given, a sparse message built on another round
                is refused.

        Raises:
            ProtocolError: for a sparse message without cached accumulators, with a cache of the wrong length, or
                built on a round other than `client_round` (the client then needs a full sync).

        Example:
            >>> cached = SyncMessage.decode(payload).apply_to(cached, client_round=last_round)
        """
        if self.accumulator_indices is None:
            return self.accumulator_values.clone()
        if accumulators is None:
            raise ProtocolError(
                f"this SyncMessage is sparse (built on round {self.base_round}): pass the client's cached "
                "accumulators, or ask the server for a full sync"
            )
        if client_round is not None and client_round != self.base_round:
            raise ProtocolError(
                f"this sparse SyncMessage builds on round {self.base_round} but the client's accumulators are from "
                f"round {client_round}; ask the server for a full sync"
            )
        cached = torch.as_tensor(accumulators).detach().cpu().to(torch.float64, copy=True).flatten()
        if cached.numel() != self.num_seeds:
            raise ProtocolError(f"the cached accumulators have {cached.numel()} entries but K is {self.num_seeds}")
        cached[self.accumulator_indices] = self.accumulator_values
        return cached

    # ------------------------------------------------------------------ wire
    def _flags(self) -> int:
        flags = 0
        if self.accumulator_indices is not None:
            flags |= _SYNC_SPARSE
        if self.value_dtype == torch.float64:
            flags |= _SYNC_FLOAT64
        if self.seed_probabilities is not None:
            flags |= _SYNC_PROBABILITIES
            if self.probability_encoding == "log_uint8":
                flags |= _SYNC_LOG_UINT8
        if self.seed_schedule is not None:
            flags |= _SYNC_SCHEDULE
        return flags

    def encoded_size(self) -> int:
        """The length in bytes of `encode()`, without encoding."""
        num_scheduled = 0 if self.seed_schedule is None else self.seed_schedule.numel()
        return _sync_length(self._flags(), self.num_seeds, self.accumulator_values.numel(), num_scheduled)

    def encode(self) -> bytes:
        """The message as bytes: header, payload and CRC32 (see the module docstring for the layout)."""
        flags = self._flags()
        num_scheduled = 0 if self.seed_schedule is None else self.seed_schedule.numel()
        parts = [
            _SYNC_HEADER.pack(
                PROTOCOL_MAGIC,
                PROTOCOL_VERSION,
                SYNC_MESSAGE_TYPE,
                flags,
                self.num_seeds,
                self.server_round,
                0 if self.base_round is None else self.base_round,
                self.accumulator_values.numel(),
                num_scheduled,
            )
        ]
        if self.accumulator_indices is not None:
            parts.append(_index_bytes(self.accumulator_indices, self.num_seeds))
        parts.append(_float_bytes(self.accumulator_values, "<f8" if flags & _SYNC_FLOAT64 else "<f4"))
        if self.seed_probabilities is not None:
            if self._wire_probabilities is not None:
                step, codes = self._wire_probabilities
                parts += [_FLOAT32.pack(step), codes.tobytes()]
            else:
                parts.append(_float_bytes(self.seed_probabilities))
        if self.seed_schedule is not None:
            parts.append(_index_bytes(self.seed_schedule, self.num_seeds))
        return _finish(b"".join(parts))

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> SyncMessage:
        """Parse and validate an encoded SyncMessage.

        Raises:
            ProtocolError: for wrong magic, version or type, unknown flags, a truncated message or trailing bytes,
                a CRC mismatch, or invalid content (see the class docstring).

        Example:
            >>> message = SyncMessage.decode(payload)
        """
        data, header = _read_header(data, SYNC_MESSAGE_TYPE, _SYNC_HEADER)
        _, _, _, flags, num_seeds, server_round, base_round, num_entries, num_scheduled = header
        if flags & ~_SYNC_FLAGS:
            raise ProtocolError(f"SyncMessage has unknown flags {flags & ~_SYNC_FLAGS:#04x}")
        if flags & _SYNC_LOG_UINT8 and not flags & _SYNC_PROBABILITIES:
            raise ProtocolError("SyncMessage flags say log_uint8 probabilities but carry no probabilities")
        if num_seeds == 0:
            raise ProtocolError("SyncMessage has K = 0; the seed pool holds at least one seed")
        sparse = bool(flags & _SYNC_SPARSE)
        if not sparse and num_entries != num_seeds:
            raise ProtocolError(f"full SyncMessage carries {num_entries} accumulators but K is {num_seeds}")
        if not sparse and base_round != 0:
            raise ProtocolError(f"full SyncMessage has base_round {base_round}; only a sparse one builds on a round")
        _check_length_and_crc(data, _sync_length(flags, num_seeds, num_entries, num_scheduled), "SyncMessage")

        reader = _Reader(data, _SYNC_HEADER.size)
        index_dtype = seed_index_dtype(num_seeds)
        indices = reader.array(index_dtype, num_entries).astype(np.int64) if sparse else None
        values = reader.array("<f8" if flags & _SYNC_FLOAT64 else "<f4", num_entries)
        probabilities, encoding, wire = None, "float32", None
        if flags & _SYNC_PROBABILITIES:
            if flags & _SYNC_LOG_UINT8:
                encoding = "log_uint8"
                step, codes = reader.float32(), reader.array("<u1", num_seeds)
                wire = _check_log_codes(step, codes)
                probabilities = _dequantise_log_probabilities(step, codes)
            else:
                probabilities = reader.array("<f4", num_seeds).astype(np.float64)
        schedule = reader.array(index_dtype, num_scheduled).astype(np.int64) if flags & _SYNC_SCHEDULE else None
        message = cls(
            server_round=server_round,
            num_seeds=num_seeds,
            accumulator_values=torch.from_numpy(values),
            accumulator_indices=None if indices is None else torch.from_numpy(indices),
            base_round=base_round if sparse else None,
            value_dtype=torch.float64 if flags & _SYNC_FLOAT64 else torch.float32,
            seed_probabilities=None if probabilities is None else torch.from_numpy(probabilities),
            probability_encoding=encoding,
            seed_schedule=None if schedule is None else torch.from_numpy(schedule),
        )
        if wire is not None:
            step, codes = message._wire_probabilities
            if step != wire[0] or not np.array_equal(codes, wire[1]):
                raise ProtocolError("SyncMessage log_uint8 probabilities are not in canonical form")
        return message

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SyncMessage):
            return NotImplemented
        return (
            (self.server_round, self.num_seeds, self.base_round, self.value_dtype, self.probability_encoding)
            == (other.server_round, other.num_seeds, other.base_round, other.value_dtype, other.probability_encoding)
            and _same(self.accumulator_values, other.accumulator_values)
            and _same(self.accumulator_indices, other.accumulator_indices)
            and _same(self.seed_probabilities, other.seed_probabilities)
            and _same(self.seed_schedule, other.seed_schedule)
        )


def _check_log_codes(step: float, codes: np.ndarray) -> tuple[float, np.ndarray]:
    """Refuse log_uint8 data that no encoder writes, before dequantising it."""
    if not (math.isfinite(step) and 0.0 <= step * _LOG_LEVELS <= _MAX_LOG_RANGE * (1 + 1e-6)):
        raise ProtocolError(f"SyncMessage log_uint8 step {step!r} is not a finite number in [0, {_MAX_LOG_RANGE}/254]")
    if not (codes == 0).any():
        raise ProtocolError("SyncMessage log_uint8 probabilities have no code 0 (the likeliest seed); corrupt")
    return step, codes


# ---------------------------------------------------------------------------------------------------- UpdateMessage
@dataclass(frozen=True, eq=False)
class UpdateMessage:
    """Client -> server: the (seed index, scalar) pairs of a client's local steps in one round.

    Two forms. FedKSeed sends `scalars`, each step's `lr_t * g_t` (what it added to `A_j`), as float32.
    FedKSeed-Pro sends `projected_grads` (each step's g_t, float32) and `learning_rates` (one float32 when constant
    over the round, else one per step); the message then derives `scalars = float64(lr_t) * float64(g_t)`, an exact
    product, so sender and receivers agree bit for bit. After construction `scalars` is always set (float64), and
    `projected_grads` is set in the Pro form. The fields match the server's `ClientUpdate`, so a decoded message can
    be passed to `KSeedServer.aggregate` as is. Steps the client skipped (non-finite or clipped) are left out.

    Args:
        server_round: the round the update answers (uint32).
        client_id: the client's id (uint32).
        num_samples: the client's training sample count, its aggregation weight (uint32).
        num_seeds: K, the size of the candidate seed pool.
        seed_indices: the seed index of each local step, in `[0, K)`.
        scalars: FedKSeed form: `lr_t * g_t` of each step. In the Pro form leave it None (or pass exactly
            `learning_rates * projected_grads`).
        projected_grads: Pro form: g_t of each step.
        learning_rates: Pro form: one learning rate (constant) or one per step, each finite and >= 0.

    Raises:
        ProtocolError: for a field out of range, lengths that disagree, a non-finite value, or neither form.

    Example:
        >>> update = UpdateMessage(server_round=3, client_id=17, num_samples=812, num_seeds=4096,
        ...                        seed_indices=[5, 4090], scalars=[1.2e-6, -3.0e-7])
        >>> len(update.encode())  # 26 header + 2 x (2 + 4) + 4 CRC
        42
    """

    server_round: int
    client_id: int
    num_samples: int
    num_seeds: int
    seed_indices: torch.Tensor
    scalars: torch.Tensor | None = None
    projected_grads: torch.Tensor | None = None
    learning_rates: torch.Tensor | None = None

    message_type: ClassVar[int] = UPDATE_MESSAGE_TYPE

    def __post_init__(self) -> None:
        owner = "UpdateMessage"
        set_field = object.__setattr__  # the dataclass is frozen; normalise the fields once, here
        set_field(self, "server_round", _check_uint32(self.server_round, "server_round", owner))
        set_field(self, "client_id", _check_uint32(self.client_id, "client_id", owner))
        set_field(self, "num_samples", _check_uint32(self.num_samples, "num_samples", owner))
        num_seeds = _check_uint32(self.num_seeds, "num_seeds", owner, minimum=1)
        set_field(self, "num_seeds", num_seeds)
        indices = _check_indices(self.seed_indices, "seed_indices", owner, num_seeds)
        _check_uint32(indices.numel(), "number of steps", owner)
        set_field(self, "seed_indices", indices)
        steps = indices.numel()
        if self.scalars is None and self.projected_grads is None:
            raise ProtocolError(
                f"{owner} needs `scalars` (FedKSeed) or `projected_grads` with `learning_rates` (FedKSeed-Pro)"
            )
        if self.projected_grads is None:
            if self.learning_rates is not None:
                raise ProtocolError(f"{owner} `learning_rates` go with `projected_grads`; `scalars` already hold lr*g")
            scalars = _check_values(self.scalars, "scalars", owner, torch.float32)
            if scalars.numel() != steps:
                raise ProtocolError(f"{owner} has {steps} seed indices but {scalars.numel()} scalars; one per step")
            set_field(self, "scalars", scalars)
            return
        grads = _check_values(self.projected_grads, "projected_grads", owner, torch.float32)
        if grads.numel() != steps:
            raise ProtocolError(f"{owner} has {steps} seed indices but {grads.numel()} projected_grads; one per step")
        if self.learning_rates is None:
            raise ProtocolError(f"{owner} with `projected_grads` needs `learning_rates` to form lr*g")
        rates = self.learning_rates
        if isinstance(rates, numbers.Real) or (isinstance(rates, torch.Tensor) and rates.ndim == 0):
            rates = torch.as_tensor(rates).reshape(1)
        rates = _check_values(rates, "learning_rates", owner, torch.float32)
        if rates.numel() not in (1, steps):
            raise ProtocolError(f"{owner} has {rates.numel()} learning_rates for {steps} steps; give 1 or {steps}")
        if bool((rates < 0).any()):
            raise ProtocolError(f"{owner} `learning_rates` must be >= 0")
        if rates.numel() > 1 and bool((rates == rates[0]).all()):
            rates = rates[:1].clone()  # canonical: a constant rate travels once
        scalars = rates * grads  # float32 x float32 is exact in float64
        if self.scalars is not None:  # both forms given (as `dataclasses.replace` does): they must agree
            given = _check_values(self.scalars, "scalars", owner, torch.float64)
            if not _same(given, scalars):
                raise ProtocolError(f"{owner} got `scalars` that differ from `learning_rates * projected_grads`")
        set_field(self, "projected_grads", grads)
        set_field(self, "learning_rates", rates)
        set_field(self, "scalars", scalars)

    @classmethod
    def from_steps(
        cls,
        *,
        server_round: int,
        client_id: int,
        num_samples: int,
        num_seeds: int,
        seed_indices: torch.Tensor | Sequence[int],
        projected_grads: torch.Tensor | Sequence[float],
        learning_rates: float | torch.Tensor | Sequence[float],
        pro: bool = False,
    ) -> UpdateMessage:
        """Build the update from the client's per-step (seed index, g, lr), in the FedKSeed or the Pro form.

        Args:
            seed_indices, projected_grads: per local step (the optimizer's `last_step["seed_index"]` and
                `["projected_grad"]` of the steps that were not skipped).
            learning_rates: the learning rate of each step, or one for all.
            pro: send `projected_grads` and `learning_rates` (FedKSeed-Pro) instead of `lr * g`.
            server_round, client_id, num_samples, num_seeds: as in `UpdateMessage`.

        Raises:
            ProtocolError: as `UpdateMessage`.

        Example:
            >>> update = UpdateMessage.from_steps(server_round=3, client_id=17, num_samples=812, num_seeds=4096,
            ...                                   seed_indices=[5, 9], projected_grads=[0.8, -1.1],
            ...                                   learning_rates=1e-6, pro=True)
        """
        common = dict(
            server_round=server_round,
            client_id=client_id,
            num_samples=num_samples,
            num_seeds=num_seeds,
            seed_indices=seed_indices,
        )
        if pro:
            return cls(projected_grads=projected_grads, learning_rates=learning_rates, **common)
        grads = _check_values(projected_grads, "projected_grads", "UpdateMessage", torch.float64)
        rates = torch.as_tensor(learning_rates, dtype=torch.float64).detach().cpu().flatten()
        if rates.numel() not in (1, grads.numel()):
            raise ProtocolError(
                f"UpdateMessage.from_steps got {rates.numel()} learning_rates for {grads.numel()} steps; give 1 or "
                f"{grads.numel()}"
            )
        return cls(scalars=rates * grads, **common)

    @property
    def is_pro(self) -> bool:
        return self.projected_grads is not None

    # ------------------------------------------------------------------ wire
    def _flags(self) -> int:
        if self.projected_grads is None:
            return 0
        per_step = self.learning_rates.numel() != 1
        return _UPDATE_PROJECTED_GRADS | (_UPDATE_PER_STEP_LR if per_step else 0)

    def encoded_size(self) -> int:
        """The length in bytes of `encode()`, without encoding."""
        return _update_length(self._flags(), self.num_seeds, self.seed_indices.numel())

    def encode(self) -> bytes:
        """The message as bytes: header, payload and CRC32 (see the module docstring for the layout)."""
        flags = self._flags()
        parts = [
            _UPDATE_HEADER.pack(
                PROTOCOL_MAGIC,
                PROTOCOL_VERSION,
                UPDATE_MESSAGE_TYPE,
                flags,
                self.num_seeds,
                self.server_round,
                self.client_id,
                self.num_samples,
                self.seed_indices.numel(),
            ),
            _index_bytes(self.seed_indices, self.num_seeds),
        ]
        if flags & _UPDATE_PROJECTED_GRADS:
            parts += [_float_bytes(self.projected_grads), _float_bytes(self.learning_rates)]
        else:
            parts.append(_float_bytes(self.scalars))
        return _finish(b"".join(parts))

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> UpdateMessage:
        """Parse and validate an encoded UpdateMessage.

        Raises:
            ProtocolError: for wrong magic, version or type, unknown flags, a truncated message or trailing bytes,
                a CRC mismatch, or invalid content (a seed index >= K, a NaN or inf value, a negative rate).

        Example:
            >>> update = UpdateMessage.decode(payload)
            >>> server.aggregate(update.server_round, [update])
        """
        data, header = _read_header(data, UPDATE_MESSAGE_TYPE, _UPDATE_HEADER)
        _, _, _, flags, num_seeds, server_round, client_id, num_samples, num_steps = header
        if flags & ~_UPDATE_FLAGS:
            raise ProtocolError(f"UpdateMessage has unknown flags {flags & ~_UPDATE_FLAGS:#04x}")
        if flags & _UPDATE_PER_STEP_LR and not flags & _UPDATE_PROJECTED_GRADS:
            raise ProtocolError("UpdateMessage flags say per-step learning rates but carry no projected_grads")
        if num_seeds == 0:
            raise ProtocolError("UpdateMessage has K = 0; the seed pool holds at least one seed")
        _check_length_and_crc(data, _update_length(flags, num_seeds, num_steps), "UpdateMessage")

        reader = _Reader(data, _UPDATE_HEADER.size)
        indices = torch.from_numpy(reader.array(seed_index_dtype(num_seeds), num_steps).astype(np.int64))
        values = torch.from_numpy(reader.array("<f4", num_steps))
        common = dict(
            server_round=server_round,
            client_id=client_id,
            num_samples=num_samples,
            num_seeds=num_seeds,
            seed_indices=indices,
        )
        if not flags & _UPDATE_PROJECTED_GRADS:
            return cls(scalars=values, **common)
        rates = reader.array("<f4", num_steps if flags & _UPDATE_PER_STEP_LR else 1)
        return cls(projected_grads=values, learning_rates=torch.from_numpy(rates), **common)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UpdateMessage):
            return NotImplemented
        return (
            (self.server_round, self.client_id, self.num_samples, self.num_seeds)
            == (other.server_round, other.client_id, other.num_samples, other.num_seeds)
            and _same(self.seed_indices, other.seed_indices)
            and _same(self.scalars, other.scalars)
            and _same(self.projected_grads, other.projected_grads)
            and _same(self.learning_rates, other.learning_rates)
        )


# ---------------------------------------------------------------------------------------------------- dispatch
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


# ---------------------------------------------------------------------------------------------------- byte counts
def message_bytes_report(
    num_seeds: int = 4096,
    num_steps: int = 200,
    *,
    pro: bool = False,
    pro_encoding: Literal["schedule", "log_uint8", "float32"] = "schedule",
    constant_lr: bool = True,
    changed_seeds: int | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Encode a realistic round for one client and return the real encoded sizes in bytes.

    The accumulators, seed indices, projected gradients and Pro importances are drawn from a private generator
    seeded with `seed`; the sizes do not depend on the values, only on the shapes and the encodings.

    Args:
        num_seeds: K.
        num_steps: tau, the client's local steps in the round.
        pro: FedKSeed-Pro: the down message carries the Pro data, the update the projected grads and rate(s).
        pro_encoding: "schedule" (tau server-drawn seed indices), "log_uint8" or "float32" probabilities.
        constant_lr: one learning rate for the round (else a decaying rate per step, sent per step with Pro).
        changed_seeds: if set, the client synced before and this many accumulators changed since; the sync then
            takes the smaller of the full and the sparse form.
        seed: seeds the private generator.

    Returns:
        `{"down": SyncMessage bytes, "up": UpdateMessage bytes, "total": their sum}`.

    Raises:
        ValueError: for an unknown `pro_encoding` or a negative count.

    Example:
        >>> message_bytes_report(4096, 200)
        {'down': 16414, 'up': 1230, 'total': 17644}
    """
    if pro_encoding not in ("schedule", "log_uint8", "float32"):
        raise ValueError(f"Invalid `pro_encoding`: {pro_encoding!r}; choose 'schedule', 'log_uint8' or 'float32'.")
    if num_steps < 0 or (changed_seeds is not None and not 0 <= changed_seeds <= num_seeds):
        raise ValueError("`num_steps` must be >= 0 and `changed_seeds` in [0, num_seeds].")
    generator = torch.Generator().manual_seed(seed)
    accumulators = torch.randn(num_seeds, generator=generator, dtype=torch.float64) * 1e-4
    extras: dict = {}
    if pro:
        # The official Pro formula: softmax over min-max normalised mean |clip(g)| per seed.
        importance = torch.randn(num_seeds, generator=generator, dtype=torch.float64).abs()
        normalized = (importance - importance.min()) / (importance.max() - importance.min() + 1e-10)
        probabilities = torch.softmax(normalized, 0)
        if pro_encoding == "schedule":
            extras["seed_schedule"] = torch.multinomial(probabilities, num_steps, replacement=True, generator=generator)
        else:
            extras["seed_probabilities"] = probabilities
            extras["probability_encoding"] = pro_encoding
    changed = None
    if changed_seeds is not None:
        changed = torch.randperm(num_seeds, generator=generator)[:changed_seeds]
    sync = SyncMessage.build(
        server_round=1, accumulators=accumulators, changed_indices=changed, base_round=0, **extras
    ).encode()
    if pro and pro_encoding == "schedule":
        seed_indices = extras["seed_schedule"]
    else:
        seed_indices = torch.randint(num_seeds, (num_steps,), generator=generator)
    grads = torch.randn(num_steps, generator=generator, dtype=torch.float64)
    rates = 1e-6 if constant_lr else torch.linspace(1e-6, 5e-7, num_steps, dtype=torch.float64)
    update = UpdateMessage.from_steps(
        server_round=1,
        client_id=0,
        num_samples=1000,
        num_seeds=num_seeds,
        seed_indices=seed_indices,
        projected_grads=grads,
        learning_rates=rates,
        pro=pro,
    ).encode()
    return {"down": len(sync), "up": len(update), "total": len(sync) + len(update)}
