"""Tensor-subset directions: each seed perturbs a fraction of the parameter tensors, chosen by hashing (seed, name)."""

from __future__ import annotations

import re

import torch

from .base import NamedTensors, PerturbationEngine, _per_param
from .hashing import MASK64, mix, name_key

__all__ = ["SUBSET_SEPARATOR", "TensorSubsetEngine", "parse_subset_name", "subset_name"]

SUBSET_SEPARATOR = "@tensors="
_SUBSET_SALT = 0x5B5E7A11
_NAME = re.compile(r"^(?P<inner>[^@]+)@tensors=(?P<fraction>[0-9.eE+-]+)$")


def subset_name(inner: str, fraction: float) -> str:
    """The engine name of `inner` restricted to a tensor `fraction`: `subset_name("counter", 0.25)` is
    `"counter@tensors=0.25"` (what `parse_subset_name` reads back)."""
    return f"{inner}{SUBSET_SEPARATOR}{float(fraction):g}"


def parse_subset_name(name: str) -> tuple[str, float] | None:
    """`("counter", 0.25)` for `"counter@tensors=0.25"`; None for a name without the subset suffix.

    Raises:
        ValueError: for a malformed suffix or a fraction outside (0, 1].
    """
    if SUBSET_SEPARATOR not in name:
        return None
    match = _NAME.match(name)
    try:
        fraction = float(match["fraction"]) if match else float("nan")
    except ValueError:
        fraction = float("nan")
    if match is None or not 0.0 < fraction <= 1.0:
        raise ValueError(
            f"Invalid engine name {name!r}: write `<engine>@tensors=<fraction>` with a fraction in (0, 1], "
            "e.g. `counter@tensors=0.25`."
        )
    return match["inner"], fraction


class TensorSubsetEngine(PerturbationEngine):
    """Directions that perturb only a seed-chosen subset of the parameter tensors (layer-wise sparse perturbations).

    Source: LeZO (Wang et al. 2024, arXiv 2410.09823: "layer-wise sparse computation", perturbing and updating a
    random subset of layers each step) and the block-wise perturbations of ZO-Bench (Zhang et al., ICML 2024). Here
    the subset is a pure function of the seed: tensor `name` belongs to direction `seed` when
    `mix(salt, seed, name_key(name)) / 2**64 < fraction`, so every party regenerates it from the seed alone and the
    model stays `w0 - sum_j A_j z_j` with `z_j` zero outside its tensors. Nothing extra travels and no mask is
    stored: the server, the wire format, the KSeed delta and `apply_kseed` work unchanged; the engine's recorded
    name (`counter@tensors=0.25`) pins the rule.

    What it assumes: directions restricted to about `fraction` of the tensors are still informative (a directional
    derivative along a sparser z has less variance from the untouched weights, which is the source papers' point),
    and the tensors are many enough that every direction touches some. A step generates z for about `fraction` of
    the weights, so it is cheaper; a two-point estimate along such a z is an unbiased estimate of `fraction` times
    the gradient, so the learning rate absorbs the factor. Which kernel path (compiled or eager) runs follows the
    subset's size, the same for the step and every replay of a seed.

    Args:
        inner: the engine generating z on the chosen tensors.
        fraction: the expected fraction of tensors each direction perturbs, in (0, 1].

    Example:
        >>> engine = TensorSubsetEngine(CounterEngine(), 0.25)
        >>> engine.name
        'counter@tensors=0.25'
    """

    def __init__(self, inner: PerturbationEngine, fraction: float):
        if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
            raise ValueError(f"Invalid tensor `fraction`: {fraction!r}; it must be in (0, 1].")
        if isinstance(inner, TensorSubsetEngine):
            raise ValueError("A tensor-subset engine cannot wrap another one; give it the base engine.")
        self.inner = inner
        self.fraction = float(fraction)
        self.name = subset_name(inner.name, self.fraction)
        self.version = inner.version
        self.device_independent = getattr(inner, "device_independent", False)
        self._threshold = min(MASK64, int(self.fraction * 2.0**64))

    def chosen(self, seed: int, name: str) -> bool:
        """Whether direction `seed` perturbs the tensor `name`."""
        return self.fraction >= 1.0 or mix(_SUBSET_SALT, seed, name_key(name)) < self._threshold

    @torch.no_grad()
    def add_noise_(self, params: NamedTensors, seed, alpha, beta=1.0) -> None:
        alphas = _per_param(alpha, len(params), "alpha")
        betas = _per_param(beta, len(params), "beta")
        picked = [i for i, (name, _) in enumerate(params) if self.chosen(int(seed), name)]
        untouched = set(range(len(params))).difference(picked)
        for index in untouched:  # weight decay still reaches the tensors z leaves alone
            if betas[index] != 1.0:
                params[index][1].mul_(betas[index])
        if picked:
            self.inner.add_noise_(
                [params[i] for i in picked], seed, [alphas[i] for i in picked], [betas[i] for i in picked]
            )

    def scratch_bytes(self, params: NamedTensors) -> int:
        return self.inner.scratch_bytes(params)

    def prewarm(self, params: NamedTensors) -> bool:
        return self.inner.prewarm(params)

    @property
    def compile_seconds(self) -> dict[str, float]:
        return dict(getattr(self.inner, "compile_seconds", {}))
