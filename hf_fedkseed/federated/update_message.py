"""`UpdateMessage`: the client -> server message with the (seed index, scalar) pairs of a round's local steps."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .wire import (
    UPDATE_MESSAGE_TYPE,
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
    _same,
    _set_uint32,
    seed_index_dtype,
)

__all__ = ["UpdateMessage"]

# UpdateMessage flags
_UPDATE_PROJECTED_GRADS = 0x01  # values are g_t (with learning rates), not lr_t * g_t
_UPDATE_PER_STEP_LR = 0x02  # one learning rate per step instead of one for the message
_UPDATE_FLAGS = _UPDATE_PROJECTED_GRADS | _UPDATE_PER_STEP_LR


def _update_length(flags: int, num_seeds: int, num_steps: int) -> int:
    """The exact encoded length of an UpdateMessage, from the fields its header announces."""
    payload = num_steps * (seed_index_dtype(num_seeds).itemsize + 4)
    if flags & _UPDATE_PROJECTED_GRADS:
        payload += 4 * num_steps if flags & _UPDATE_PER_STEP_LR else 4
    return _frame_length(payload)


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
        for name in ("server_round", "client_id", "num_samples"):
            _set_uint32(self, name, owner)
        num_seeds = _set_uint32(self, "num_seeds", owner, minimum=1)
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
        """The message as bytes: header, payload and CRC32 (layout: docs/protocol.md)."""
        flags = self._flags()
        parts = [_index_bytes(self.seed_indices, self.num_seeds)]
        if flags & _UPDATE_PROJECTED_GRADS:
            parts += [_float_bytes(self.projected_grads), _float_bytes(self.learning_rates)]
        else:
            parts.append(_float_bytes(self.scalars))
        fields = (self.client_id, self.num_samples, self.seed_indices.numel())
        return _frame(UPDATE_MESSAGE_TYPE, flags, self.num_seeds, self.server_round, fields, parts)

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
        data, header = _read_header(data, UPDATE_MESSAGE_TYPE, _UPDATE_FLAGS)
        flags, num_seeds, server_round, client_id, num_samples, num_steps = header
        if flags & _UPDATE_PER_STEP_LR and not flags & _UPDATE_PROJECTED_GRADS:
            raise ProtocolError("UpdateMessage flags say per-step learning rates but carry no projected_grads")
        if num_seeds == 0:
            raise ProtocolError("UpdateMessage has K = 0; the seed pool holds at least one seed")
        reader = _payload_reader(data, _update_length(flags, num_seeds, num_steps), "UpdateMessage")
        indices = torch.from_numpy(reader.array(seed_index_dtype(num_seeds), num_steps).astype(np.int64))
        values = torch.from_numpy(reader.array("<f4", num_steps))
        pro = bool(flags & _UPDATE_PROJECTED_GRADS)
        rates = reader.array("<f4", num_steps if flags & _UPDATE_PER_STEP_LR else 1) if pro else None
        return cls(
            server_round=server_round,
            client_id=client_id,
            num_samples=num_samples,
            num_seeds=num_seeds,
            seed_indices=indices,
            scalars=None if pro else values,
            projected_grads=values if pro else None,
            learning_rates=torch.from_numpy(rates) if pro else None,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UpdateMessage):
            return NotImplemented
        return _fields_equal(self, other)
