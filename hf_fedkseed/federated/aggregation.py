"""How a round's validated updates combine: outlier screening, weights, weighted means, robust statistics, bounds."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .updates import SANITY_MAX_ABS_ACCUMULATOR, CheckedUpdate

__all__ = [
    "AGGREGATIONS",
    "COUNT_CAP_FACTOR",
    "COUNT_WEIGHTED",
    "MIN_CLIENTS_TO_COMPARE",
    "OUTLIER_NORM_FACTOR",
    "OUTLIER_SCALAR_FACTOR",
    "TRIM_FRACTION",
    "WEIGHTINGS",
    "client_weight",
    "combine",
    "coordinate_wise",
    "effective_weight",
    "overflowing_client",
    "round_weights",
    "screen",
]

# How the accepted updates are combined. "samples" and "equal" are the official code's weighted means; the robust
# choices cost O(K x clients) scalar operations per round, nothing next to one forward pass of the model.
AGGREGATIONS = ("samples", "equal", "trimmed_mean", "median", "norm_bound")
# The aggregations that weigh each client by its sample count (the others weigh clients equally).
COUNT_WEIGHTED = ("samples", "norm_bound")
# Which weights a round used (`AggregationResult.weighting`): counts the runtime knows (the partition sizes), the
# clients' claimed counts capped at COUNT_CAP_FACTOR x the round's median claim, or one share each.
WEIGHTINGS = ("known_counts", "capped", "equal")
# Scale-free screening needs a majority to compare against: with fewer clients holding a non-zero update, either of
# two could be the outlier, so only the absolute bounds below apply.
MIN_CLIENTS_TO_COMPARE = 3
# A client whose largest |scalar| exceeds this many times the round's median client maximum is rejected. Honest
# clients share the model, the learning rate and the loss scale, so their maxima agree within a few times even on
# non-iid shards; 10x leaves room for that and still stops absurd per-step values (including ones that cancel inside
# one seed and so would not show in the norm below).
OUTLIER_SCALAR_FACTOR = 10.0
# Each client's vector of per-seed coefficients is clipped to this many times the round's median client norm. Honest
# clients draw different seeds, so their vectors are near-orthogonal and an honest round of m clients moves about
# sqrt(m) N / m (N: the median norm). An attacker clipped to c N, even aligned with the honest sum, moves it at most
# (sqrt(m - 1) + c) N / m, i.e. (sqrt(m - 1) + c) / sqrt(m) times as far: with c = 2 that is <= 1.97 for every m >= 3
# (1.79 for m = 5), the "at most 2x an honest round" guarantee. This needs the clipped client to keep its unclipped
# weight share (the norm bounding of FL: clip each update, then average with the original weights, as in Sun et al.
# 2019): clipping scales only that client's contribution and never raises the others' shares, so the honest part of
# the round still moves (m - 1) / m of its unattacked self and the attacker at most c N / m. `norm_bound` aggregation
# clips at 1x instead.
OUTLIER_NORM_FACTOR = 2.0
# Without known counts, a client's claimed sample count is capped at this many times the round's median claim.
COUNT_CAP_FACTOR = 4.0
# `trimmed_mean` drops this share of the values of a seed at each end (rounded down: nothing below 5 clients).
TRIM_FRACTION = 0.2


def screen(
    valid: list[CheckedUpdate], rejected: dict[int, str], *, num_seeds: int, aggregation: str
) -> tuple[list[CheckedUpdate], dict[int, float]]:
    """Scale-free screening: reject scalar outliers, then clip long coefficient vectors to the round's norm.

    Args:
        valid: the round's validated updates, in ascending client id.
        rejected: `{client_id: reason}`; the scalar outliers are added to it.
        num_seeds: K.
        aggregation: one of `AGGREGATIONS`; "norm_bound" clips at 1x the median norm, the others at
            `OUTLIER_NORM_FACTOR`.

    Returns:
        The updates that are kept and `{client_id: scale}` of each of them (1.0 unless clipped).
    """
    scales = {checked.client_id: 1.0 for checked in valid}
    maxima = {c.client_id: c.scalars.abs().max().item() for c in valid if c.scalars.numel()}
    nonzero = [value for value in maxima.values() if value > 0]
    if len(nonzero) >= MIN_CLIENTS_TO_COMPARE:
        median = torch.tensor(nonzero, dtype=torch.float64).median().item()  # the lower median
        bound = OUTLIER_SCALAR_FACTOR * median
        for client_id, value in maxima.items():
            if value > bound:
                rejected[client_id] = (
                    f"|scalar| {value:.6g} is more than {OUTLIER_SCALAR_FACTOR:g} x the round's median client "
                    f"maximum {median:.6g}; an outlier"
                )
        valid = [checked for checked in valid if checked.client_id not in rejected]
    norms = {c.client_id: c.coefficients(num_seeds).norm().item() for c in valid}
    nonzero = [value for value in norms.values() if value > 0]
    if len(nonzero) >= MIN_CLIENTS_TO_COMPARE:
        factor = 1.0 if aggregation == "norm_bound" else OUTLIER_NORM_FACTOR
        bound = factor * torch.tensor(nonzero, dtype=torch.float64).median().item()
        for client_id, value in norms.items():
            if value > bound:
                scales[client_id] = bound / value
    return valid, scales


def client_weight(aggregation: str, num_samples: int) -> float:
    """A client's aggregation weight before normalisation: its sample count (`COUNT_WEIGHTED` aggregations) or 1.

    Pass a count the runtime knows (the partition size), never one a client claims. Every method uses it: FedKSeed's
    server and the weight-averaging baselines.
    """
    return float(num_samples) if aggregation in COUNT_WEIGHTED else 1.0


def round_weights(
    valid: list[CheckedUpdate], sample_counts: Mapping[int, int] | None, aggregation: str
) -> tuple[dict[int, float], str]:
    """The normalised weights of the accepted clients and the name of the weighting (one of `WEIGHTINGS`).

    Args:
        valid: the accepted updates.
        sample_counts: `{client_id: n}` the runtime knows, or None to cap the claimed counts.
        aggregation: one of `AGGREGATIONS`; only "samples" and "norm_bound" weigh by counts.
    """
    if not valid:
        return {}, "equal"
    if aggregation not in COUNT_WEIGHTED:
        raw = {checked.client_id: 1.0 for checked in valid}
        weighting = "equal"
    elif sample_counts is not None:
        raw = {checked.client_id: float(sample_counts[checked.client_id]) for checked in valid}
        weighting = "known_counts"
    else:
        claims = torch.tensor([checked.num_samples for checked in valid], dtype=torch.float64)
        cap = COUNT_CAP_FACTOR * claims.median().item()
        raw = {checked.client_id: float(min(checked.num_samples, cap)) for checked in valid}
        weighting = "capped"
    total = sum(raw.values())
    return {client_id: weight / total for client_id, weight in raw.items()}, weighting


def effective_weight(weights: dict[int, float], scales: dict[int, float], client_id: int) -> float:
    """`s_c = w_c * clip factor`: the weight of a client's per-seed sums in a weighted-mean round."""
    scale = scales[client_id]
    return weights[client_id] * scale if scale != 1.0 else weights[client_id]


def combine(
    valid: list[CheckedUpdate],
    weights: dict[int, float],
    scales: dict[int, float],
    *,
    num_seeds: int,
    aggregation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The round's accumulator delta (float64, K) and the touched seeds (bool, K); nothing is stored.

    Args:
        valid: the accepted updates, in ascending client id (the float sums do not depend on arrival order).
        weights: `round_weights` of `valid`.
        scales: `screen`'s clip factor of each client.
        num_seeds: K.
        aggregation: one of `AGGREGATIONS`.
    """
    delta = torch.zeros(num_seeds, dtype=torch.float64)
    touched = torch.zeros(num_seeds, dtype=torch.bool)
    columns = []
    for checked in valid:
        local = checked.coefficients(num_seeds)
        if aggregation in ("trimmed_mean", "median"):
            scale = scales[checked.client_id]
            columns.append(local * scale if scale != 1.0 else local)
        else:  # the clipped client keeps its share n_c / sum(n); only its contribution is scaled
            delta += effective_weight(weights, scales, checked.client_id) * local
        touched[checked.seed_indices] = True
    if columns:
        delta = coordinate_wise(valid, columns, touched, num_seeds=num_seeds, aggregation=aggregation)
    return delta, touched


def coordinate_wise(
    valid: list[CheckedUpdate],
    columns: list[torch.Tensor],
    touched: torch.Tensor,
    *,
    num_seeds: int,
    aggregation: str,
) -> torch.Tensor:
    """Trimmed mean or median, per seed, over the clients that drew that seed, scaled by their share n_j / m.

    A client that did not draw seed j sent no value for it (its 0 is not a measurement), so the statistic runs
    over the n_j clients that did; the factor n_j / m makes a seed nobody trims move exactly as far as under
    equal weights. Cost: one sort of an (m, touched seeds) matrix, O(K x m) scalars.

    Args:
        valid: the accepted updates.
        columns: each client's (scaled) per-seed sums, in the order of `valid`.
        touched: which seeds any accepted client drew.
        num_seeds: K.
        aggregation: "median", or "trimmed_mean" (drops `TRIM_FRACTION` at each end).
    """
    clients = len(valid)
    indices = touched.nonzero().flatten()
    used = torch.zeros(clients, num_seeds, dtype=torch.bool)
    for row, checked in enumerate(valid):
        used[row, checked.seed_indices] = True
    values = torch.stack(columns)[:, indices]
    used = used[:, indices]
    counts = used.sum(0)
    # Unused entries sort last (+inf), so the first counts[j] rows of column j are its values in order.
    ordered = torch.where(used, values, torch.inf).sort(0).values
    ordered = torch.where(torch.arange(clients).unsqueeze(1) < counts, ordered, 0.0)
    if aggregation == "median":
        low = ordered.gather(0, ((counts - 1) // 2).unsqueeze(0)).squeeze(0)
        high = ordered.gather(0, (counts // 2).unsqueeze(0)).squeeze(0)
        statistic = (low + high) / 2
    else:
        trim = (counts.to(torch.float64) * TRIM_FRACTION).floor().to(torch.int64)
        sums = torch.cat([torch.zeros(1, indices.numel(), dtype=torch.float64), ordered.cumsum(0)])
        kept = counts - 2 * trim
        statistic = (sums.gather(0, (counts - trim).unsqueeze(0)) - sums.gather(0, trim.unsqueeze(0))).squeeze(0)
        statistic = statistic / kept
    delta = torch.zeros(num_seeds, dtype=torch.float64)
    delta[indices] = statistic * counts / clients
    return delta


def overflowing_client(
    valid: list[CheckedUpdate],
    weights: dict[int, float],
    scales: dict[int, float],
    accumulators: torch.Tensor,
    pro_abs_sum: torch.Tensor,
    *,
    num_seeds: int,
    pro: bool,
) -> tuple[int, str] | None:
    """The client to leave out when the combined round breaks the accumulators or the Pro sums, with why.

    Args:
        valid: the accepted updates.
        weights: their `round_weights`.
        scales: their clip factors.
        accumulators: the accumulators the round would leave.
        pro_abs_sum: the Pro sums the round would leave.
        num_seeds: K.
        pro: whether the Pro sums are kept (and so checked).

    Returns:
        `(client_id, reason)` of the client with the largest share of the first broken bound, or None.
    """
    bad = ~torch.isfinite(accumulators) | (accumulators.abs() > SANITY_MAX_ABS_ACCUMULATOR)
    if bad.any():
        worst, culprit = -1.0, None
        for checked in valid:
            share = effective_weight(weights, scales, checked.client_id) * checked.coefficients(num_seeds)
            size = torch.nan_to_num(share[bad].abs(), nan=math.inf).max().item()
            if size > worst:
                worst, culprit = size, checked.client_id
        index = int(bad.nonzero()[0])
        return culprit, (
            f"the update would take accumulator {index} to {accumulators[index].item():.6g}, beyond "
            f"SANITY_MAX_ABS_ACCUMULATOR={SANITY_MAX_ABS_ACCUMULATOR:g} (or not finite)"
        )
    bad = ~torch.isfinite(pro_abs_sum)
    if pro and bad.any():
        worst, culprit = -1.0, None
        for checked in valid:
            mask = bad[checked.seed_indices]
            if mask.any():
                size = checked.projected_grads[mask].abs().max().item()
                if size > worst:
                    worst, culprit = size, checked.client_id
        return culprit, "the update's projected gradients would take a Pro statistic to inf"
    return None
