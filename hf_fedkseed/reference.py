"""The naive reference: a ZO step written as the official FedKSeed/MeZO code writes it, for tests and benchmarks.

Kept apart from the library path on purpose. It regenerates z from the *global* RNG (`torch.manual_seed`) four
times per step and rebinds `param.data = param.data + ...`, allocating new tensors every time. The only change from
the official code: each call runs inside `torch.random.fork_rng`, so the caller's global RNG state is left as it was.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["ReferenceZO", "official_no_decay"]


def official_no_decay(name: str) -> bool:
    """The official code's rule: no weight decay on biases and layer norms (by name)."""
    return "bias" in name or "layer_norm" in name or "layernorm" in name


class ReferenceZO:
    """One ZO step at a time, exactly as the official code runs it (`zo_step` with a given seed).

    Args:
        model: the model; its parameters with `requires_grad=True` are trained, in `named_parameters()` order.
        lr, eps, weight_decay: as in the official code (`weight_decay` not on `no_decay` names).
        grad_clip: skip the update when `|L+ - L-|` exceeds it (None: never).
        no_decay: name predicate for parameters without weight decay.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        eps: float,
        weight_decay: float = 0.0,
        grad_clip: float | None = None,
        no_decay: Callable[[str], bool] = official_no_decay,
    ):
        self.model = model
        self.lr = lr
        self.eps = eps
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.no_decay = no_decay
        self.named_parameters_to_optim = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def _perturb_parameters(self, seed: int, scaling_factor: float) -> None:
        torch.manual_seed(seed)
        for _, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data + scaling_factor * z * self.eps

    def _update(self, seed: int, projected_grad: float, lr: float) -> None:
        torch.manual_seed(seed)
        for name, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            if self.no_decay(name):
                param.data = param.data - lr * (projected_grad * z)
            else:
                param.data = param.data - lr * (projected_grad * z + self.weight_decay * param.data)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor], seed: int, lr: float | None = None) -> float | None:
        """Run one ZO step along z(seed); returns the projected gradient, or None when the step was skipped."""
        lr = self.lr if lr is None else lr
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            self._perturb_parameters(seed, 1)
            loss1 = closure()
            self._perturb_parameters(seed, -2)
            loss2 = closure()
            projected_grad = ((loss1 - loss2) / (2 * self.eps)).item()
            self._perturb_parameters(seed, 1)
            if torch.isnan(loss1) or torch.isnan(loss2):
                return None
            if self.grad_clip is not None and abs((loss1 - loss2).item()) > self.grad_clip:
                return None
            self._update(seed, projected_grad, lr)
        return projected_grad
