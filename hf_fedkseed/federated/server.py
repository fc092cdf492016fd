"""The FedKSeed server: seeded client selection, validated robust aggregation into K accumulators, Pro sampling."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import torch

from ..perturbation.hashing import MASK64, splitmix64
from ..zo import make_seed_pool
from .aggregation import (
    AGGREGATIONS,
    COUNT_CAP_FACTOR,
    MIN_CLIENTS_TO_COMPARE,
    OUTLIER_NORM_FACTOR,
    OUTLIER_SCALAR_FACTOR,
    TRIM_FRACTION,
    WEIGHTINGS,
    client_weight,
    combine,
    effective_weight,
    overflowing_client,
    round_weights,
    screen,
)
from .codecs import SYNC_PRECISIONS, dequantise_int8, quantise_int8
from .pro import DEFAULT_PRO_CLIP, DEFAULT_PRO_GRAD_INITIAL, add_pro_statistics, pro_importance, pro_probabilities
from .updates import (
    SANITY_MAX_ABS_ACCUMULATOR,
    SANITY_MAX_ABS_SCALAR,
    AggregationResult,
    CheckedUpdate,
    ClientUpdate,
    SparseVector,
    _is_int,
    _is_real,
    validate_update,
)

# The update types, the aggregation rules and the Pro statistics live in `.updates`, `.aggregation` and `.pro`; their
# public names are re-exported here, where they were defined before, so `from .server import ...` keeps working.
__all__ = [
    "AGGREGATIONS",
    "COUNT_CAP_FACTOR",
    "DEFAULT_PRO_CLIP",
    "DEFAULT_PRO_GRAD_INITIAL",
    "MIN_CLIENTS_TO_COMPARE",
    "OUTLIER_NORM_FACTOR",
    "OUTLIER_SCALAR_FACTOR",
    "SANITY_MAX_ABS_ACCUMULATOR",
    "SANITY_MAX_ABS_SCALAR",
    "TRIM_FRACTION",
    "WEIGHTINGS",
    "AggregationResult",
    "ClientUpdate",
    "KSeedServer",
    "SparseVector",
    "pro_probabilities",
    "select_clients",
]

# Mixed into the selection generator's seed so it never coincides with the seed sampler's or the pool's stream.
_SELECTION_SALT = 0xC11E57
_STATE_VERSION = 1


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
        sync_precision: what clients receive, `published_accumulators()`: "float32" (the paper's) or "int8" (one
            scale and K int8 codes, quantised afresh from the exact `accumulators` every round).

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
        sync_precision: str = "float32",
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
        if sync_precision not in SYNC_PRECISIONS:
            raise ValueError(f"Invalid `sync_precision`: {sync_precision!r}; choose one of {SYNC_PRECISIONS}.")

        self.num_clients = int(num_clients)
        self.seed = int(seed)
        self.clients_per_round = per_round
        self.client_fraction = None if client_fraction is None else float(client_fraction)
        self.aggregation = aggregation
        self.pro = pro
        self.pro_clip = float(pro_clip)
        self.pro_grad_initial = None if pro_grad_initial is None else float(pro_grad_initial)
        self.max_abs_scalar = None if max_abs_scalar is None else float(max_abs_scalar)
        self.sync_precision = sync_precision
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
        valid: list[CheckedUpdate] = []
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

        valid, scales = screen(valid, rejected, num_seeds=self.num_seeds, aggregation=self.aggregation)
        while True:
            weights, weighting = round_weights(valid, sample_counts, self.aggregation)
            delta, touched = combine(valid, weights, scales, num_seeds=self.num_seeds, aggregation=self.aggregation)
            pro_count, pro_abs_sum = add_pro_statistics(
                valid if self.pro else [], self.pro_count, self.pro_abs_sum, pro_clip=self.pro_clip
            )
            indices = touched.nonzero().flatten()
            # Only the touched entries change (untouched ones stay bit-identical, -0.0 included), in a new tensor so
            # a snapshot the caller took before stays valid.
            accumulators = self.accumulators.clone()
            accumulators[indices] += delta[indices]
            culprit = overflowing_client(
                valid, weights, scales, accumulators, pro_abs_sum, num_seeds=self.num_seeds, pro=self.pro
            )
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
            effective = {client_id: effective_weight(weights, scales, client_id) for client_id in weights}
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

    def client_weight(self, num_samples: int) -> float:
        """A client's aggregation weight before normalisation: its sample count ("samples", "norm_bound") or 1.

        Pass a count the runtime knows (the partition size), never one a client claims.
        """
        return client_weight(self.aggregation, num_samples)

    def check_update(self, round: int, update: ClientUpdate) -> str | None:
        """Why `aggregate` would reject this update on its own in `round`, or None if the per-update checks pass.

        The round-level screening (outliers against the other clients, accumulator bounds) can still reject it.
        """
        checked = self._check_update(update, round, set(self.select_clients(round)))
        return checked if isinstance(checked, str) else None

    def _check_update(self, update: ClientUpdate, round: int, selected: set[int]) -> CheckedUpdate | str:
        """The update in checked tensor form, or the reason it is rejected (`validate_update` with this server's K)."""
        return validate_update(
            update,
            round,
            selected,
            num_seeds=self.num_seeds,
            aggregation=self.aggregation,
            pro=self.pro,
            max_abs_scalar=self.max_abs_scalar,
        )

    # ------------------------------------------------------------------ FedKSeed-Pro
    def importance(self) -> torch.Tensor:
        """Per seed, the mean `|clip(g, -pro_clip, pro_clip)|` of the official code's gradient history (float64).

        With `pro_grad_initial` set (the default, 0.0), that history starts with `pro_grad_initial`, as in the
        official code; a seed never seen has importance `|clip(pro_grad_initial)|`, or 0 with None.
        """
        return pro_importance(
            self.pro_count, self.pro_abs_sum, pro_clip=self.pro_clip, pro_grad_initial=self.pro_grad_initial
        )

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
    def published_accumulators(self) -> torch.Tensor:
        """The accumulators clients receive and build their model from (float64): `accumulators` at the wire's
        precision. "float32": their float32 rounding; "int8": `dequantise_int8(*quantise_int8(accumulators))`.

        `accumulators` stays the exact sum of every accepted contribution and each call quantises it afresh, so one
        round's quantisation error is never carried into the next (error feedback: nothing is lost over rounds).
        """
        if self.sync_precision == "int8":
            return torch.from_numpy(dequantise_int8(*quantise_int8(self.accumulators.numpy())))
        return self.accumulators.to(torch.float32).to(torch.float64)

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
