"""FedZO / FedMeZO: zeroth-order steps with a fresh, never reused seed every step, and their (seed, scalar) messages."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..optimizer import KSeedZOOptimizer
from ..zo import SeedSampler

__all__ = [
    "FreshSeedZOOptimizer",
    "SeedStepsMessage",
    "SequentialSeedSampler",
    "encode_seed_history",
    "replay_seed_steps",
]

_MAGIC = b"FZO"
_VERSION = 1
# magic, version, server_round, client_id, num_samples, num_steps
_HEADER = struct.Struct("<3sBIIII")
_CRC = struct.Struct("<I")
_UINT32_MAX = 2**32 - 1


class SequentialSeedSampler(SeedSampler):
    """Hands out seed indices 0, 1, 2, ... once each: every step gets a seed no other step ever used.

    Raises:
        RuntimeError: when the pool is exhausted (more steps than `num_seeds`).
    """

    def __init__(self, num_seeds: int):
        super().__init__(num_seeds, seed=0)
        self.position = 0

    def sample(self) -> int:
        if self.schedule:
            return self.schedule.pop(0)
        if self.position >= self.num_seeds:
            raise RuntimeError(
                f"FreshSeedZOOptimizer has used all {self.num_seeds} fresh seeds; build it with `max_steps` at least "
                "the number of optimizer steps the run takes."
            )
        self.position += 1
        return self.position - 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.position = int(state["position"])


class FreshSeedZOOptimizer(KSeedZOOptimizer):
    """The ZO optimizer of FedZO (Fang et al., 2022) / FedMeZO: a fresh random direction at every step.

    FedKSeed restricts every step to one of K candidate seeds, so a model is described by K scalars. Here every
    step draws a seed that no step used before (the `max_steps` seeds of `make_seed_pool(max_steps, seed)`, used in
    order: distinct 37-bit seeds, as unrestricted as MeZO's), so the only compact description of the model is the
    full list of (seed, lr * g) pairs since the start, which grows with every step. Everything else (the two-point
    estimate, the hooks that run it inside `transformers.Trainer`, the learning rate from the param group) is
    `KSeedZOOptimizer`'s.

    Args:
        params: the model (or its `named_parameters()`).
        lr: learning rate.
        eps: perturbation scale.
        max_steps: how many steps the optimizer will take (the size of its pool of fresh seeds).
        seed: seeds the pool of fresh seeds.
        **kwargs: any other `KSeedZOOptimizer` argument (`engine`, `grad_clip`, `weight_decay`, ...), except
            `num_seeds`, `seed_pool` and `seed_probabilities`.

    Raises:
        ValueError: for a `max_steps` below 1 or a K-seed argument.

    Example:
        >>> optimizer = FreshSeedZOOptimizer(model, lr=1e-3, eps=1e-3, max_steps=trainer_steps)
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(optimizer, None))
    """

    def __init__(self, params, *, lr: float, eps: float = 1e-3, max_steps: int, seed: int = 0, **kwargs):
        for name in ("num_seeds", "seed_pool", "seed_probabilities"):
            if name in kwargs:
                raise ValueError(f"FreshSeedZOOptimizer draws a fresh seed per step; it takes no `{name}`.")
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
            raise ValueError(f"Invalid `max_steps`: {max_steps!r}; it must be a positive integer.")
        super().__init__(params, lr=lr, eps=eps, num_seeds=max_steps, seed=seed, **kwargs)
        self.sampler = SequentialSeedSampler(max_steps)


def _float32_list(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(array).all():
        raise ValueError(f"SeedStepsMessage `{name}` must be finite.")
    return array.astype("<f4")


@dataclass(frozen=True, eq=False)
class SeedStepsMessage:
    """Client -> server in FedZO: the (seed, lr * g) pair of each local step, 12 bytes a step.

    Layout: header `b"FZO" | version u8 | round u32 | client u32 | samples u32 | steps u32` (20 bytes), the seeds as
    uint64, the scalars as float32, then a CRC32 of everything before it. The server rebuilds the client's model
    from the broadcast one by replaying the pairs: `w_c = w - sum_t scalar_t * z(seed_t)`.

    Args:
        server_round, client_id, num_samples: as in FedKSeed's `UpdateMessage` (uint32 each).
        seeds: the seed of each local step (0 <= seed < 2**63).
        scalars: `lr_t * g_t` of each step (sent as float32).

    Raises:
        ValueError: for a field out of range, lengths that differ, a non-finite scalar, or (decode) a malformed
            message: wrong magic, version or length, or a CRC mismatch.

    Example:
        >>> message = SeedStepsMessage(server_round=0, client_id=3, num_samples=48, seeds=[17, 99], scalars=[1e-3, 0])
        >>> len(message.encode())  # 20 + 2 x (8 + 4) + 4
        48
    """

    server_round: int
    client_id: int
    num_samples: int
    seeds: torch.Tensor
    scalars: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("server_round", "client_id", "num_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT32_MAX:
                raise ValueError(f"SeedStepsMessage `{name}` must be an integer in [0, 2**32), got {value!r}.")
        raw = self.seeds.reshape(-1).tolist() if isinstance(self.seeds, torch.Tensor) else list(self.seeds)
        seeds = [int(seed) for seed in raw]
        if any(not 0 <= seed < 2**63 for seed in seeds):
            raise ValueError("SeedStepsMessage `seeds` must be integers in [0, 2**63).")
        scalars = _float32_list(torch.as_tensor(self.scalars, dtype=torch.float64).reshape(-1).numpy(), "scalars")
        if len(seeds) != scalars.size:
            raise ValueError(f"SeedStepsMessage has {len(seeds)} seeds but {scalars.size} scalars; one per step.")
        object.__setattr__(self, "seeds", torch.tensor(seeds, dtype=torch.int64))
        object.__setattr__(self, "scalars", torch.from_numpy(scalars.astype(np.float64)))

    def encode(self) -> bytes:
        """The message as bytes (see the class docstring for the layout)."""
        body = b"".join(
            [
                _HEADER.pack(_MAGIC, _VERSION, self.server_round, self.client_id, self.num_samples, len(self.seeds)),
                self.seeds.numpy().astype("<u8").tobytes(),
                self.scalars.numpy().astype("<f4").tobytes(),
            ]
        )
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> SeedStepsMessage:
        """Parse `encode()`'s bytes, checking magic, version, exact length and CRC first.

        Raises:
            ValueError: naming what is wrong with the bytes.
        """
        data = bytes(data)
        if len(data) < _HEADER.size + _CRC.size:
            raise ValueError(f"SeedStepsMessage of {len(data)} bytes is shorter than its header; truncated.")
        magic, version, server_round, client_id, num_samples, steps = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise ValueError(f"Not a SeedStepsMessage (magic {magic!r}, expected {_MAGIC!r}).")
        if version != _VERSION:
            raise ValueError(f"SeedStepsMessage version {version} is not supported (expected {_VERSION}).")
        expected = _HEADER.size + 12 * steps + _CRC.size
        if len(data) != expected:
            raise ValueError(f"SeedStepsMessage announces {steps} steps ({expected} bytes) but has {len(data)} bytes.")
        (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
        if crc != zlib.crc32(data[: -_CRC.size]):
            raise ValueError("SeedStepsMessage CRC32 mismatch; the message is corrupt.")
        offset = _HEADER.size
        seeds = np.frombuffer(data, dtype="<u8", count=steps, offset=offset)
        scalars = np.frombuffer(data, dtype="<f4", count=steps, offset=offset + 8 * steps)
        return cls(
            server_round=server_round,
            client_id=client_id,
            num_samples=num_samples,
            seeds=[int(seed) for seed in seeds.tolist()],
            scalars=torch.from_numpy(scalars.astype(np.float64)),
        )


def encode_seed_history(steps: Sequence[tuple[int, float]]) -> bytes:
    """All (seed, lr * g) pairs since round 0 as one message: what a FedZO client would download to rebuild the
    model from `w0` by replay, instead of the model itself. Its size grows by 12 bytes with every step of every
    client (a weighted average of clients is folded into the scalars, so the count of pairs is what matters).

    Example:
        >>> len(encode_seed_history([(17, 1e-3)] * 1000))  # 20 + 12,000 + 4
        12024
    """
    return SeedStepsMessage(
        server_round=0,
        client_id=0,
        num_samples=0,
        seeds=[seed for seed, _ in steps],
        scalars=[scalar for _, scalar in steps],
    ).encode()


def replay_seed_steps(named_params, message: SeedStepsMessage, engine=None, *, weight: float = 1.0) -> None:
    """Apply a client's steps to `named_params` in place: `w <- w - weight * sum_t scalar_t * z(seed_t)`.

    What a FedZO server does with an upload (weight 1 rebuilds the client's model from the broadcast one).

    Args:
        named_params: the `(name, tensor)` pairs the client trained, holding the broadcast weights.
        message: the client's decoded `SeedStepsMessage`.
        engine: the client's perturbation engine (name or instance; default the package default).
        weight: scale of the update (a client's aggregation weight).

    Example:
        >>> replay_seed_steps(list(server_model.named_parameters()), SeedStepsMessage.decode(upload))
    """
    from ..perturbation import get_engine

    engine = get_engine(engine)
    with torch.no_grad():
        engine.replay_(
            list(named_params),
            message.seeds.tolist(),
            [-weight * float(scalar) for scalar in message.scalars.tolist()],
        )
