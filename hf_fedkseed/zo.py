"""Zeroth-order building blocks: the candidate seed pool, the seed sampler and the two-point estimate (pure torch)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .perturbation.hashing import splitmix64

__all__ = ["SEED_POOL_HIGH", "SeedSampler", "make_seed_pool", "projected_grad", "validate_probabilities"]

# The official code draws candidate seeds with `np.random.randint(1, 100000000000, K)`; we keep its range.
SEED_POOL_HIGH = 100_000_000_000


def make_seed_pool(num_seeds: int, seed: int) -> torch.Tensor:
    """Draw `num_seeds` distinct candidate seeds in `[1, 1e11)` from a private generator seeded with `seed`.

    Every client and the server call this with the same `seed` and get the same pool, so the pool itself never
    travels over the wire.

    Raises:
        ValueError: if `num_seeds` is not positive.
    """
    if num_seeds <= 0:
        raise ValueError(f"Invalid `num_seeds`: {num_seeds}; the pool needs at least one candidate seed.")
    generator = torch.Generator().manual_seed(seed & ((1 << 64) - 1))
    pool: list[int] = []
    seen: set[int] = set()
    while len(pool) < num_seeds:  # redraw the (rare) duplicates so every candidate is a distinct direction
        for value in torch.randint(1, SEED_POOL_HIGH, (num_seeds,), generator=generator).tolist():
            if value not in seen and len(pool) < num_seeds:
                seen.add(value)
                pool.append(value)
    return torch.tensor(pool, dtype=torch.int64)


def validate_probabilities(probabilities: torch.Tensor | Sequence[float], num_seeds: int) -> torch.Tensor:
    """Check a seed sampling distribution and return it as a float64 tensor that sums to one.

    Raises:
        ValueError: on a wrong length, a negative or non-finite entry, or an all-zero vector.
    """
    probs = torch.as_tensor(probabilities, dtype=torch.float64).detach().cpu().flatten().clone()
    if probs.numel() != num_seeds:
        raise ValueError(f"`seed_probabilities` has {probs.numel()} entries; it needs one per seed ({num_seeds}).")
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("`seed_probabilities` must be finite and non-negative.")
    total = probs.sum().item()
    if total <= 0:
        raise ValueError("`seed_probabilities` sums to zero; at least one seed needs a positive probability.")
    return probs / total


class SeedSampler:
    """Draws seed indices, uniformly or from given probabilities, from its own `torch.Generator`.

    A caller may also queue an explicit schedule of indices (a FedKSeed-Pro server draws them for its clients):
    queued indices are used first, in order, without touching the generator.

    Args:
        num_seeds: K, the size of the candidate pool.
        seed: seeds the private generator (never the global RNG).
        probabilities: optional sampling distribution over the K seeds (FedKSeed-Pro); uniform when None.
    """

    def __init__(self, num_seeds: int, seed: int, probabilities: torch.Tensor | None = None):
        self.num_seeds = num_seeds
        self.generator = torch.Generator().manual_seed(splitmix64(seed ^ 0x5EED5A3F1E))
        self.probabilities = None if probabilities is None else validate_probabilities(probabilities, num_seeds)
        self.schedule: list[int] = []

    def set_schedule(self, indices: torch.Tensor | Sequence[int] | None) -> None:
        """Use these seed indices, in order, for the next draws (None or empty clears the schedule).

        Raises:
            ValueError: if an index is outside `[0, num_seeds)`.
        """
        values = [] if indices is None else [int(i) for i in torch.as_tensor(indices).flatten().tolist()]
        if any(not 0 <= i < self.num_seeds for i in values):
            raise ValueError(f"A scheduled seed index is outside [0, {self.num_seeds}); it must index the seed pool.")
        self.schedule = values

    def sample(self) -> int:
        if self.schedule:
            return self.schedule.pop(0)
        if self.probabilities is None:
            return int(torch.randint(self.num_seeds, (1,), generator=self.generator).item())
        return int(torch.multinomial(self.probabilities, 1, generator=self.generator).item())

    def state_dict(self) -> dict:
        return {
            "generator_state": self.generator.get_state(),
            "probabilities": self.probabilities,
            "schedule": torch.tensor(self.schedule, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator_state"])
        probs = state.get("probabilities")
        self.probabilities = None if probs is None else validate_probabilities(probs, self.num_seeds)
        self.set_schedule(state.get("schedule"))


def projected_grad(loss_diff: float, eps: float) -> float:
    """The two-point estimate of the directional derivative: `(L(w + eps z) - L(w - eps z)) / (2 eps)`."""
    return loss_diff / (2.0 * eps)
