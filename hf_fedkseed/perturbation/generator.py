"""Engines that draw z from `torch.Generator` streams: per (seed, name, chunk), or the official sequential stream."""

from __future__ import annotations

import torch

from .base import PerturbationEngine, _per_param
from .hashing import MASK64, name_key, splitmix64

__all__ = ["ChunkedGeneratorEngine", "SequentialGeneratorEngine"]


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
        return splitmix64(splitmix64((seed & MASK64) ^ name_key(name)) ^ chunk_index)

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
                generator.manual_seed(seed & MASK64)
            z = self._scratch_for(param, largest)[: param.numel()].view_as(param)
            z.normal_(mean=0.0, std=1.0, generator=generator)
            if b != 1.0:
                param.mul_(b)
            param.add_(z, alpha=a)

    def scratch_bytes(self, params):
        largest = max((p.numel() for _, p in params), default=0)
        kinds = {(p.device, p.dtype) for _, p in params}
        return sum(largest * torch.empty((), dtype=dtype).element_size() for _, dtype in kinds)
