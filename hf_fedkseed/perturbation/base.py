"""The perturbation engine interface (`PerturbationEngine`) and the helpers every engine shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

import torch

__all__ = ["NamedTensors", "PerturbationEngine", "canonical_name"]

NamedTensors = Sequence[tuple[str, torch.Tensor]]


def canonical_name(name: str) -> str:
    """Strip wrapper prefixes (`torch.compile`'s `_orig_mod.`, DDP's leading `module.`) so z follows the weight."""
    name = name.replace("_orig_mod.", "")
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def _per_param(value: float | Sequence[float], count: int, what: str) -> Sequence[float]:
    """One value per parameter: a scalar repeated `count` times, or a sequence checked to have `count` entries."""
    if isinstance(value, (int, float)):
        return [float(value)] * count
    if len(value) != count:
        raise ValueError(f"`{what}` has {len(value)} entries but there are {count} parameters; give one per parameter.")
    return value


class PerturbationEngine(ABC):
    """Regenerates the random direction z for a seed and applies `p <- beta * p + alpha * z` in place.

    An engine is identified by `name` and `version`: together they pin down every z it will ever produce, so
    they are recorded in checkpoints and seed deltas. Engines never read or write the global RNG state.

    Subclasses implement `add_noise_`; `replay_` and `generate` have generic implementations on top of it.
    """

    name: str = "abstract"
    version: int = 0

    @abstractmethod
    def add_noise_(
        self,
        params: NamedTensors,
        seed: int,
        alpha: float | Sequence[float],
        beta: float | Sequence[float] = 1.0,
    ) -> None:
        """In place, for every `(name, p)`: `p <- beta * p + alpha * z(seed, name)`.

        Args:
            params: `(name, tensor)` pairs, in the model's `named_parameters()` order. Tensors must be contiguous.
            seed: the perturbation seed (any integer in `[0, 2**64)`).
            alpha: the coefficient of z, one float for all parameters or one per parameter.
            beta: a multiplier applied to the parameter first (weight decay), one float or one per parameter.
        """

    def replay_(self, params: NamedTensors, seeds: Iterable[int], coefficients: Iterable[float]) -> int:
        """Add `sum_j coefficients[j] * z(seeds[j])` to `params` in place; zero coefficients are skipped.

        Returns:
            The number of seeds actually applied.
        """
        applied = 0
        for seed, coefficient in zip(seeds, coefficients, strict=True):
            coefficient = float(coefficient)
            if coefficient != 0.0:
                self.add_noise_(params, int(seed), coefficient)
                applied += 1
        return applied

    def generate(self, params: NamedTensors, seed: int) -> list[torch.Tensor]:
        """Return z(seed) for each parameter as new tensors shaped like them (for tests and inspection)."""
        zs = [(name, torch.zeros_like(p)) for name, p in params]
        self.add_noise_(zs, seed, 1.0)
        return [z for _, z in zs]

    def scratch_bytes(self, params: NamedTensors) -> int:
        """Upper bound on the temporary memory one call of `add_noise_` allocates for these parameters."""
        return 0

    def prewarm(self, params: NamedTensors) -> bool:
        """Start any one-time preparation for these parameters (a kernel compilation) in the background.

        Returns:
            True if something was started; the base engine needs nothing.
        """
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version})"
