"""The federated setting of a run: clients, rounds, local steps, partition, aggregation and FedKSeed-Pro."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from .aggregation import AGGREGATIONS
from .client import UNDO_MODES
from .codecs import SYNC_PRECISIONS
from .partition import STRATEGIES
from .pro import DEFAULT_PRO_CLIP

__all__ = ["METHODS", "FederatedConfig"]

# The federated tuning methods a recipe's `method` selects; the last three live in hf_fedkseed.baselines.
METHODS = ("fedkseed", "fedkseed_pro", "fedzo", "fedit", "fedavg")


@dataclass
class FederatedConfig:
    """The federated setting of a run: clients, rounds, local steps, partition and FedKSeed-Pro.

    One Trainer optimizer step is one local step, so a run takes `rounds * clients_per_round * local_steps` steps.
    """

    rounds: int = field(metadata={"help": "Number of federated rounds."})
    local_steps: int = field(default=200, metadata={"help": "tau: local ZO steps per selected client and round."})
    num_clients: int | None = field(
        default=None, metadata={"help": "Clients for iid/dirichlet partitions; natural partitions derive it."}
    )
    clients_per_round: int | None = field(default=None, metadata={"help": "Clients selected per round."})
    client_fraction: float | None = field(
        default=None, metadata={"help": "Fraction of clients selected per round (the paper: 0.05)."}
    )
    partition: Literal["iid", "dirichlet", "natural"] = field(
        default="iid", metadata={"help": f"How to shard the data: one of {STRATEGIES}."}
    )
    partition_column: str | None = field(
        default=None, metadata={"help": "Column for dirichlet (label) or natural (client id) partitions."}
    )
    dirichlet_alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration (the paper: 0.5)."})
    min_client_size: int = field(default=1, metadata={"help": "Smallest number of rows a client may hold."})
    held_out: list[str] | None = field(
        default=None, metadata={"help": "Values of `partition_column` kept out of training (evaluation)."}
    )
    method: Literal["fedkseed", "fedkseed_pro", "fedzo", "fedit", "fedavg"] | None = field(
        default=None,
        metadata={
            "help": f"Federated tuning method, one of {METHODS}; unset: `fedkseed_pro` if `pro` else `fedkseed`. "
            "fedzo, fedit and fedavg are the baselines of hf_fedkseed.baselines."
        },
    )
    pro: bool = field(default=False, metadata={"help": "FedKSeed-Pro: sample seeds by their importance."})
    pro_clip: float = field(default=DEFAULT_PRO_CLIP, metadata={"help": "Clip of |g| in Pro importance."})
    aggregation: Literal["samples", "equal", "trimmed_mean", "median", "norm_bound"] = field(
        default="samples",
        metadata={
            "help": f"How client updates combine: one of {AGGREGATIONS}. samples/equal: weighted means (sample "
            "counts the server knows, or equal); trimmed_mean/median: robust per-seed statistics; norm_bound: "
            "samples with each client clipped to the round's median norm. All cost O(K x clients) scalars."
        },
    )
    max_abs_scalar: float | None = field(
        default=None,
        metadata={
            "help": "Optional absolute bound: reject client updates holding a |lr*g| above it (the scale-free "
            "outlier screening and a sanity bound always apply)."
        },
    )
    undo: Literal["snapshot", "replay"] = field(
        default="snapshot", metadata={"help": f"How local drift is undone: one of {UNDO_MODES}."}
    )
    partition_seed: int = field(default=0, metadata={"help": "Seeds the partition and each client's data order."})
    sync_precision: Literal["float32", "int8"] = field(
        default="float32",
        metadata={
            "help": f"How the server sends the K accumulators, one of {SYNC_PRECISIONS}: float32 (the paper's, "
            "4 bytes each) or int8 (one float32 scale and 1 byte each, re-quantised every round from the server's "
            "exact sums, so no error accumulates; about 5.4 KB a client and round at K=4096, tau=200 instead of "
            "17.6 KB). fedkseed and fedkseed_pro only."
        },
    )

    def __post_init__(self):
        def positive_int(name: str, value) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Invalid `{name}`: {value!r}; it must be a positive integer.")

        def finite(value) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

        positive_int("rounds", self.rounds)
        positive_int("local_steps", self.local_steps)
        positive_int("min_client_size", self.min_client_size)
        if self.num_clients is not None:
            positive_int("num_clients", self.num_clients)
        if (self.clients_per_round is None) == (self.client_fraction is None):
            raise ValueError("Set exactly one of `clients_per_round` and `client_fraction`.")
        if self.clients_per_round is not None:
            positive_int("clients_per_round", self.clients_per_round)
            if (
                self.partition != "natural"
                and self.num_clients is not None
                and self.clients_per_round > self.num_clients
            ):
                raise ValueError(
                    f"Invalid `clients_per_round`: {self.clients_per_round}; it must be at most `num_clients` "
                    f"({self.num_clients}). Lower it, or raise `num_clients`."
                )
        if self.client_fraction is not None and not (finite(self.client_fraction) and 0 < self.client_fraction <= 1):
            raise ValueError(f"Invalid `client_fraction`: {self.client_fraction!r}; it must be a number in (0, 1].")
        for name in ("dirichlet_alpha", "pro_clip") + (("max_abs_scalar",) if self.max_abs_scalar is not None else ()):
            value = getattr(self, name)
            if not (finite(value) and value > 0):
                raise ValueError(f"Invalid `{name}`: {value!r}; it must be a finite number > 0.")
        if not isinstance(self.partition_seed, int) or isinstance(self.partition_seed, bool) or self.partition_seed < 0:
            raise ValueError(f"Invalid `partition_seed`: {self.partition_seed!r}; it must be an integer >= 0.")
        if self.held_out is not None and (
            not isinstance(self.held_out, list | tuple) or not all(isinstance(v, str) for v in self.held_out)
        ):
            raise ValueError(f"Invalid `held_out`: {self.held_out!r}; pass a list of `partition_column` values.")
        if self.partition not in STRATEGIES:
            raise ValueError(f"Invalid `partition` {self.partition!r}; choose one of {STRATEGIES}.")
        if self.partition in ("iid", "dirichlet") and self.num_clients is None:
            raise ValueError(f"`partition={self.partition!r}` needs `num_clients`.")
        if self.partition in ("dirichlet", "natural") and not self.partition_column:
            raise ValueError(f"`partition={self.partition!r}` needs `partition_column`.")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"Invalid `aggregation` {self.aggregation!r}; choose one of {AGGREGATIONS}.")
        if self.undo not in UNDO_MODES:
            raise ValueError(f"Invalid `undo` {self.undo!r}; choose one of {UNDO_MODES}.")
        if self.sync_precision not in SYNC_PRECISIONS:
            raise ValueError(f"Invalid `sync_precision` {self.sync_precision!r}; choose one of {SYNC_PRECISIONS}.")
        if self.method is None:  # `pro` alone still selects FedKSeed-Pro
            self.method = "fedkseed_pro" if self.pro else "fedkseed"
        elif self.method not in METHODS:
            raise ValueError(f"Invalid `method` {self.method!r}; choose one of {METHODS}.")
        elif self.method == "fedkseed_pro":
            self.pro = True
        elif self.pro:
            raise ValueError(
                f"`pro: true` conflicts with `method: {self.method}`; use `method: fedkseed_pro` (and drop `pro`)."
            )
        if self.sync_precision != "float32" and self.method not in ("fedkseed", "fedkseed_pro"):
            raise ValueError(
                f"`sync_precision: {self.sync_precision}` compresses the accumulator syncs of fedkseed and "
                f"fedkseed_pro; `method: {self.method}` sends no accumulators: set `sync_precision: float32`."
            )
