"""FedKSeed-Pro: per-seed gradient statistics, their importance, and the official seed sampling distribution."""

from __future__ import annotations

import torch

from .updates import CheckedUpdate

__all__ = [
    "DEFAULT_PRO_CLIP",
    "DEFAULT_PRO_GRAD_INITIAL",
    "add_pro_statistics",
    "pro_importance",
    "pro_probabilities",
]

# The official FedKSeed code's `--bias_loss_clip` default: |g| beyond it counts as this much in Pro importance.
DEFAULT_PRO_CLIP = 1000.0
# The official code's `--grad_initial` default: every seed's gradient history starts with this one entry.
DEFAULT_PRO_GRAD_INITIAL = 0.0
# The official code's min-max normalisation adds this to the denominator so equal importances do not divide by 0.
_MIN_MAX_EPS = 1e-10


def pro_probabilities(importance: torch.Tensor) -> torch.Tensor:
    """The official FedKSeed-Pro seed sampling distribution over per-seed importances (float64, sums to one).

    `softmax((imp - min(imp)) / (max(imp) + 1e-10 - min(imp)))` over all K seeds: uniform when every importance is
    equal, and at most e times likelier for the most important seed.

    Example:
        >>> pro_probabilities(torch.tensor([0.0, 1.0], dtype=torch.float64))  # [1 / (1 + e), e / (1 + e)]
        tensor([0.2689, 0.7311], dtype=torch.float64)
    """
    low = importance.min()
    normalized = (importance - low) / (importance.max() + _MIN_MAX_EPS - low)
    exps = torch.exp(normalized - normalized.max())
    probabilities = exps / exps.sum()
    return probabilities / probabilities.sum()  # the official code renormalises when the sum is not 1.0


def pro_importance(
    pro_count: torch.Tensor, pro_abs_sum: torch.Tensor, *, pro_clip: float, pro_grad_initial: float | None
) -> torch.Tensor:
    """Per seed, the mean `|clip(g, -pro_clip, pro_clip)|` of the official code's gradient history (float64).

    Args:
        pro_count: per seed, how many scalar gradients were seen (int64, K).
        pro_abs_sum: per seed, the sum of their `|clip(g)|` (float64, K).
        pro_clip: the clip bound of the sums.
        pro_grad_initial: the entry every seed's history starts with (`--grad_initial`); None drops it, so a
            seed never seen has importance 0.
    """
    if pro_grad_initial is None:
        return torch.where(pro_count > 0, pro_abs_sum / pro_count.clamp(min=1), 0.0)
    initial = min(abs(pro_grad_initial), pro_clip)
    return (pro_abs_sum + initial) / (pro_count + 1)


def add_pro_statistics(
    valid: list[CheckedUpdate], pro_count: torch.Tensor, pro_abs_sum: torch.Tensor, *, pro_clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """New Pro counts and `|clip(g)|` sums per seed with every projected gradient of `valid` added.

    Args:
        valid: the accepted updates, each with `projected_grads`, in ascending client id (the float sums do not
            depend on arrival order).
        pro_count: the counts so far (int64, K); not changed.
        pro_abs_sum: the sums so far (float64, K); not changed.
        pro_clip: |g| beyond it counts as `pro_clip`.
    """
    pro_count, pro_abs_sum = pro_count.clone(), pro_abs_sum.clone()
    for checked in valid:
        pro_count.index_add_(0, checked.seed_indices, torch.ones_like(checked.seed_indices))
        clipped = checked.projected_grads.clamp(-pro_clip, pro_clip).abs()
        pro_abs_sum.index_add_(0, checked.seed_indices, clipped)
    return pro_count, pro_abs_sum
