"""Zeroth-order building blocks: the candidate seed pool, the seed sampler and the two-point estimate (pure torch)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .perturbation.hashing import splitmix64

__all__ = [
    "ESTIMATORS",
    "SEED_POOL_HIGH",
    "SeedSampler",
    "check_estimator",
    "make_seed_pool",
    "normalized_one_sided",
    "projected_grad",
    "validate_probabilities",
]

# How a step turns forwards into a direction's coefficient: the paper's two-point estimate, or FZOO's batch of
# one-sided estimates normalised by the spread of their losses.
ESTIMATORS = ("two_point", "fzoo")

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


def check_estimator(estimator: str, directions: int) -> None:
    """Check an estimator name and its number of directions per step.

    Raises:
        ValueError: for an unknown estimator, `two_point` with more than one direction, or `fzoo` with fewer than 2
            (the spread of one loss is undefined).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"Unknown ZO `estimator` {estimator!r}; choose one of {list(ESTIMATORS)}.")
    if not isinstance(directions, int) or isinstance(directions, bool) or directions < 1:
        raise ValueError(f"Invalid `directions`: {directions!r}; it must be a positive integer.")
    if estimator == "two_point" and directions != 1:
        raise ValueError(
            f"`two_point` takes one direction per step, got {directions}; use `estimator='fzoo'` for several."
        )
    if estimator == "fzoo" and directions < 2:
        raise ValueError(
            f"`fzoo` needs at least 2 directions per step (it normalises by their losses' spread), got {directions}; "
            "4 to 8 is typical."
        )


def normalized_one_sided(losses: Sequence[float]) -> list[float] | None:
    """FZOO's per-direction slopes: `(L_i - L_0) / (N * std(L_1..L_N))` from `[L_0, L_1, ..., L_N]`.

    `L_0` is the loss at `w`, `L_i` at `w + eps z_i`. The step is `w <- w - lr * sum_i slope_i * z_i`: dividing by
    the spread of the perturbed losses (which is about `eps * |grad|`) makes it a normalised-SGD step whose size is
    set by `lr` alone (Dang et al. 2025, FZOO, arXiv 2506.09034). The std is the sample std (N - 1).

    Returns:
        The N slopes, or None when they are undefined: a non-finite loss or losses without spread.
    """
    base, perturbed = float(losses[0]), [float(value) for value in losses[1:]]
    count = len(perturbed)
    if count < 2 or not all(map(math.isfinite, [base, *perturbed])):
        return None
    mean = sum(perturbed) / count
    spread = math.sqrt(sum((value - mean) ** 2 for value in perturbed) / (count - 1))
    if not spread > 0.0:
        return None
    return [(value - base) / (count * spread) for value in perturbed]
