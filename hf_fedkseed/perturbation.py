"""Perturbation engines: regenerate z(seed, parameter) and add `alpha * z` to parameters in place (pure torch)."""

from __future__ import annotations

import functools
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

import torch

NamedTensors = Sequence[tuple[str, torch.Tensor]]

_MASK64 = (1 << 64) - 1
_HI_MULT = 0x85EBCA6B  # mixes the high word of an element index (parameters over 2**32 elements) into the key


def _to_int32(value: int) -> int:
    """The low 32 bits of an integer as the signed int32 value torch stores."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= (1 << 31) else value


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


@functools.lru_cache(maxsize=65536)
def _name_key(name: str) -> int:
    """A 64-bit hash of a parameter's canonical name: the part of every engine's key that says which weight it is."""
    digest = hashlib.blake2b(canonical_name(name).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


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
        self._scratch: dict[torch.device, torch.Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    def chunk_seed(self, seed: int, name: str, chunk_index: int) -> int:
        """The generator seed of one chunk: a 64-bit hash of (seed, name, chunk index)."""
        return _splitmix64(_splitmix64((seed & _MASK64) ^ _name_key(name)) ^ chunk_index)

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


class CounterEngine(PerturbationEngine):
    """Counter-based z (the default): z[i] is a pure function of (seed, parameter name, element index i).

    Each element's value comes from a 32-bit hash of its index under a key derived from the seed and the
    parameter's canonical name, turned into a standard normal by Box-Muller (or a sign, with
    `distribution="rademacher"`); see `hf_fedkseed.counter_rng` for the exact function. Because no generator state
    is carried from one element to the next, every kernel call covers any slice, in parallel over all CPU threads or
    GPU blocks, and the operations are fused:

    - `add_noise_`: `p <- beta * p + alpha * z` is one read and one write of each parameter (the perturbation, and
      the restore-and-update of a step with its weight decay);
    - `replay_`: `p <- p + sum_j c_j z_j` for many seeds (seeds whose coefficient is zero are skipped). On CUDA the
      loop over seeds runs inside one kernel, so each parameter is read and written once; on CPU, where generating
      z is compute-bound, each seed is one fused pass of the perturbation kernel (same speed, one compilation).

    The kernels are torch operations compiled by `torch.compile` (Inductor's C++ on CPU, Triton on GPU), once for
    every parameter shape; without a working compiler the same operations run eagerly with the same values on CPU.
    No scratch memory beyond the kernels' own temporaries of one chunk (`chunk_size` elements) is used.

    Compiling costs tens of seconds on first use (per device type and dtype; Inductor caches the result on disk),
    so by default (`compile=None`, or `HF_FEDKSEED_COMPILE=auto`) the kernels are compiled only for parameter sets
    of at least `compile_threshold` elements, where generation time matters; smaller models run the same function
    eagerly. On CPU the eager and compiled values agree to 1e-6 (measured max 4.8e-7 over 3M values): exact
    agreement between two parties holds for the same model on the same device type, as for every engine.

    Args:
        chunk_size: the most elements one kernel call covers; bounds the temporaries of the eager fallback.
        compile: `True` always compiles, `False` never; `None` (default) reads `HF_FEDKSEED_COMPILE`
            (`auto` | `1` | `0`, default `auto`).
        compile_threshold: with auto compilation, the smallest number of elements compiled.

    Example:
        >>> engine = CounterEngine()
        >>> w = torch.zeros(4)
        >>> engine.add_noise_([("w", w)], seed=7, alpha=1.0)
        >>> torch.equal(w, engine.generate([("w", torch.zeros(4))], seed=7)[0])
        True
    """

    name = "counter"
    version = 1
    distribution = "gaussian"

    def __init__(self, chunk_size: int = 1 << 24, compile: bool | None = None, compile_threshold: int = 1 << 22):
        if chunk_size <= 0:
            raise ValueError(f"Invalid `chunk_size`: {chunk_size}; it must be a positive number of elements.")
        if compile is None:
            setting = os.environ.get("HF_FEDKSEED_COMPILE", "auto").strip().lower()
            if setting not in ("auto", "0", "1", "false", "true"):
                raise ValueError(f"HF_FEDKSEED_COMPILE={setting!r}: use `auto`, `1` or `0`.")
            compile = None if setting == "auto" else setting in ("1", "true")
        from .counter_rng import CounterKernels

        self.chunk_size = chunk_size
        self.compile = compile
        self.compile_threshold = compile_threshold
        self._kernels = {flag: CounterKernels.get(self.distribution, flag) for flag in (False, True)}
        self.eager_batch = 1 << 20  # elements (times seeds, in a replay) evaluated together on the eager path

    def kernels_for(self, params: NamedTensors):
        """The compiled kernels, or the eager ones when `compile=False` or (auto) the tensors are too small to gain."""
        if self.compile is None:
            return self._kernels[sum(p.numel() for _, p in params) >= self.compile_threshold]
        return self._kernels[self.compile]

    @property
    def compile_seconds(self) -> dict[str, float]:
        """Seconds the first call of each compiled kernel took, by `kernel/device/dtype` (empty until used)."""
        return dict(self._kernels[True].compile_seconds)

    def key(self, seed: int, name: str) -> tuple[int, int]:
        """The two 32-bit words (as Python ints in `[0, 2**32)`) that key z for this seed and parameter name."""
        mixed = _splitmix64(_splitmix64((seed & _MASK64) ^ _name_key(name)))
        return mixed & 0xFFFFFFFF, mixed >> 32

    @staticmethod
    def _spans(numel: int, span: int):
        """(start, length, high word) of each kernel call: at most `span`, never across a 2**32 boundary."""
        start = 0
        while start < numel:
            length = min(span, numel - start, (1 << 32) - (start & 0xFFFFFFFF))
            yield start, length, start >> 32
            start += length

    def _pieces(self, params, seed, span: int):
        """(parameter index, flat slice, first counter, k0, k1) of every call of at most `span` elements, in order."""
        for index, (name, param) in enumerate(params):
            if not param.is_contiguous():
                raise ValueError(f"Parameter `{name}` is not contiguous; call `.contiguous()` on it before training.")
            k0, k1 = self.key(seed, name)
            flat = param.view(-1)
            for start, length, high in self._spans(flat.numel(), span):
                yield index, flat[start : start + length], start, _to_int32(k0 + high * _HI_MULT), _to_int32(k1)

    def _span(self, kernels) -> int:
        # the eager path materialises its ~60 intermediate results: keep each call small
        return self.chunk_size if kernels.compile else min(self.chunk_size, self.eager_batch)

    @staticmethod
    def _batches(pieces, limit: int):
        """Group consecutive pieces into lists of at most `limit` elements (a larger piece forms its own batch)."""
        batch, size = [], 0
        for piece in pieces:
            if batch and size + piece[1].numel() > limit:
                yield batch
                batch, size = [], 0
            batch.append(piece)
            size += piece[1].numel()
        if batch:
            yield batch

    @staticmethod
    def _batch_counters(batch, device) -> torch.Tensor:
        return torch.cat([torch.arange(p[1].numel(), dtype=torch.int32, device=device) + p[2] for p in batch])

    @torch.no_grad()
    def add_noise_(self, params, seed, alpha, beta=1.0):
        alphas = _per_param(alpha, len(params), "alpha")
        betas = _per_param(beta, len(params), "beta")
        kernels = self.kernels_for(params)
        if kernels.compile:
            for index, flat, start, k0, k1 in self._pieces(params, seed, self._span(kernels)):
                scalars = torch.tensor([alphas[index], betas[index]], dtype=torch.float32, device=flat.device)
                keys = torch.tensor([_to_int32(start), k0, k1], dtype=torch.int32, device=flat.device)
                kernels.perturb_(flat, keys, scalars)
            return
        # Eager: many small parameters share one evaluation of the ~60 elementwise operations (per-op overhead
        # dominates small tensors); the arithmetic is the compiled kernel's, element for element.
        sample = kernels.sample
        for batch in self._batches(self._pieces(params, seed, self._span(kernels)), self.eager_batch):
            device = batch[0][1].device
            sizes = torch.tensor([piece[1].numel() for piece in batch], device=device)
            k0 = torch.tensor([piece[3] for piece in batch], dtype=torch.int32, device=device).repeat_interleave(sizes)
            k1 = torch.tensor([piece[4] for piece in batch], dtype=torch.int32, device=device).repeat_interleave(sizes)
            z = sample(self._batch_counters(batch, device), k0, k1)
            offset = 0
            for index, flat, _, _, _ in batch:
                piece_z = z[offset : offset + flat.numel()]
                offset += flat.numel()
                if betas[index] == 1.0 and flat.dtype == torch.float32:
                    flat.add_(alphas[index] * piece_z)  # the kernel's 1.0 * p + alpha * z, rounded the same way
                else:
                    flat.copy_(betas[index] * flat.to(torch.float32) + alphas[index] * piece_z)

    @torch.no_grad()
    def replay_(self, params, seeds, coefficients):
        pairs = [(int(s), float(c)) for s, c in zip(seeds, coefficients, strict=True) if float(c) != 0.0]
        if not pairs:
            return 0
        kernels = self.kernels_for(params)
        # the keys of every (seed, piece): pieces are the same for every seed
        per_seed = [list(self._pieces(params, seed, self._span(kernels))) for seed, _ in pairs]
        coefs = [c for _, c in pairs]
        if kernels.compile and params and params[0][1].device.type == "cpu":
            # On CPU generating z is compute-bound (about 0.3 G values/s on 2 cores against GB/s of memory traffic),
            # so one fused pass per seed costs the same as the in-kernel seed loop below, and it reuses the perturb
            # kernel instead of compiling the much slower-to-compile reduction (measured 205 s vs 6 s).
            for index, (_, flat, start, _, _) in enumerate(per_seed[0]):
                for pieces, coefficient in zip(per_seed, coefs, strict=True):
                    keys = torch.tensor([_to_int32(start), pieces[index][3], pieces[index][4]], dtype=torch.int32)
                    scalars = torch.tensor([coefficient, 1.0], dtype=torch.float32)
                    kernels.perturb_(flat, keys, scalars)
            return len(pairs)
        if kernels.compile:
            for piece_index, (_, flat, start, _, _) in enumerate(per_seed[0]):
                seed_keys = torch.tensor(
                    [[pieces[piece_index][3], pieces[piece_index][4]] for pieces in per_seed],
                    dtype=torch.int32,
                    device=flat.device,
                )
                first = torch.tensor(_to_int32(start), dtype=torch.int32, device=flat.device)
                kernels.replay_(flat, first, seed_keys, torch.tensor(coefs, dtype=torch.float32, device=flat.device))
            return len(pairs)
        # Eager: batches of small pieces, and groups of seeds, so that [seeds, elements] stays within eager_batch.
        sample = kernels.sample
        positions = range(len(per_seed[0]))
        for batch in self._batches(((i, *per_seed[0][i][1:]) for i in positions), self.eager_batch):
            device = batch[0][1].device
            sizes = torch.tensor([piece[1].numel() for piece in batch], device=device)
            counters = self._batch_counters(batch, device)
            total = torch.zeros(counters.numel(), dtype=torch.float32, device=device)
            group = max(1, self.eager_batch // counters.numel())
            for first_seed in range(0, len(pairs), group):
                chosen = range(first_seed, min(first_seed + group, len(pairs)))
                k0 = torch.tensor([[per_seed[j][p[0]][3] for p in batch] for j in chosen], dtype=torch.int32)
                k1 = torch.tensor([[per_seed[j][p[0]][4] for p in batch] for j in chosen], dtype=torch.int32)
                k0 = k0.to(device).repeat_interleave(sizes, dim=1)
                k1 = k1.to(device).repeat_interleave(sizes, dim=1)
                c = torch.tensor([coefs[j] for j in chosen], dtype=torch.float32, device=device)
                total += (sample(counters[None, :], k0, k1) * c[:, None]).sum(0)
            offset = 0
            for _, flat, _, _, _ in batch:
                flat.copy_(flat.to(torch.float32) + total[offset : offset + flat.numel()])
                offset += flat.numel()
        return len(pairs)


class RademacherCounterEngine(CounterEngine):
    """`CounterEngine` with +1/-1 entries: the sign bit of the same hash (bit-identical on every device)."""

    name = "counter-rademacher"
    version = 1
    distribution = "rademacher"
    device_independent = True  # integer hashing only: the same z on every device type (a delta may move across)


ENGINES: dict[str, type[PerturbationEngine]] = {
    CounterEngine.name: CounterEngine,
    RademacherCounterEngine.name: RademacherCounterEngine,
    ChunkedGeneratorEngine.name: ChunkedGeneratorEngine,
    SequentialGeneratorEngine.name: SequentialGeneratorEngine,
}
DEFAULT_ENGINE = CounterEngine.name


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
