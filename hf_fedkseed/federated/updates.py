"""What a round exchanges: client updates, their per-update validation, and the round's result and delta."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .wire import _as_int64_indices, _first_non_finite, _first_out_of_range

__all__ = [
    "SANITY_MAX_ABS_ACCUMULATOR",
    "SANITY_MAX_ABS_SCALAR",
    "AggregationResult",
    "CheckedUpdate",
    "ClientUpdate",
    "SparseVector",
    "validate_update",
]

# Absolute sanity bounds, for what nothing can be compared with (a round of one or two clients). An honest |lr * g| is
# around 1e-7 .. 1e-2; 1e3 per step is absurd for any model yet keeps `w0 - sum_j A_j z_j` far inside float32 and
# bfloat16 range, as does an accumulator bound of 1e6 (every |A_j| <= 1e6, z ~ N(0, 1)).
SANITY_MAX_ABS_SCALAR = 1e3
SANITY_MAX_ABS_ACCUMULATOR = 1e6


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class ClientUpdate:
    """What one client sends back after its local ZO steps of a round.

    Args:
        client_id: the client's id in `[0, num_clients)`.
        num_samples: the client's training sample count, the weight of "samples" aggregation.
        seed_indices: the seed index (into the pool) of each local step.
        scalars: `lr_t * g_t` of each local step: what the step added to the client's `accumulators[idx_t]`.
        projected_grads: `g_t` of each local step, the statistic of FedKSeed-Pro; needed when the server has
            `pro=True`, optional (but checked when given) otherwise.
        server_round: the round the client answers (an `UpdateMessage`'s header); when set it must be the round
            being aggregated, so a replayed update of an earlier round is rejected. The runtimes always set it.
        num_seeds: the K of the client's header; when set it must be the server's K.

    Example:
        >>> ClientUpdate(client_id=3, num_samples=120, seed_indices=[7, 7, 12], scalars=[1e-6, -2e-6, 5e-7])
    """

    client_id: int
    num_samples: int
    seed_indices: Sequence[int] | torch.Tensor
    scalars: Sequence[float] | torch.Tensor
    projected_grads: Sequence[float] | torch.Tensor | None = None
    server_round: int | None = None
    num_seeds: int | None = None


@dataclass
class SparseVector:
    """Some entries of a length-K vector: `dense[indices] = values` (or `+=`, for a delta).

    Args:
        indices: ascending int64 positions.
        values: float64 values, one per index.

    Example:
        >>> sparse = SparseVector(torch.tensor([1, 3]), torch.tensor([0.5, -2.0], dtype=torch.float64))
        >>> sparse.to_dense(4)
        tensor([ 0.0000,  0.5000,  0.0000, -2.0000], dtype=torch.float64)
    """

    indices: torch.Tensor
    values: torch.Tensor

    def __len__(self) -> int:
        return self.indices.numel()

    def to_dense(self, size: int) -> torch.Tensor:
        """The length-`size` float64 vector that holds `values` at `indices` and zero elsewhere."""
        dense = torch.zeros(size, dtype=torch.float64)
        dense[self.indices] = self.values
        return dense


@dataclass
class AggregationResult:
    """The outcome of `KSeedServer.aggregate` for one round.

    Args:
        round: the round that was aggregated.
        accepted: ids of the clients whose updates were added, ascending.
        rejected: `{client_id: reason}` for every update left out; none of them touched the server state.
        weights: `{client_id: w_c}` of the accepted clients (they sum to one when any was accepted): each client's
            share before clipping, `n_c / sum(n)` over the accepted clients (or `1 / m`).
        seeds_touched: how many distinct seed indices the accepted updates used.
        delta: the change of the accumulators: `new = old + delta.to_dense(K)`, over the touched seeds.
        weighting: which weights were used: "known_counts" (counts the runtime passed), "capped" (the clients'
            claimed counts, capped) or "equal".
        clipped: `{client_id: factor}` of the accepted clients whose coefficient vector was scaled down by the
            norm bound (factor < 1).
        linear: True when `delta = sum_c weights[c] * (the client's per-seed sums)` exactly (a weighted mean without
            clipping), so a runtime may apply the round as the weighted sum of the clients' weight changes.
        effective_weights: for the weighted means ("samples", "equal", "norm_bound"), `{client_id: s_c}` with
            `delta = sum_c s_c * (the client's per-seed sums)` exactly: `s_c = weights[c] * clipped.get(c, 1.0)`, a
            clipped client keeps its share and only its contribution is scaled. None for the coordinate-wise
            statistics ("trimmed_mean", "median"), which are not linear in the updates.

    Example:
        >>> result = server.aggregate(0, updates)
        >>> result.accepted, result.rejected
        ([2, 5], {9: 'client 9 was not selected in round 0'})
    """

    round: int
    accepted: list[int]
    rejected: dict[int, str]
    weights: dict[int, float]
    seeds_touched: int
    delta: SparseVector = field(repr=False)
    weighting: str = "equal"
    clipped: dict[int, float] = field(default_factory=dict)
    linear: bool = True
    effective_weights: dict[int, float] | None = None


@dataclass
class CheckedUpdate:
    """A `ClientUpdate` that passed `validate_update`, in tensor form.

    Args:
        client_id: the client's id, a selected one.
        num_samples: the client's claimed sample count.
        seed_indices: int64 seed indices in `[0, K)`, one per step.
        scalars: finite float64 `lr * g`, one per step.
        projected_grads: finite float64 `g`, one per step, or None when the client sent none.
    """

    client_id: int
    num_samples: int
    seed_indices: torch.Tensor  # int64
    scalars: torch.Tensor  # float64
    projected_grads: torch.Tensor | None  # float64

    def coefficients(self, num_seeds: int) -> torch.Tensor:
        """The client's per-seed sums of its scalars: what its steps added to each accumulator (float64, K)."""
        return torch.zeros(num_seeds, dtype=torch.float64).index_add_(0, self.seed_indices, self.scalars)


def validate_update(
    update: ClientUpdate,
    round: int,
    selected: set[int],
    *,
    num_seeds: int,
    aggregation: str,
    pro: bool,
    max_abs_scalar: float | None,
) -> CheckedUpdate | str:
    """The update in checked tensor form, or the reason it is rejected; nothing a client sends is trusted.

    Args:
        update: the client's `ClientUpdate` (or decoded `UpdateMessage`), any object with its fields.
        round: the round being aggregated.
        selected: the ids of the clients selected in `round`.
        num_seeds: K, the server's seed pool size.
        aggregation: the server's aggregation; "samples" and "norm_bound" need `num_samples >= 1`.
        pro: whether the server runs FedKSeed-Pro, which needs `projected_grads`.
        max_abs_scalar: an optional bound on every `|scalar|`, on top of `SANITY_MAX_ABS_SCALAR`.

    Returns:
        A `CheckedUpdate`, or a string saying why the update is rejected.
    """
    client_id = getattr(update, "client_id", None)
    if not _is_int(client_id) or int(client_id) not in selected:
        return f"client {client_id!r} was not selected in round {round}"
    client_id = int(client_id)
    claimed_round = getattr(update, "server_round", None)
    if claimed_round is not None and (not _is_int(claimed_round) or claimed_round != round):
        return f"the update answers round {claimed_round!r}, not round {round}; a replayed or late update"
    claimed_seeds = getattr(update, "num_seeds", None)
    if claimed_seeds is not None and (not _is_int(claimed_seeds) or claimed_seeds != num_seeds):
        return f"the update is for K={claimed_seeds!r} seeds but the server has K={num_seeds}"
    num_samples = getattr(update, "num_samples", None)
    least = 1 if aggregation in ("samples", "norm_bound") else 0
    if not _is_int(num_samples) or num_samples < least:
        return f"`num_samples` is {num_samples!r}; {aggregation!r} weighting needs an integer >= {least}"
    try:
        seed_indices = torch.as_tensor(update.seed_indices).detach().cpu()
        scalars = torch.as_tensor(update.scalars, dtype=torch.float64).detach().cpu().clone()
        grads = update.projected_grads
        if grads is not None:
            grads = torch.as_tensor(grads, dtype=torch.float64).detach().cpu().clone()
    except (AttributeError, TypeError, ValueError, RuntimeError) as error:
        return f"the per-step values could not be read as numbers: {error}"
    indices = _as_int64_indices(seed_indices)
    if indices is None:
        return f"`seed_indices` must be integers, got dtype {seed_indices.dtype}"
    seed_indices = indices
    if grads is None and pro:
        return "`projected_grads` is missing; FedKSeed-Pro (`pro=True`) needs the g of every step"
    if seed_indices.ndim != 1 or scalars.ndim != 1 or (grads is not None and grads.ndim != 1):
        return "`seed_indices`, `scalars` and `projected_grads` must be flat lists, one entry per step"
    steps = seed_indices.numel()
    if scalars.numel() != steps or (grads is not None and grads.numel() != steps):
        sizes = f"{steps} seed indices, {scalars.numel()} scalars"
        if grads is not None:
            sizes += f", {grads.numel()} projected grads"
        return f"length mismatch: {sizes}; every step needs one of each"
    position = _first_out_of_range(seed_indices, num_seeds)
    if position is not None:
        return f"seed index {seed_indices[position].item()} is outside [0, {num_seeds})"
    if _first_non_finite(scalars) is not None:
        return "a scalar (lr * g) is not finite"
    if grads is not None and _first_non_finite(grads) is not None:
        return "a projected gradient g is not finite"
    if max_abs_scalar is not None and steps and scalars.abs().max().item() > max_abs_scalar:
        return f"|scalar| {scalars.abs().max().item():.6g} exceeds `max_abs_scalar`={max_abs_scalar:.6g}"
    if steps and scalars.abs().max().item() > SANITY_MAX_ABS_SCALAR:
        return (
            f"|scalar| {scalars.abs().max().item():.6g} exceeds the sanity bound SANITY_MAX_ABS_SCALAR="
            f"{SANITY_MAX_ABS_SCALAR:g}; no honest lr * g comes near it"
        )
    return CheckedUpdate(client_id, int(num_samples), seed_indices, scalars, grads)
