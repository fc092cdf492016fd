"""Who trains when, on which rows, with which seeds: pure functions of the recipe, the round and the client."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from ..perturbation.hashing import mix
from .config import FederatedConfig
from .partition import Partition, partition_dataset
from .server import KSeedServer, select_clients

__all__ = [
    "RoundSchedule",
    "build_partition",
    "client_seed_schedule",
    "client_step_rows",
    "resolve_clients_per_round",
    "select_clients",
]

_DATA_SALT = 0xDA7A
_SCHEDULE_SALT = 0x5C4ED  # FedKSeed-Pro: the server's draw from its seed probabilities
_UNIFORM_SALT = 0x5EED5  # FedKSeed: the uniform draw every runtime makes for a (round, client)


def build_partition(config: FederatedConfig, dataset) -> Partition:
    """The client shards `config` describes over `dataset` (every runtime calls this, so they agree on the clients).

    Raises:
        ValueError: for a partition that does not fit the data (see `partition_dataset`).

    Example:
        >>> partition = build_partition(FederatedConfig(rounds=2, num_clients=8, clients_per_round=2), rows)
    """
    kwargs: dict[str, Any] = {}
    if config.partition == "iid":
        kwargs = dict(num_clients=config.num_clients, seed=config.partition_seed)
    elif config.partition == "dirichlet":
        kwargs = dict(
            num_clients=config.num_clients,
            column=config.partition_column,
            alpha=config.dirichlet_alpha,
            seed=config.partition_seed,
            min_client_size=config.min_client_size,
        )
    else:
        kwargs = dict(column=config.partition_column, min_client_size=config.min_client_size)
    if config.held_out:
        kwargs.update(held_out=config.held_out, column=config.partition_column)
    return partition_dataset(dataset, config.partition, **kwargs)


def resolve_clients_per_round(num_clients: int, config: FederatedConfig) -> int:
    """m: `clients_per_round`, or `client_fraction` of the clients rounded to nearest (at least 1).

    Raises:
        ValueError: if `clients_per_round` exceeds the partition's clients.
    """
    return KSeedServer.resolve_clients_per_round(num_clients, config.clients_per_round, config.client_fraction)


def client_step_rows(config: FederatedConfig, per_step: int, round_index: int, client: int, rows) -> list[int]:
    """The dataset rows a client reads in a round, in order: `per_step` rows for each of its `local_steps` steps.

    Row `k` of local step `t` is `rows[perm[(t * per_step + k) % len(rows)]]`, with `perm` a permutation of the
    shard drawn from `(partition_seed, round, client)` alone, so any runtime that knows the round and the client
    feeds the same batches.

    Example:
        >>> client_step_rows(config, per_step=4, round_index=0, client=3, rows=partition.clients[3])[:4]
    """
    generator = torch.Generator().manual_seed(mix(_DATA_SALT, config.partition_seed, round_index, client))
    order = torch.randperm(len(rows), generator=generator).tolist()
    return [rows[order[position % len(rows)]] for position in range(config.local_steps * per_step)]


def client_seed_schedule(
    seed: int,
    round_index: int,
    client: int,
    local_steps: int,
    num_seeds: int,
    probabilities: torch.Tensor | None = None,
) -> torch.Tensor:
    """The seed indices of a client's local steps in a round, keyed by (seed, round, client) alone.

    FedKSeed draws them uniformly from the K candidates; FedKSeed-Pro (`probabilities`: the server's distribution)
    has the server draw them and send them in the sync. Either way the draw comes from a private generator seeded
    by `(seed, round, client)`, so no runtime advances a shared sampler and every runtime draws the same seeds.

    Example:
        >>> client_seed_schedule(42, round_index=3, client=5, local_steps=200, num_seeds=4096)[:3]
    """
    if probabilities is not None:
        generator = torch.Generator().manual_seed(mix(_SCHEDULE_SALT, seed, round_index, client))
        return torch.multinomial(probabilities, local_steps, replacement=True, generator=generator)
    generator = torch.Generator().manual_seed(mix(_UNIFORM_SALT, seed, round_index, client))
    return torch.randint(num_seeds, (local_steps,), generator=generator)


@dataclass(frozen=True)
class RoundSchedule:
    """The step layout of a run: `rounds` rounds of `clients_per_round` clients taking `local_steps` steps each.

    A runtime that runs every local step in one loop (the Trainer emulation) maps its global step to
    (round, slot, local step); one that runs a client at a time (a Flower node) asks for the global step of a
    client's first local step, where the learning-rate schedule stands.

    Example:
        >>> schedule = RoundSchedule(config, partition.num_clients, seed=42)
        >>> schedule.where(130), schedule.selected_clients(2)
    """

    config: FederatedConfig
    num_clients: int
    seed: int

    @cached_property
    def clients_per_round(self) -> int:
        return resolve_clients_per_round(self.num_clients, self.config)

    @property
    def total_steps(self) -> int:
        """`rounds * clients_per_round * local_steps`: the Trainer steps of an emulated run."""
        return self.config.rounds * self.clients_per_round * self.config.local_steps

    def selected_clients(self, round_index: int) -> list[int]:
        return select_clients(self.seed, round_index, self.num_clients, self.clients_per_round)

    def where(self, global_step: int) -> tuple[int, int, int]:
        """(round, slot among the round's clients, local step) of a global step."""
        local_steps = self.config.local_steps
        steps_per_round = self.clients_per_round * local_steps
        return (
            global_step // steps_per_round,
            (global_step % steps_per_round) // local_steps,
            global_step % local_steps,
        )

    def step_offset(self, round_index: int, slot: int) -> int:
        """The global step at which the `slot`-th client of `round_index` starts its local steps."""
        return (round_index * self.clients_per_round + slot) * self.config.local_steps
