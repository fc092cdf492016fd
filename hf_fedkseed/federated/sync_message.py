"""`SyncMessage`: the server -> client message with the accumulators and optional FedKSeed-Pro data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from .codecs import (
    PROBABILITY_ENCODINGS,
    SYNC_PRECISIONS,
    _check_int8_codes,
    _check_log_codes,
    _dequantise_log_probabilities,
    _quantise_log_probabilities,
    dequantise_int8,
    quantise_int8,
)
from .wire import (
    _FLOAT32,
    SYNC_MESSAGE_TYPE,
    ProtocolError,
    _check_indices,
    _check_uint32,
    _check_values,
    _fields_equal,
    _float_bytes,
    _frame,
    _frame_length,
    _index_bytes,
    _payload_reader,
    _read_header,
    _set_uint32,
    _to_tensor,
    seed_index_dtype,
)

__all__ = ["SYNC_ENCODINGS", "SyncMessage", "sync_value_dtype"]

SYNC_ENCODINGS = ("auto", "full", "sparse")
_VALUE_DTYPES = (torch.float32, torch.float64, torch.int8)

# SyncMessage flags
_SYNC_SPARSE = 0x01  # accumulator values come with their indices (new values of the changed entries only)
_SYNC_FLOAT64 = 0x02  # accumulator values are float64 instead of float32
_SYNC_PROBABILITIES = 0x04  # K seed probabilities follow the accumulators
_SYNC_LOG_UINT8 = 0x08  # ... encoded as a float32 log step and K uint8 codes instead of K float32
_SYNC_SCHEDULE = 0x10  # the client's seed indices for its local steps follow
_SYNC_INT8 = 0x20  # full form only: the accumulators travel as one float32 scale and K int8 codes
_SYNC_FLAGS = _SYNC_SPARSE | _SYNC_FLOAT64 | _SYNC_PROBABILITIES | _SYNC_LOG_UINT8 | _SYNC_SCHEDULE | _SYNC_INT8


def sync_value_dtype(precision: str) -> torch.dtype:
    """The `SyncMessage` value dtype of a `FederatedConfig.sync_precision`: torch.float32 or torch.int8.

    Raises:
        ValueError: for a precision not in `SYNC_PRECISIONS`.

    Example:
        >>> SyncMessage.build(server_round=0, accumulators=acc, value_dtype=sync_value_dtype("int8"))
    """
    if precision not in SYNC_PRECISIONS:
        raise ValueError(f"Invalid `sync_precision`: {precision!r}; choose one of {SYNC_PRECISIONS}.")
    return torch.int8 if precision == "int8" else torch.float32


def _sync_length(flags: int, num_seeds: int, num_entries: int, num_scheduled: int) -> int:
    """The exact encoded length of a SyncMessage, from the fields its header announces."""
    index_size = seed_index_dtype(num_seeds).itemsize
    value_size = 1 if flags & _SYNC_INT8 else 8 if flags & _SYNC_FLOAT64 else 4
    payload = num_entries * value_size + num_scheduled * index_size
    if flags & _SYNC_INT8:
        payload += _FLOAT32.size  # the scale
    if flags & _SYNC_SPARSE:
        payload += num_entries * index_size
    if flags & _SYNC_PROBABILITIES:
        payload += _FLOAT32.size + num_seeds if flags & _SYNC_LOG_UINT8 else 4 * num_seeds
    return _frame_length(payload)


# ---------------------------------------------------------------------------------------------------- SyncMessage
@dataclass(frozen=True, eq=False)
class SyncMessage:
    """Server -> client: the accumulators the client's model is built from, and optional FedKSeed-Pro data.

    The client's model after the sync is `w0 - sum_j A_j z_j` with `A = message.apply_to(cached_accumulators)`.
    The constructor rounds every value to its wire type (int8: quantises them), so the message holds exactly what
    the client will decode.

    Args:
        server_round: the round this sync opens (uint32).
        num_seeds: K, the size of the candidate seed pool.
        accumulator_values: all K accumulators (full form), or the new values of the changed ones (sparse form).
        accumulator_indices: None for the full form; for the sparse form the ascending seed indices whose
            accumulators changed since the client's sync at `base_round` (the values replace, not add).
        base_round: the round of the client's last sync that a sparse message builds on; None for the full form.
        value_dtype: the wire type of the accumulators: torch.float32 (default, 4 bytes each), torch.float64, or
            torch.int8 (full form only: one float32 scale and one int8 code per seed, `quantise_int8`; the message
            holds the dequantised values `codes * scale`, within `scale / 2` of the values given).
        seed_probabilities: FedKSeed-Pro sampling distribution over the K seeds (non-negative, finite, not all
            zero), or None.
        probability_encoding: "float32" (4 bytes per seed, float32 rounding) or "log_uint8" (1 byte per seed,
            each probability within a factor `e^step` of the original, see docs/protocol.md).
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
        _set_uint32(self, "server_round", owner)
        num_seeds = _set_uint32(self, "num_seeds", owner, minimum=1)
        if self.value_dtype not in _VALUE_DTYPES:
            raise ProtocolError(
                f"{owner} `value_dtype` must be torch.float32, torch.float64 or torch.int8, got {self.value_dtype}"
            )
        int8 = self.value_dtype == torch.int8
        values = _check_values(
            self.accumulator_values, "accumulator_values", owner, torch.float64 if int8 else self.value_dtype
        )
        wire_values = None
        if int8:
            if self.accumulator_indices is not None:
                raise ProtocolError(f"{owner} with int8 accumulators is full form only; a sparse sync sends float32")
            wire_values = quantise_int8(values.numpy())
            values = torch.from_numpy(dequantise_int8(*wire_values))
        set_field(self, "accumulator_values", values)
        set_field(self, "_wire_values", wire_values)
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
            _set_uint32(self, "base_round", owner)
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
                sends K values, "sparse" always sends the changed ones. int8 values always take the full form.
            value_dtype, seed_probabilities, probability_encoding, seed_schedule: as in `SyncMessage`.

        Raises:
            ValueError: for an unknown `encoding`, "sparse" without `changed_indices` and `base_round`, or "sparse"
                with int8 values.
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
        if encoding == "sparse" and value_dtype == torch.int8:
            raise ValueError("int8 accumulators travel in the full form only; use `encoding='full'` or float32.")
        common = dict(
            server_round=server_round,
            num_seeds=num_seeds,
            value_dtype=value_dtype,
            seed_probabilities=seed_probabilities,
            probability_encoding=probability_encoding,
            seed_schedule=seed_schedule,
        )
        sparse_allowed = value_dtype != torch.int8
        if encoding != "full" and sparse_allowed and changed_indices is not None and base_round is not None:
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

        For int8 values these are the dequantised `codes * scale`, exactly `KSeedServer.published_accumulators()`.

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
        if self.value_dtype == torch.int8:
            flags |= _SYNC_INT8
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
        """The message as bytes: header, payload and CRC32 (layout: docs/protocol.md)."""
        flags = self._flags()
        parts: list[bytes] = []
        if self.accumulator_indices is not None:
            parts.append(_index_bytes(self.accumulator_indices, self.num_seeds))
        if self._wire_values is not None:
            scale, codes = self._wire_values
            parts += [_FLOAT32.pack(scale), codes.tobytes()]
        else:
            parts.append(_float_bytes(self.accumulator_values, "<f8" if flags & _SYNC_FLOAT64 else "<f4"))
        if self.seed_probabilities is not None:
            if self._wire_probabilities is not None:
                step, codes = self._wire_probabilities
                parts += [_FLOAT32.pack(step), codes.tobytes()]
            else:
                parts.append(_float_bytes(self.seed_probabilities))
        if self.seed_schedule is not None:
            parts.append(_index_bytes(self.seed_schedule, self.num_seeds))
        num_scheduled = 0 if self.seed_schedule is None else self.seed_schedule.numel()
        fields = (0 if self.base_round is None else self.base_round, self.accumulator_values.numel(), num_scheduled)
        return _frame(SYNC_MESSAGE_TYPE, flags, self.num_seeds, self.server_round, fields, parts)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> SyncMessage:
        """Parse and validate an encoded SyncMessage.

        Raises:
            ProtocolError: for wrong magic, version or type, unknown flags, a truncated message or trailing bytes,
                a CRC mismatch, or invalid content (see the class docstring).

        Example:
            >>> message = SyncMessage.decode(payload)
        """
        data, header = _read_header(data, SYNC_MESSAGE_TYPE, _SYNC_FLAGS)
        flags, num_seeds, server_round, base_round, num_entries, num_scheduled = header
        if flags & _SYNC_LOG_UINT8 and not flags & _SYNC_PROBABILITIES:
            raise ProtocolError("SyncMessage flags say log_uint8 probabilities but carry no probabilities")
        if flags & _SYNC_INT8 and flags & (_SYNC_SPARSE | _SYNC_FLOAT64):
            raise ProtocolError("SyncMessage flags say int8 accumulators and sparse or float64 ones; int8 is full only")
        if num_seeds == 0:
            raise ProtocolError("SyncMessage has K = 0; the seed pool holds at least one seed")
        sparse = bool(flags & _SYNC_SPARSE)
        if not sparse and num_entries != num_seeds:
            raise ProtocolError(f"full SyncMessage carries {num_entries} accumulators but K is {num_seeds}")
        if not sparse and base_round != 0:
            raise ProtocolError(f"full SyncMessage has base_round {base_round}; only a sparse one builds on a round")
        reader = _payload_reader(data, _sync_length(flags, num_seeds, num_entries, num_scheduled), "SyncMessage")
        index_dtype = seed_index_dtype(num_seeds)
        indices = reader.array(index_dtype, num_entries).astype(np.int64) if sparse else None
        value_dtype, wire_values = torch.float64 if flags & _SYNC_FLOAT64 else torch.float32, None
        if flags & _SYNC_INT8:
            value_dtype = torch.int8
            wire_values = reader.float32(), reader.array("<i1", num_entries)
            _check_int8_codes(*wire_values)
            values = dequantise_int8(*wire_values)
        else:
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
            value_dtype=value_dtype,
            seed_probabilities=None if probabilities is None else torch.from_numpy(probabilities),
            probability_encoding=encoding,
            seed_schedule=None if schedule is None else torch.from_numpy(schedule),
        )
        if wire_values is not None:
            scale, codes = message._wire_values
            if scale != wire_values[0] or not np.array_equal(codes, wire_values[1]):
                raise ProtocolError(
                    "SyncMessage int8 accumulators are not in canonical form (the scale must be "
                    "float32(max|A| / 127), 0 only for all-zero codes)"
                )
        if wire is not None:
            step, codes = message._wire_probabilities
            if step != wire[0] or not np.array_equal(codes, wire[1]):
                raise ProtocolError("SyncMessage log_uint8 probabilities are not in canonical form")
        return message

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SyncMessage):
            return NotImplemented
        return _fields_equal(self, other)
