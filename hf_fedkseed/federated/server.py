"""The FedKSeed server: seeded client selection, validated robust aggregation into K accumulators, Pro sampling."""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..perturbation.hashing import MASK64, splitmix64
from ..zo import make_seed_pool
from .wire import _as_int64_indices, _first_non_finite, _first_out_of_range

# How the accepted updates are combined. "samples" and "equal" are the official code's weighted means; the robust
# choices cost O(K x clients) scalar operations per round, nothing next to one forward pass of the model.
AGGREGATIONS = ("samples", "equal", "trimmed_mean", "median", "norm_bound")
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
# Absolute sanity bounds, for what nothing can be compared with (a round of one or two clients). An honest |lr * g| is
# around 1e-7 .. 1e-2; 1e3 per step is absurd for any model yet keeps `w0 - sum_j A_j z_j` far inside float32 and
# bfloat16 range, as does an accumulator bound of 1e6 (every |A_j| <= 1e6, z ~ N(0, 1)).
SANITY_MAX_ABS_SCALAR = 1e3
SANITY_MAX_ABS_ACCUMULATOR = 1e6
# The official FedKSeed code's `--bias_loss_clip` default: |g| beyond it counts as this much in Pro importance.
DEFAULT_PRO_CLIP = 1000.0
# The official code's `--grad_initial` default: every seed's gradient history starts with this one entry.
DEFAULT_PRO_GRAD_INITIAL = 0.0
# The official code's min-max normalisation adds this to the denominator so equal importances do not divide by 0.
_MIN_MAX_EPS = 1e-10
# Mixed into the selection generator's seed so it never coincides with the seed sampler's or the pool's stream.
_SELECTION_SALT = 0xC11E57
_STATE_VERSION = 1


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


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
class _CheckedUpdate:
    client_id: int
    num_samples: int
    seed_indices: torch.Tensor  # int64
    scalars: torch.Tensor  # float64
    projected_grads: torch.Tensor | None  # float64

    def coefficients(self, num_seeds: int) -> torch.Tensor:
        """The client's per-seed sums of its scalars: what its steps added to each accumulator (float64, K)."""
        return torch.zeros(num_seeds, dtype=torch.float64).index_add_(0, self.seed_indices, self.scalars)


def select_clients(seed: int, round_index: int, num_clients: int, clients_per_round: int) -> list[int]:
    """The ids of the clients that take part in a round, ascending, drawn without replacement.

    Stateless: a private generator seeded from `(seed, round)` alone draws them, so the answer for a round never
    depends on earlier calls, every runtime and every method (FedKSeed and the baselines) sees the same clients in
    the same rounds, and the global RNG is neither read nor written.

    Raises:
        ValueError: if `round_index` is not an integer >= 0.
    """
    if not _is_int(round_index) or round_index < 0:
        raise ValueError(f"Invalid `round`: {round_index!r}; it must be an integer >= 0.")
    generator = torch.Generator().manual_seed(splitmix64(splitmix64((seed & MASK64) ^ _SELECTION_SALT) ^ round_index))
    return sorted(torch.randperm(num_clients, generator=generator)[:clients_per_round].tolist())


class KSeedServer:
    """The FedKSeed server (Qin et al. 2024) as a plain class: no Trainer, no Flower, no network.

    It holds the candidate seed pool (the same `make_seed_pool(num_seeds, seed)` every client's `KSeedZOOptimizer`
    draws) and the accumulators `A` (float64, one per seed), so that the global model is always
    `w0 - sum_j A_j z_j`. Each round it

    1. selects clients with `select_clients(round)`: seeded, without replacement, and stateless: round r's
       selection comes from a private generator seeded from `(seed, r)` only, so it is the same whatever was
       called before (a resumed run, or a second runtime, picks the same clients);
    2. aggregates their `ClientUpdate`s with `aggregate(round, updates, sample_counts=...)`: nothing a client
       sends is trusted. Each update is validated in full first (selection, round, K, finite and bounded scalars)
       and an invalid one is rejected with its reason without touching the state; with three or more clients the
       round screens them against each other (scalar outliers rejected, long coefficient vectors clipped to a
       multiple of the median norm); the accepted ones add `A_j += sum_c w_c * sum_{t: idx_t = j} scalar_{c,t}`
       with `w_c = n_c / sum(n)` ("samples", n the counts the runtime knows) or `1 / m` ("equal"), in ascending
       client id order (arrival order does not matter), or a coordinate-wise robust statistic;
    3. with `pro=True` (FedKSeed-Pro) keeps, per seed, the count and the sum of `|clip(g, -pro_clip, pro_clip)|`
       over every scalar gradient of the accepted updates (O(K) memory), from which `probabilities()` computes the
       official code's seed sampling distribution.

    Args:
        num_clients: N, the number of clients, with ids `0 .. N-1`.
        num_seeds: K, the size of the candidate seed pool (the clients' `num_seeds`).
        seed: seeds the pool (the clients' `seed`) and the client selection.
        clients_per_round: m, the number of clients selected per round, in `[1, num_clients]`.
        client_fraction: alternatively, the fraction of clients selected per round, in `(0, 1]`;
            m = `max(1, floor(client_fraction * num_clients + 0.5))`: the nearest integer (halves round up, and a
            product such as `0.07 * 100 = 7.000000000000001` gives 7, where `ceil` would give 8), at least one.
            The paper's 5% of 200 clients gives 10.
        aggregation: how accepted updates combine; every choice costs O(K x clients) scalar operations a round,
            nothing next to one forward pass.
            "samples" weighs each client by its sample count (the official code's default; the counts the runtime
            passes as `sample_counts`, else the claimed ones capped at `COUNT_CAP_FACTOR` x the median claim);
            "equal" gives every accepted client the same weight (its `--equal_weight`);
            "trimmed_mean" takes per seed the mean over the clients that drew it after dropping `TRIM_FRACTION` of
            them at each end (needs 5 clients on a seed to trim one), scaled by their share of the round;
            "median" takes per seed the median over the clients that drew it, scaled the same way;
            "norm_bound" is "samples" with every client's coefficient vector clipped to the round's median norm.
        pro: FedKSeed-Pro: keep the gradient statistics and return non-uniform `probabilities()`.
        pro_clip: |g| beyond this counts as `pro_clip` in the importance; the official code's `--bias_loss_clip`
            default, 1000.0.
        pro_grad_initial: the official code starts every seed's gradient history with this one entry
            (`--grad_initial`, default 0.0), so a seed's importance is
            `(|clip(pro_grad_initial)| + sum |clip(g)|) / (1 + count)`; None drops that entry, giving the plain mean
            over the seen gradients (0 for a seed never seen).
        max_abs_scalar: if set, an update with any `|scalar|` above it is rejected: an absolute bound on top of
            the scale-free screening and of `SANITY_MAX_ABS_SCALAR`, which always apply.

    Raises:
        ValueError: for an argument out of range or of the wrong type, naming the argument.

    Example:
        >>> server = KSeedServer(200, num_seeds=4096, seed=42, client_fraction=0.05)
        >>> clients = server.select_clients(0)  # 10 ids
        >>> result = server.aggregate(0, [ClientUpdate(c, 100, [5], [1e-6]) for c in clients])
        >>> coefficients = server.model_coefficients()  # replay on w0: w = w0 + sum_j coefficients[j] z_j
    """

    def __init__(
        self,
        num_clients: int,
        *,
        num_seeds: int = 4096,
        seed: int = 0,
        clients_per_round: int | None = None,
        client_fraction: float | None = None,
        aggregation: str = "samples",
        pro: bool = False,
        pro_clip: float = DEFAULT_PRO_CLIP,
        pro_grad_initial: float | None = DEFAULT_PRO_GRAD_INITIAL,
        max_abs_scalar: float | None = None,
    ):
        if not _is_int(num_clients) or num_clients < 1:
            raise ValueError(f"Invalid `num_clients`: {num_clients!r}; it must be an integer >= 1.")
        if not _is_int(num_seeds) or num_seeds < 1:
            raise ValueError(f"Invalid `num_seeds`: {num_seeds!r}; K must be an integer >= 1.")
        if not _is_int(seed):
            raise ValueError(f"Invalid `seed`: {seed!r}; it must be an integer.")
        per_round = self.resolve_clients_per_round(num_clients, clients_per_round, client_fraction)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"Invalid `aggregation`: {aggregation!r}; choose one of {AGGREGATIONS}.")
        if not isinstance(pro, bool):
            raise ValueError(f"Invalid `pro`: {pro!r}; it must be True or False.")
        if not _is_real(pro_clip) or math.isnan(pro_clip) or pro_clip <= 0:
            raise ValueError(f"Invalid `pro_clip`: {pro_clip!r}; it must be a number > 0 (inf disables clipping).")
        if pro_grad_initial is not None and not (_is_real(pro_grad_initial) and math.isfinite(pro_grad_initial)):
            raise ValueError(f"Invalid `pro_grad_initial`: {pro_grad_initial!r}; use a finite number or None.")
        if max_abs_scalar is not None and not (
            _is_real(max_abs_scalar) and math.isfinite(max_abs_scalar) and max_abs_scalar > 0
        ):
            raise ValueError(f"Invalid `max_abs_scalar`: {max_abs_scalar!r}; use None or a finite number > 0.")

        self.num_clients = int(num_clients)
        self.seed = int(seed)
        self.clients_per_round = per_round
        self.client_fraction = None if client_fraction is None else float(client_fraction)
        self.aggregation = aggregation
        self.pro = pro
        self.pro_clip = float(pro_clip)
        self.pro_grad_initial = None if pro_grad_initial is None else float(pro_grad_initial)
        self.max_abs_scalar = None if max_abs_scalar is None else float(max_abs_scalar)
        self.seed_pool = make_seed_pool(num_seeds, self.seed)
        self.accumulators = torch.zeros(num_seeds, dtype=torch.float64)
        # FedKSeed-Pro statistics: per seed, how many scalar gradients were seen and the sum of their |clip(g)|.
        self.pro_count = torch.zeros(num_seeds, dtype=torch.int64)
        self.pro_abs_sum = torch.zeros(num_seeds, dtype=torch.float64)
        self.last_round = -1  # the last aggregated round; rounds must increase

    @staticmethod
    def resolve_clients_per_round(
        num_clients: int, clients_per_round: int | None, client_fraction: float | None
    ) -> int:
        """How many clients a round selects: the count, or `max(1, round-half-up(fraction * num_clients))`.

        Raises:
            ValueError: unless exactly one of the two is given and it is in range.
        """
        if (clients_per_round is None) == (client_fraction is None):
            raise ValueError(
                "Pass exactly one of `clients_per_round` (a count) or `client_fraction` (a share of `num_clients`); "
                f"got clients_per_round={clients_per_round!r}, client_fraction={client_fraction!r}."
            )
        if clients_per_round is not None:
            if not _is_int(clients_per_round) or not 1 <= clients_per_round <= num_clients:
                raise ValueError(
                    f"Invalid `clients_per_round`: {clients_per_round!r}; it must be an integer in "
                    f"[1, num_clients={num_clients}]."
                )
            per_round = int(clients_per_round)
        else:
            if not _is_real(client_fraction) or not 0.0 < client_fraction <= 1.0:
                raise ValueError(f"Invalid `client_fraction`: {client_fraction!r}; it must be a number in (0, 1].")
            per_round = max(1, math.floor(float(client_fraction) * num_clients + 0.5))
        return per_round

    # ------------------------------------------------------------------ selection
    @property
    def num_seeds(self) -> int:
        return self.seed_pool.numel()

    def select_clients(self, round: int) -> list[int]:
        """The ids of the clients that take part in `round` (`select_clients` of this server's seed)."""
        return select_clients(self.seed, round, self.num_clients, self.clients_per_round)

    # ------------------------------------------------------------------ aggregation
    def aggregate(
        self, round: int, updates: Sequence[ClientUpdate], *, sample_counts: Mapping[int, int] | None = None
    ) -> AggregationResult:
        """Validate the updates of `round` and add the valid ones, weighted (robustly if configured), into `A`.

        Nothing a client sends is trusted. Every update is checked in full before any is used: its client was
        selected in `round` and sent only this update, its `server_round` (when set) is `round` (a replayed update
        is rejected), its `num_seeds` (when set) is K, `num_samples` is an integer (>= 1 for "samples" weighting),
        the per-step lists are 1-D with equal lengths, the seed indices are integers in `[0, K)`, every scalar and
        projected gradient is finite, and `|scalar| <= SANITY_MAX_ABS_SCALAR` (and `<= max_abs_scalar` if set).

        Then, with at least `MIN_CLIENTS_TO_COMPARE` clients holding a non-zero update, the round screens them
        against each other, scale-free: a client whose largest |scalar| exceeds `OUTLIER_SCALAR_FACTOR` times the
        round's (lower) median client maximum is rejected, and a client whose vector of per-seed coefficients is
        longer than `OUTLIER_NORM_FACTOR` (`norm_bound`: 1) times the median client norm is scaled down to it. A
        clipped client keeps its weight share; only its contribution shrinks (`AggregationResult.effective_weights`).

        The weights are normalised over the accepted updates: the runtime's known `sample_counts` ("samples",
        "norm_bound"), else the claimed counts capped at `COUNT_CAP_FACTOR` times the median claim; one share each
        for "equal", "trimmed_mean" and "median". An update that would take an accumulator beyond
        `SANITY_MAX_ABS_ACCUMULATOR` (or a Pro sum to inf) is rejected whole and the round recombined without it,
        so the state is always finite and `state_dict()` always reloads. A rejected update changes nothing; a
        round with no valid update leaves the accumulators and the Pro statistics unchanged (it still counts).

        Args:
            round: the round the updates answer; it must be greater than every round aggregated before.
            updates: the clients' `ClientUpdate`s (or decoded `UpdateMessage`s), in any order.
            sample_counts: `{client_id: n}` the runtime knows (the partition sizes), used instead of the clients'
                claims; it must hold every client that sent an update.

        Returns:
            An `AggregationResult` with the accepted and rejected clients, the weights, the weighting used, the
            clipped clients and the accumulator delta.

        Raises:
            ValueError: if `round` is not an integer above the last aggregated round, or `sample_counts` lacks a
                client or holds a count that is not an integer >= 1.
        """
        if not _is_int(round) or round < 0:
            raise ValueError(f"Invalid `round`: {round!r}; it must be an integer >= 0.")
        if round <= self.last_round:
            raise ValueError(
                f"Round {round} cannot be aggregated: round {self.last_round} already was, and rounds must increase "
                "(aggregating a round twice would add its updates twice)."
            )
        if sample_counts is not None:
            for client_id in (getattr(update, "client_id", None) for update in updates):
                count = sample_counts.get(client_id)
                if not _is_int(count) or count < 1:
                    raise ValueError(
                        f"`sample_counts` holds {count!r} for client {client_id!r}; pass the known sample count "
                        "(an integer >= 1) of every client that sent an update."
                    )
        selected = set(self.select_clients(round))
        ids = Counter(getattr(update, "client_id", None) for update in updates)
        rejected: dict[int, str] = {}
        valid: list[_CheckedUpdate] = []
        for update in updates:
            client_id = getattr(update, "client_id", None)
            if ids[client_id] > 1:
                rejected[client_id] = f"client {client_id} sent {ids[client_id]} updates for round {round}; one allowed"
                continue
            checked = self._check_update(update, round, selected)
            if isinstance(checked, str):
                rejected[client_id] = checked
            else:
                valid.append(checked)
        valid.sort(key=lambda checked: checked.client_id)

        valid, scales = self._screen(valid, rejected)
        while True:
            weights, weighting = self._weights(valid, sample_counts)
            delta, touched, pro_count, pro_abs_sum = self._combine(valid, weights, scales)
            indices = touched.nonzero().flatten()
            # Only the touched entries change (untouched ones stay bit-identical, -0.0 included), in a new tensor so
            # a snapshot the caller took before stays valid.
            accumulators = self.accumulators.clone()
            accumulators[indices] += delta[indices]
            culprit = self._overflowing_client(valid, weights, scales, accumulators, pro_abs_sum)
            if culprit is None:
                break
            rejected[culprit[0]] = culprit[1]
            valid = [checked for checked in valid if checked.client_id != culprit[0]]
        self.accumulators = accumulators
        self.pro_count, self.pro_abs_sum = pro_count, pro_abs_sum
        self.last_round = int(round)
        clipped = {checked.client_id: scales[checked.client_id] for checked in valid if scales[checked.client_id] < 1}
        weighted_mean = self.aggregation in ("samples", "equal", "norm_bound")
        effective = None
        if weighted_mean:
            effective = {client_id: self._effective_weight(weights, scales, client_id) for client_id in weights}
        return AggregationResult(
            round=int(round),
            accepted=[checked.client_id for checked in valid],
            rejected=rejected,
            weights=weights,
            seeds_touched=indices.numel(),
            delta=SparseVector(indices, delta[indices]),
            weighting=weighting,
            clipped=clipped,
            linear=weighted_mean and not clipped,
            effective_weights=effective,
        )

    def _screen(self, valid: list[_CheckedUpdate], rejected: dict[int, str]) -> tuple[list, dict[int, float]]:
        """Scale-free screening: reject scalar outliers, then clip long coefficient vectors to the round's norm."""
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
        norms = {c.client_id: c.coefficients(self.num_seeds).norm().item() for c in valid}
        nonzero = [value for value in norms.values() if value > 0]
        if len(nonzero) >= MIN_CLIENTS_TO_COMPARE:
            factor = 1.0 if self.aggregation == "norm_bound" else OUTLIER_NORM_FACTOR
            bound = factor * torch.tensor(nonzero, dtype=torch.float64).median().item()
            for client_id, value in norms.items():
                if value > bound:
                    scales[client_id] = bound / value
        return valid, scales

    def _weights(
        self, valid: list[_CheckedUpdate], sample_counts: Mapping[int, int] | None
    ) -> tuple[dict[int, float], str]:
        """The normalised weights of the accepted clients and the name of the weighting."""
        if not valid:
            return {}, "equal"
        if self.aggregation not in ("samples", "norm_bound"):
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

    def _combine(self, valid: list[_CheckedUpdate], weights: dict[int, float], scales: dict[int, float]):
        """The round's accumulator delta, the touched seeds and the new Pro statistics (nothing is stored)."""
        num_seeds = self.num_seeds
        delta = torch.zeros(num_seeds, dtype=torch.float64)
        touched = torch.zeros(num_seeds, dtype=torch.bool)
        pro_count, pro_abs_sum = self.pro_count.clone(), self.pro_abs_sum.clone()
        columns = []
        for checked in valid:  # ascending client id: the float sums do not depend on arrival order
            local = checked.coefficients(num_seeds)
            if self.aggregation in ("trimmed_mean", "median"):
                scale = scales[checked.client_id]
                columns.append(local * scale if scale != 1.0 else local)
            else:  # the clipped client keeps its share n_c / sum(n); only its contribution is scaled
                delta += self._effective_weight(weights, scales, checked.client_id) * local
            touched[checked.seed_indices] = True
            if self.pro:
                pro_count.index_add_(0, checked.seed_indices, torch.ones_like(checked.seed_indices))
                clipped = checked.projected_grads.clamp(-self.pro_clip, self.pro_clip).abs()
                pro_abs_sum.index_add_(0, checked.seed_indices, clipped)
        if columns:
            delta = self._coordinate_wise(valid, columns, touched)
        return delta, touched, pro_count, pro_abs_sum

    def _coordinate_wise(self, valid: list[_CheckedUpdate], columns: list[torch.Tensor], touched: torch.Tensor):
        """Trimmed mean or median, per seed, over the clients that drew that seed, scaled by their share n_j / m.

        A client that did not draw seed j sent no value for it (its 0 is not a measurement), so the statistic runs
        over the n_j clients that did; the factor n_j / m makes a seed nobody trims move exactly as far as under
        equal weights. Cost: one sort of an (m, touched seeds) matrix, O(K x m) scalars.
        """
        num_seeds, clients = self.num_seeds, len(valid)
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
        if self.aggregation == "median":
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

    @staticmethod
    def _effective_weight(weights: dict[int, float], scales: dict[int, float], client_id: int) -> float:
        """`s_c = w_c * clip factor`: the weight of a client's per-seed sums in a weighted-mean round."""
        scale = scales[client_id]
        return weights[client_id] * scale if scale != 1.0 else weights[client_id]

    def _overflowing_client(self, valid, weights, scales, accumulators, pro_abs_sum) -> tuple[int, str] | None:
        """The client to leave out when the combined round breaks the accumulators or the Pro sums, with why."""
        bad = ~torch.isfinite(accumulators) | (accumulators.abs() > SANITY_MAX_ABS_ACCUMULATOR)
        if bad.any():
            worst, culprit = -1.0, None
            for checked in valid:
                share = self._effective_weight(weights, scales, checked.client_id) * checked.coefficients(
                    self.num_seeds
                )
                size = torch.nan_to_num(share[bad].abs(), nan=math.inf).max().item()
                if size > worst:
                    worst, culprit = size, checked.client_id
            index = int(bad.nonzero()[0])
            return culprit, (
                f"the update would take accumulator {index} to {accumulators[index].item():.6g}, beyond "
                f"SANITY_MAX_ABS_ACCUMULATOR={SANITY_MAX_ABS_ACCUMULATOR:g} (or not finite)"
            )
        bad = ~torch.isfinite(pro_abs_sum)
        if self.pro and bad.any():
            worst, culprit = -1.0, None
            for checked in valid:
                mask = bad[checked.seed_indices]
                if mask.any():
                    size = checked.projected_grads[mask].abs().max().item()
                    if size > worst:
                        worst, culprit = size, checked.client_id
            return culprit, "the update's projected gradients would take a Pro statistic to inf"
        return None

    def client_weight(self, num_samples: int) -> float:
        """A client's aggregation weight before normalisation: its sample count ("samples", "norm_bound") or 1.

        Pass a count the runtime knows (the partition size), never one a client claims.
        """
        return float(num_samples) if self.aggregation in ("samples", "norm_bound") else 1.0

    def check_update(self, round: int, update: ClientUpdate) -> str | None:
        """Why `aggregate` would reject this update on its own in `round`, or None if the per-update checks pass.

        The round-level screening (outliers against the other clients, accumulator bounds) can still reject it.
        """
        checked = self._check_update(update, round, set(self.select_clients(round)))
        return checked if isinstance(checked, str) else None

    def _check_update(self, update: ClientUpdate, round: int, selected: set[int]) -> _CheckedUpdate | str:
        """The update in checked tensor form, or the reason it is rejected."""
        client_id = getattr(update, "client_id", None)
        if not _is_int(client_id) or int(client_id) not in selected:
            return f"client {client_id!r} was not selected in round {round}"
        client_id = int(client_id)
        claimed_round = getattr(update, "server_round", None)
        if claimed_round is not None and (not _is_int(claimed_round) or claimed_round != round):
            return f"the update answers round {claimed_round!r}, not round {round}; a replayed or late update"
        claimed_seeds = getattr(update, "num_seeds", None)
        if claimed_seeds is not None and (not _is_int(claimed_seeds) or claimed_seeds != self.num_seeds):
            return f"the update is for K={claimed_seeds!r} seeds but the server has K={self.num_seeds}"
        num_samples = getattr(update, "num_samples", None)
        least = 1 if self.aggregation in ("samples", "norm_bound") else 0
        if not _is_int(num_samples) or num_samples < least:
            return f"`num_samples` is {num_samples!r}; {self.aggregation!r} weighting needs an integer >= {least}"
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
        if grads is None and self.pro:
            return "`projected_grads` is missing; FedKSeed-Pro (`pro=True`) needs the g of every step"
        if seed_indices.ndim != 1 or scalars.ndim != 1 or (grads is not None and grads.ndim != 1):
            return "`seed_indices`, `scalars` and `projected_grads` must be flat lists, one entry per step"
        steps = seed_indices.numel()
        if scalars.numel() != steps or (grads is not None and grads.numel() != steps):
            sizes = f"{steps} seed indices, {scalars.numel()} scalars"
            if grads is not None:
                sizes += f", {grads.numel()} projected grads"
            return f"length mismatch: {sizes}; every step needs one of each"
        position = _first_out_of_range(seed_indices, self.num_seeds)
        if position is not None:
            return f"seed index {seed_indices[position].item()} is outside [0, {self.num_seeds})"
        if _first_non_finite(scalars) is not None:
            return "a scalar (lr * g) is not finite"
        if grads is not None and _first_non_finite(grads) is not None:
            return "a projected gradient g is not finite"
        if self.max_abs_scalar is not None and steps and scalars.abs().max().item() > self.max_abs_scalar:
            return f"|scalar| {scalars.abs().max().item():.6g} exceeds `max_abs_scalar`={self.max_abs_scalar:.6g}"
        if steps and scalars.abs().max().item() > SANITY_MAX_ABS_SCALAR:
            return (
                f"|scalar| {scalars.abs().max().item():.6g} exceeds the sanity bound SANITY_MAX_ABS_SCALAR="
                f"{SANITY_MAX_ABS_SCALAR:g}; no honest lr * g comes near it"
            )
        return _CheckedUpdate(client_id, int(num_samples), seed_indices, scalars, grads)

    # ------------------------------------------------------------------ FedKSeed-Pro
    def importance(self) -> torch.Tensor:
        """Per seed, the mean `|clip(g, -pro_clip, pro_clip)|` of the official code's gradient history (float64).

        With `pro_grad_initial` set (the default, 0.0), that history starts with `pro_grad_initial`, as in the
        official code; a seed never seen has importance `|clip(pro_grad_initial)|`, or 0 with None.
        """
        if self.pro_grad_initial is None:
            return torch.where(self.pro_count > 0, self.pro_abs_sum / self.pro_count.clamp(min=1), 0.0)
        initial = min(abs(self.pro_grad_initial), self.pro_clip)
        return (self.pro_abs_sum + initial) / (self.pro_count + 1)

    def probabilities(self) -> torch.Tensor:
        """The seed sampling distribution for the clients' `SeedSampler` (float64, sums to one).

        Uniform with `pro=False`. With `pro=True` it is the official FedKSeed-Pro formula,
        `pro_probabilities(importance())`: uniform until a gradient is seen, and at most e times likelier for the
        most important seed.
        """
        if not self.pro:
            return torch.full((self.num_seeds,), 1.0 / self.num_seeds, dtype=torch.float64)
        return pro_probabilities(self.importance())

    # ------------------------------------------------------------------ the model
    def model_coefficients(self) -> torch.Tensor:
        """The coefficients `-A` to replay on `w0`: the global model is `w0 + sum_j coefficients[j] z_j`."""
        return -self.accumulators

    def delta_since(self, previous_accumulators: torch.Tensor | None) -> SparseVector:
        """The accumulators that changed since `previous_accumulators`, for a client catching up.

        The client sets `A[delta.indices] = delta.values` (new values, not differences), which makes it equal to
        the server's accumulators bit for bit.

        Args:
            previous_accumulators: the client's last copy (length K); None for a client that has none (all zero).

        Returns:
            A `SparseVector` of the changed indices and their current values.

        Raises:
            ValueError: if `previous_accumulators` does not hold K entries.
        """
        if previous_accumulators is None:
            previous = torch.zeros(self.num_seeds, dtype=torch.float64)
        else:
            previous = torch.as_tensor(previous_accumulators, dtype=torch.float64).detach().cpu().flatten()
        if previous.numel() != self.num_seeds:
            raise ValueError(
                f"`previous_accumulators` has {previous.numel()} entries; the server has K={self.num_seeds}."
            )
        changed = (self.accumulators != previous).nonzero().flatten()
        return SparseVector(changed, self.accumulators[changed].clone())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to resume: identity (K, seed, N, pro_clip), last round, accumulators, Pro statistics.

        It holds only ints, floats, strings and tensors, so `torch.load(..., weights_only=True)` reads it.
        """
        return {
            "version": _STATE_VERSION,
            "num_seeds": self.num_seeds,
            "seed": self.seed,
            "num_clients": self.num_clients,
            "pro_clip": self.pro_clip,
            "last_round": self.last_round,
            "accumulators": self.accumulators.clone(),
            "pro_count": self.pro_count.clone(),
            "pro_abs_sum": self.pro_abs_sum.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; every check runs before anything changes.

        Raises:
            ValueError: if the state is malformed or was made with another `num_seeds`, `seed`, `num_clients` or
                `pro_clip` (the Pro sums are of gradients clipped at `pro_clip`).
        """
        keys = ("version", "num_seeds", "seed", "num_clients", "pro_clip", "last_round")
        tensors = ("accumulators", "pro_count", "pro_abs_sum")
        missing = [key for key in keys + tensors if key not in state]
        if missing:
            raise ValueError(f"This server state lacks {missing}; it was not saved by `KSeedServer.state_dict()`.")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"Server state version {state['version']!r} is not supported (expected {_STATE_VERSION}).")
        for key in ("num_seeds", "seed", "num_clients", "pro_clip"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"The state was saved with `{key}`={state[key]!r} but this server has `{key}`="
                    f"{getattr(self, key)!r}; build the server with `{key}={state[key]!r}` to resume it."
                )
        for key in tensors:
            value = state[key]
            if not isinstance(value, torch.Tensor) or value.shape != (self.num_seeds,):
                raise ValueError(f"`{key}` in the state must be a tensor of shape ({self.num_seeds},).")
        accumulators = state["accumulators"].detach().to(torch.float64).clone()
        pro_count = state["pro_count"].detach().to(torch.int64).clone()
        pro_abs_sum = state["pro_abs_sum"].detach().to(torch.float64).clone()
        if not (torch.isfinite(accumulators).all() and torch.isfinite(pro_abs_sum).all()):
            raise ValueError("The state holds non-finite accumulators or Pro sums; it is corrupt.")
        if (pro_count < 0).any() or (pro_abs_sum < 0).any():
            raise ValueError("The state holds negative Pro counts or sums; it is corrupt.")
        if not _is_int(state["last_round"]) or state["last_round"] < -1:
            raise ValueError(f"`last_round` in the state is {state['last_round']!r}; it must be an integer >= -1.")
        self.accumulators, self.pro_count, self.pro_abs_sum = accumulators, pro_count, pro_abs_sum
        self.last_round = int(state["last_round"])
