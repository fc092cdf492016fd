"""Counter-based engines (the default): z[i] is a pure function of (seed, parameter name, i), fused and compiled."""

from __future__ import annotations

import os

import torch

from .base import NamedTensors, PerturbationEngine, _per_param
from .counter_rng import HI_MULT, CounterKernels
from .hashing import MASK64, name_key, splitmix64, to_int32

__all__ = ["CounterEngine", "RademacherCounterEngine"]


class CounterEngine(PerturbationEngine):
    """Counter-based z (the default): z[i] is a pure function of (seed, parameter name, element index i).

    Each element's value comes from a 32-bit hash of its index under a key derived from the seed and the
    parameter's canonical name, turned into a standard normal by Box-Muller (or a sign, with
    `distribution="rademacher"`); see `hf_fedkseed.perturbation.counter_rng` for the exact function. Because no
    generator state is carried from one element to the next, every kernel call covers any slice, in parallel over all
    CPU threads or GPU blocks, and the operations are fused:

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
    eagerly; `prewarm(params)` (which `KSeedZOOptimizer` calls) starts a large model's compilation in a child
    process. On CPU the eager and compiled values are bit-identical (version 2): exact agreement between two parties
    holds for the same model on the same device type, as for every engine.

    Args:
        chunk_size: the most elements one kernel call covers; bounds the temporaries of the eager fallback.
        compile: `True` always compiles, `False` never; `None` (default) reads `HF_FEDKSEED_COMPILE`
            (`auto` | `1` | `0`, default `auto`).
        compile_threshold: with auto compilation, the smallest number of elements compiled.
        version: the z function's version (`VERSIONS`; default the newest). Version 2 takes the Box-Muller square
            root in float64, so CPU's eager and compiled kernels agree bit for bit; version 1 (the platform's
            float32 root, eager values 1 ulp off in places) replays checkpoints and deltas recorded with it.

    Example:
        >>> engine = CounterEngine()
        >>> w = torch.zeros(4)
        >>> engine.add_noise_([("w", w)], seed=7, alpha=1.0)
        >>> torch.equal(w, engine.generate([("w", torch.zeros(4))], seed=7)[0])
        True
    """

    name = "counter"
    VERSIONS = (1, 2)
    version = 2
    distribution = "gaussian"

    def __init__(
        self,
        chunk_size: int = 1 << 24,
        compile: bool | None = None,
        compile_threshold: int = 1 << 22,
        version: int | None = None,
    ):
        if version is not None:
            if version not in self.VERSIONS:
                raise ValueError(
                    f"Engine {self.name!r} has no version {version!r}; this hf_fedkseed knows {list(self.VERSIONS)}. "
                    "Install the hf_fedkseed version that wrote the file (its `hf_fedkseed_version`)."
                )
            self.version = version
        if chunk_size <= 0:
            raise ValueError(f"Invalid `chunk_size`: {chunk_size}; it must be a positive number of elements.")
        if compile is None:
            setting = os.environ.get("HF_FEDKSEED_COMPILE", "auto").strip().lower()
            if setting not in ("auto", "0", "1", "false", "true"):
                raise ValueError(f"HF_FEDKSEED_COMPILE={setting!r}: use `auto`, `1` or `0`.")
            compile = None if setting == "auto" else setting in ("1", "true")
        self.chunk_size = chunk_size
        self.compile = compile
        self.compile_threshold = compile_threshold
        sampler = self.distribution if self.version == max(self.VERSIONS) else f"{self.distribution}/v{self.version}"
        self._kernels = {flag: CounterKernels.get(sampler, flag) for flag in (False, True)}
        self.eager_batch = 1 << 20  # elements (times seeds, in a replay) evaluated together on the eager path

    def kernels_for(self, params: NamedTensors):
        """The compiled kernels, or the eager ones when `compile=False` or (auto) the tensors are too small to gain."""
        if self.compile is None:
            return self._kernels[sum(p.numel() for _, p in params) >= self.compile_threshold]
        return self._kernels[self.compile]

    def prewarm(self, params: NamedTensors) -> bool:
        """Start compiling the kernel these CPU parameters will use in a background process (see `CounterKernels`).

        Returns:
            True if a compilation was started; False if none is needed (eager, compiled already, not on CPU).
        """
        kernels = self.kernels_for(params)
        if not params or not kernels.compile or params[0][1].device.type != "cpu":
            return False
        first = params[0][1]
        return kernels.prewarm(first.dtype, min(self.chunk_size, first.numel()))

    @property
    def compile_seconds(self) -> dict[str, float]:
        """Seconds the first call of each compiled kernel took, by `kernel/device/dtype` (empty until used)."""
        return dict(self._kernels[True].compile_seconds)

    def key(self, seed: int, name: str) -> tuple[int, int]:
        """The two 32-bit words (as Python ints in `[0, 2**32)`) that key z for this seed and parameter name."""
        mixed = splitmix64(splitmix64((seed & MASK64) ^ name_key(name)))
        return mixed & 0xFFFFFFFF, mixed >> 32

    def words(self, seed: int, name: str, high: int) -> tuple[int, ...]:
        """The int32 key words the kernel takes for this seed, parameter, and high word of the element index (folded
        into k0 for parameters over 2**32 elements): `(k0, k1)`."""
        k0, k1 = self.key(seed, name)
        return to_int32(k0 + high * HI_MULT), to_int32(k1)

    @staticmethod
    def _spans(numel: int, span: int):
        """(start, length, high word) of each kernel call: at most `span`, never across a 2**32 boundary."""
        start = 0
        while start < numel:
            length = min(span, numel - start, (1 << 32) - (start & 0xFFFFFFFF))
            yield start, length, start >> 32
            start += length

    @staticmethod
    def _flat(name: str, param: torch.Tensor) -> torch.Tensor:
        if not param.is_contiguous():
            raise ValueError(f"Parameter `{name}` is not contiguous; call `.contiguous()` on it before training.")
        return param.view(-1)

    def _pieces(self, params, seed, span: int):
        """(parameter index, flat slice, first counter, key words) of every call of at most `span` elements."""
        for index, (name, param) in enumerate(params):
            flat = self._flat(name, param)
            for start, length, high in self._spans(flat.numel(), span):
                yield index, flat[start : start + length], start, self.words(seed, name, high)

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
            for index, flat, start, words in self._pieces(params, seed, self._span(kernels)):
                scalars = torch.tensor([alphas[index], betas[index]], dtype=torch.float32, device=flat.device)
                keys = torch.tensor([to_int32(start), *words], dtype=torch.int32, device=flat.device)
                kernels.perturb_(flat, keys, scalars)
            return
        # Eager: many small parameters share one evaluation of the ~60 elementwise operations (per-op overhead
        # dominates small tensors); the arithmetic is the compiled kernel's, element for element.
        sample = kernels.sample
        for batch in self._batches(self._pieces(params, seed, self._span(kernels)), self.eager_batch):
            device = batch[0][1].device
            sizes = torch.tensor([piece[1].numel() for piece in batch], device=device)
            words = torch.tensor([piece[3] for piece in batch], dtype=torch.int32, device=device)
            z = sample(self._batch_counters(batch, device), *words.repeat_interleave(sizes, dim=0).unbind(1))
            offset = 0
            for index, flat, _, _ in batch:
                piece_z = z[offset : offset + flat.numel()]
                offset += flat.numel()
                if betas[index] == 1.0 and flat.dtype == torch.float32:
                    flat.add_(alphas[index] * piece_z)  # the kernel's 1.0 * p + alpha * z, rounded the same way
                else:
                    flat.copy_(betas[index] * flat.to(torch.float32) + alphas[index] * piece_z)

    @torch.no_grad()
    def replay_(self, params, seeds, coefficients):
        """Add `sum_j coefficients[j] * z(seeds[j])` to `params` in place by one of three paths, same values.

        - compiled, CPU: one fused perturb pass per seed (`_replay_per_seed`);
        - compiled, other devices (CUDA): the seed loop inside one replay kernel (`_replay_fused`);
        - eager (`compile=False`, or auto and too small to compile): batched torch ops (`_replay_eager`).

        Returns:
            The number of seeds actually applied (those with a non-zero coefficient).
        """
        pairs = [(int(s), float(c)) for s, c in zip(seeds, coefficients, strict=True) if float(c) != 0.0]
        if not pairs:
            return 0
        kernels = self.kernels_for(params)
        # the keys of every (seed, piece): pieces are the same for every seed
        per_seed = [list(self._pieces(params, seed, self._span(kernels))) for seed, _ in pairs]
        coefs = [c for _, c in pairs]
        if kernels.compile and params and params[0][1].device.type == "cpu":
            self._replay_per_seed(kernels, per_seed, coefs)
        elif kernels.compile:
            self._replay_fused(kernels, per_seed, coefs)
        else:
            self._replay_eager(kernels.sample, per_seed, coefs)
        return len(pairs)

    @staticmethod
    def _replay_per_seed(kernels: CounterKernels, per_seed, coefs: list[float]) -> None:
        """Compiled, on CPU: one fused pass of the perturb kernel per (piece, seed)."""
        # On CPU generating z is compute-bound (about 0.3 G values/s on 2 cores against GB/s of memory traffic),
        # so one fused pass per seed costs the same as the in-kernel seed loop of `_replay_fused`, and it reuses the
        # perturb kernel instead of compiling the much slower-to-compile reduction (measured 205 s vs 6 s).
        for index, (_, flat, start, _) in enumerate(per_seed[0]):
            for pieces, coefficient in zip(per_seed, coefs, strict=True):
                keys = torch.tensor([to_int32(start), *pieces[index][3]], dtype=torch.int32)
                scalars = torch.tensor([coefficient, 1.0], dtype=torch.float32)
                kernels.perturb_(flat, keys, scalars)

    @staticmethod
    def _replay_fused(kernels: CounterKernels, per_seed, coefs: list[float]) -> None:
        """Compiled, on CUDA (any non-CPU device): the loop over seeds inside one kernel, one pass per piece."""
        for piece_index, (_, flat, start, _) in enumerate(per_seed[0]):
            seed_keys = torch.tensor(
                [pieces[piece_index][3] for pieces in per_seed], dtype=torch.int32, device=flat.device
            )
            first = torch.tensor(to_int32(start), dtype=torch.int32, device=flat.device)
            kernels.replay_(flat, first, seed_keys, torch.tensor(coefs, dtype=torch.float32, device=flat.device))

    def _replay_eager(self, sample, per_seed, coefs: list[float]) -> None:
        """Eager: batches of small pieces, and groups of seeds, so that [seeds, elements] stays within eager_batch."""
        positions = range(len(per_seed[0]))
        for batch in self._batches(((i, *per_seed[0][i][1:]) for i in positions), self.eager_batch):
            device = batch[0][1].device
            sizes = torch.tensor([piece[1].numel() for piece in batch], device=device)
            counters = self._batch_counters(batch, device)
            total = torch.zeros(counters.numel(), dtype=torch.float32, device=device)
            group = max(1, self.eager_batch // counters.numel())
            for first_seed in range(0, len(coefs), group):
                chosen = range(first_seed, min(first_seed + group, len(coefs)))
                words = torch.tensor([[per_seed[j][p[0]][3] for p in batch] for j in chosen], dtype=torch.int32)
                words = words.to(device).repeat_interleave(sizes, dim=1)  # [seeds, elements, words]
                c = torch.tensor([coefs[j] for j in chosen], dtype=torch.float32, device=device)
                total += (sample(counters[None, :], *words.unbind(2)) * c[:, None]).sum(0)
            offset = 0
            for _, flat, _, _ in batch:
                flat.copy_(flat.to(torch.float32) + total[offset : offset + flat.numel()])
                offset += flat.numel()


class RademacherCounterEngine(CounterEngine):
    """`CounterEngine` with +1/-1 entries: the sign bit of the same hash (bit-identical on every device)."""

    name = "counter-rademacher"
    VERSIONS = (1,)
    version = 1
    distribution = "rademacher"
    device_independent = True  # integer hashing only: the same z on every device type (a delta may move across)
