"""Perturbation engines: regenerate z(seed, parameter) and add `alpha * z` to parameters in place (pure torch)."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

import torch

NamedTensors = Sequence[tuple[str, torch.Tensor]]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One round of SplitMix64: a cheap, well-mixed 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def canonical_name(name: str) -> str:
    """Strip wrapper prefixes (`torch.compile`'s `_orig_mod.`, DDP's leading `module.`) so z follows the weight."""
    name = name.replace("_orig_mod.", "")
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def _per_param(value: float | Sequence[float], count: int, what: str) -> Sequence[float]:
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version})"


class ChunkedGeneratorEngine(PerturbationEngine):
    """z from one `torch.Generator` per (seed, parameter name, chunk of `chunk_size` elements).

    z depends only on the seed, the parameter's canonical name and the element index, never on the parameter's
    position or on which other parameters are trained. Gaussian values are drawn in float32 and added into
    parameters of any floating dtype. Scratch memory: one float32 buffer of `chunk_size` elements per device
    (4 MiB at the default), never a copy of the model.

    The values depend on the device type (CPU and CUDA generators differ), like every `torch.Generator`.
    """

    name = "torch-chunked"
    version = 1

    def __init__(self, chunk_size: int = 1 << 20):
        if chunk_size <= 0:
            raise ValueError(f"Invalid `chunk_size`: {chunk_size}; it must be a positive number of elements.")
        self.chunk_size = chunk_size
        self._name_keys: dict[str, int] = {}
        self._scratch: dict[torch.device, torch.Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    def _name_key(self, name: str) -> int:
        key = self._name_keys.get(name)
        if key is None:
            digest = hashlib.blake2b(canonical_name(name).encode("utf-8"), digest_size=8).digest()
            key = self._name_keys[name] = int.from_bytes(digest, "little")
        return key

    def chunk_seed(self, seed: int, name: str, chunk_index: int) -> int:
        """The generator seed of one chunk: a 64-bit hash of (seed, name, chunk index)."""
        return _splitmix64(_splitmix64((seed & _MASK64) ^ self._name_key(name)) ^ chunk_index)

    def _buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Generator]:
        scratch = self._scratch.get(device)
        if scratch is None:
            scratch = self._scratch[device] = torch.empty(self.chunk_size, dtype=torch.float32, device=device)
            self._generators[device] = torch.Generator(device=device)
        return scratch, self._generators[device]

    @torch.no_grad()
    def add_noise_(self, params, seed, alpha, beta=1.0):
        alphas = _per_param(alpha, len(params), "alpha")
        betas = _per_param(beta, len(params), "beta")
        for (name, param), a, b in zip(params, alphas, betas, strict=True):
            if not param.is_contiguous():
                raise ValueError(f"Parameter `{name}` is not contiguous; call `.contiguous()` on it before training.")
            scratch, generator = self._buffers(param.device)
            flat = param.view(-1)
            for chunk_index, start in enumerate(range(0, flat.numel(), self.chunk_size)):
                view = flat[start : start + self.chunk_size]
                z = scratch[: view.numel()]
                generator.manual_seed(self.chunk_seed(seed, name, chunk_index))
                z.normal_(generator=generator)
                if b != 1.0:
                    view.mul_(b)
                view.add_(z, alpha=a)

    def scratch_bytes(self, params):
        devices = {p.device for _, p in params}
        largest = max((p.numel() for _, p in params), default=0)
        return len(devices) * 4 * min(self.chunk_size, largest)


class SequentialGeneratorEngine(PerturbationEngine):
    """The official FedKSeed/MeZO stream: one generator seeded with `seed`, drawn over the parameters in order.

    `z = torch.normal(0, 1, size=p.shape, dtype=p.dtype)` for each parameter in turn, exactly what
    `torch.manual_seed(seed)` followed by the official loop produces, but from a private generator per device, so
    the global RNG is untouched. Use it to reproduce or continue runs of the official code. z depends on the order
    and the set of trained parameters. Scratch memory: one buffer the size of the largest parameter, per dtype and
    device.
    """

    name = "torch-sequential"
    version = 1

    def __init__(self):
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _scratch_for(self, param: torch.Tensor, largest: int) -> torch.Tensor:
        key = (param.device, param.dtype)
        scratch = self._scratch.get(key)
        if scratch is None or scratch.numel() < largest:
            scratch = self._scratch[key] = torch.empty(largest, dtype=param.dtype, device=param.device)
        return scratch

    @torch.no_grad()
    def add_noise_(self, params, seed, alpha, beta=1.0):
        alphas = _per_param(alpha, len(params), "alpha")
        betas = _per_param(beta, len(params), "beta")
        largest = max((p.numel() for _, p in params), default=0)
        generators: dict[torch.device, torch.Generator] = {}
        for (_, param), a, b in zip(params, alphas, betas, strict=True):
            generator = generators.get(param.device)
            if generator is None:
                generator = generators[param.device] = torch.Generator(device=param.device)
                generator.manual_seed(seed & _MASK64)
            z = self._scratch_for(param, largest)[: param.numel()].view_as(param)
            z.normal_(mean=0.0, std=1.0, generator=generator)
            if b != 1.0:
                param.mul_(b)
            param.add_(z, alpha=a)

    def scratch_bytes(self, params):
        largest = max((p.numel() for _, p in params), default=0)
        kinds = {(p.device, p.dtype) for _, p in params}
        return sum(largest * torch.empty((), dtype=dtype).element_size() for _, dtype in kinds)


ENGINES: dict[str, type[PerturbationEngine]] = {
    ChunkedGeneratorEngine.name: ChunkedGeneratorEngine,
    SequentialGeneratorEngine.name: SequentialGeneratorEngine,
}
DEFAULT_ENGINE = ChunkedGeneratorEngine.name


def get_engine(engine: str | PerturbationEngine | None = None) -> PerturbationEngine:
    """Return an engine instance from its name (see `ENGINES`) or pass an instance through.

    Raises:
        ValueError: if the name is unknown.
    """
    if engine is None:
        engine = DEFAULT_ENGINE
    if isinstance(engine, PerturbationEngine):
        return engine
    try:
        return ENGINES[engine]()
    except KeyError:
        raise ValueError(f"Unknown perturbation `engine` {engine!r}; choose one of {sorted(ENGINES)}.") from None
