"""The FedKSeed server: seeded client selection, validated weighted aggregation into K accumulators, Pro sampling."""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..perturbation import _splitmix64
from ..zo import make_seed_pool

AGGREGATIONS = ("samples", "equal")
# The official FedKSeed code's `--bias_loss_clip` default: |g| beyond it counts as this much in Pro importance.
DEFAULT_PRO_CLIP = 1000.0
# The official code's `--grad_initial` default: every seed's gradient history starts with this one entry.
DEFAULT_PRO_GRAD_INITIAL = 0.0
# The official code's min-max normalisation adds this to the denominator so equal importances do not divide by 0.
_MIN_MAX_EPS = 1e-10
# Mixed into the selection generator's seed so it never coincides with the seed sampler's or the pool's stream.
_SELECTION_SALT = 0xC11E57
_MASK64 = (1 << 64) - 1
_STATE_VERSION = 1


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

    Example:
        >>> ClientUpdate(client_id=3, num_samples=120, seed_indices=[7, 7, 12], scalars=[1e-6, -2e-6, 5e-7])
    """

    client_id: int
    num_samples: int
    seed_indices: Sequence[int] | torch.Tensor
    scalars: Sequence[float] | torch.Tensor
    projected_grads: Sequence[float] | torch.Tensor | None = None


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
        weights: `{client_id: w_c}` of the accepted clients (they sum to one when any was accepted).
        seeds_touched: how many distinct seed indices the accepted updates used.
        delta: the change of the accumulators: `new = old + delta.to_dense(K)`, over the touched seeds.

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


@dataclass
class _CheckedUpdate:
    client_id: int
    num_samples: int
    seed_indices: torch.Tensor  # int64
    scalars: torch.Tensor  # float64
    projected_grads: torch.Tensor | None  # float64


class KSeedServer:
    """The FedKSeed server (Qin et al. 2024) as a plain class: no Trainer, no Flower, no network.

    It holds the candidate seed pool (the same `make_seed_pool(num_seeds, seed)` every client's `KSeedZOOptimizer`
    draws) and the accumulators `A` (float64, one per seed), so that the global model is always
    `w0 - sum_j A_j z_j`. Each round it

    1. selects clients with `select_clients(round)`: seeded, without replacement, and stateless: round r's
       selection comes from a private generator seeded from `(seed, r)` only, so it is the same whatever was
       called before (a resumed run, or a second runtime, picks the same clients);
    2. aggregates their `ClientUpdate`s with `aggregate(round, updates)`: each update is validated in full first
       and an invalid one is rejected with its reason without touching the state; the valid ones add
       `A_j += sum_c w_c * sum_{t: idx_t = j} scalar_{c,t}` with `w_c = n_c / sum(n)` ("samples") or `1 / m`
       ("equal") over the valid updates, in ascending client id order (arrival order does not matter);
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
        aggregation: "samples" weighs each client by its sample count (the official code's default); "equal"
            gives every valid client the same weight (its `--equal_weight`).
        pro: FedKSeed-Pro: keep the gradient statistics and return non-uniform `probabilities()`.
        pro_clip: |g| beyond this counts as `pro_clip` in the importance; the official code's `--bias_loss_clip`
            default, 1000.0.
        pro_grad_initial: the official code starts every seed's gradient history with this one entry
            (`--grad_initial`, default 0.0), so a seed's importance is
            `(|clip(pro_grad_initial)| + sum |clip(g)|) / (1 + count)`; None drops that entry, giving the plain mean
            over the seen gradients (0 for a seed never seen).
        max_abs_scalar: if set, an update with any `|scalar|` above it is rejected.

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
        """The ids of the clients that take part in `round`, ascending, drawn without replacement.

        Stateless: a private `torch.Generator` seeded from `(seed, round)` alone draws them, so the answer for a
        round never depends on earlier calls, and the global RNG is neither read nor written.

        Raises:
            ValueError: if `round` is not an integer >= 0.
        """
        if not _is_int(round) or round < 0:
            raise ValueError(f"Invalid `round`: {round!r}; it must be an integer >= 0.")
        generator_seed = _splitmix64(_splitmix64((self.seed & _MASK64) ^ _SELECTION_SALT) ^ int(round))
        generator = torch.Generator().manual_seed(generator_seed)
        chosen = torch.randperm(self.num_clients, generator=generator)[: self.clients_per_round]
        return sorted(chosen.tolist())

    # ------------------------------------------------------------------ aggregation
    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Validate the updates of `round` and add the valid ones, weighted, into the accumulators.

        Every update is checked in full before any is used: its client was selected in `round` and sent only this
        update, `num_samples` is an integer (>= 1 for "samples" weighting), the per-step lists are 1-D with equal
        lengths, the seed indices are integers in `[0, K)`, every scalar and projected gradient is finite, and
        `|scalar| <= max_abs_scalar` if set. An invalid update is reported in `rejected` and changes nothing.
        The weights are normalised over the valid updates only. A round with no valid update leaves the
        accumulators and the Pro statistics unchanged (the round still counts as aggregated).

        Args:
            round: the round the updates answer; it must be greater than every round aggregated before.
            updates: the clients' `ClientUpdate`s, in any order.

        Returns:
            An `AggregationResult` with the accepted and rejected clients, the weights and the accumulator delta.

        Raises:
            ValueError: if `round` is not an integer above the last aggregated round.
        """
        if not _is_int(round) or round < 0:
            raise ValueError(f"Invalid `round`: {round!r}; it must be an integer >= 0.")
        if round <= self.last_round:
            raise ValueError(
                f"Round {round} cannot be aggregated: round {self.last_round} already was, and rounds must increase "
                "(aggregating a round twice would add its updates twice)."
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

        raw = {checked.client_id: self.client_weight(checked.num_samples) for checked in valid}
        total = sum(raw.values())
        weights = {client_id: weight / total for client_id, weight in raw.items()}

        num_seeds = self.num_seeds
        delta = torch.zeros(num_seeds, dtype=torch.float64)
        touched = torch.zeros(num_seeds, dtype=torch.bool)
        pro_count, pro_abs_sum = self.pro_count.clone(), self.pro_abs_sum.clone()
        for checked in valid:  # ascending client id: the float sums do not depend on arrival order
            local = torch.zeros(num_seeds, dtype=torch.float64).index_add_(0, checked.seed_indices, checked.scalars)
            delta += weights[checked.client_id] * local
            touched[checked.seed_indices] = True
            if self.pro:
                pro_count.index_add_(0, checked.seed_indices, torch.ones_like(checked.seed_indices))
                clipped = checked.projected_grads.clamp(-self.pro_clip, self.pro_clip).abs()
                pro_abs_sum.index_add_(0, checked.seed_indices, clipped)

        indices = touched.nonzero().flatten()
        # Only the touched entries change (untouched ones stay bit-identical, -0.0 included), in a new tensor so a
        # snapshot the caller took before stays valid.
        accumulators = self.accumulators.clone()
        accumulators[indices] += delta[indices]
        self.accumulators = accumulators
        self.pro_count, self.pro_abs_sum = pro_count, pro_abs_sum
        self.last_round = int(round)
        return AggregationResult(
            round=int(round),
            accepted=[checked.client_id for checked in valid],
            rejected=rejected,
            weights=weights,
            seeds_touched=indices.numel(),
            delta=SparseVector(indices, delta[indices]),
        )

    def client_weight(self, num_samples: int) -> float:
        """A client's aggregation weight before normalisation: its sample count ("samples") or 1 ("equal")."""
        return float(num_samples) if self.aggregation == "samples" else 1.0

    def check_update(self, round: int, update: ClientUpdate) -> str | None:
        """Why `aggregate` would reject this update on its own in `round`, or None if it would accept it."""
        checked = self._check_update(update, round, set(self.select_clients(round)))
        return checked if isinstance(checked, str) else None

    def _check_update(self, update: ClientUpdate, round: int, selected: set[int]) -> _CheckedUpdate | str:
        """The update in checked tensor form, or the reason it is rejected."""
        client_id = getattr(update, "client_id", None)
        if not _is_int(client_id) or int(client_id) not in selected:
            return f"client {client_id!r} was not selected in round {round}"
        client_id = int(client_id)
        num_samples = getattr(update, "num_samples", None)
        least = 1 if self.aggregation == "samples" else 0
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
        if seed_indices.numel() == 0:
            seed_indices = seed_indices.to(torch.int64)  # `torch.as_tensor([])` is float32
        if seed_indices.dtype.is_floating_point or seed_indices.dtype.is_complex or seed_indices.dtype == torch.bool:
            return f"`seed_indices` must be integers, got dtype {seed_indices.dtype}"
        seed_indices = seed_indices.to(torch.int64).clone()
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
        outside = seed_indices[(seed_indices < 0) | (seed_indices >= self.num_seeds)]
        if outside.numel():
            return f"seed index {outside[0].item()} is outside [0, {self.num_seeds})"
        if not torch.isfinite(scalars).all():
            return "a scalar (lr * g) is not finite"
        if grads is not None and not torch.isfinite(grads).all():
            return "a projected gradient g is not finite"
        if self.max_abs_scalar is not None and steps and scalars.abs().max().item() > self.max_abs_scalar:
            return f"|scalar| {scalars.abs().max().item():.6g} exceeds `max_abs_scalar`={self.max_abs_scalar:.6g}"
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
        `softmax((imp - min(imp)) / (max(imp) + 1e-10 - min(imp)))` over all K seeds with `imp = importance()`:
        uniform until a gradient is seen, and at most e times likelier for the most important seed.
        """
        if not self.pro:
            return torch.full((self.num_seeds,), 1.0 / self.num_seeds, dtype=torch.float64)
        imp = self.importance()
        low = imp.min()
        normalized = (imp - low) / (imp.max() + _MIN_MAX_EPS - low)
        exps = torch.exp(normalized - normalized.max())
        probabilities = exps / exps.sum()
        return probabilities / probabilities.sum()  # the official code renormalises when the sum is not 1.0

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
