"""FederatedCallback: FedKSeed rounds emulated inside one stock `transformers.Trainer`, over dataset shards."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import MISSING, asdict, fields

import torch

from .federated.client import KSeedClient
from .federated.config import METHODS, FederatedConfig
from .federated.partition import Partition
from .federated.protocol import SyncMessage
from .federated.rounds import decode_update, full_sync, make_server, round_record, seed_schedule
from .federated.schedule import build_partition
from .federated.server import KSeedServer
from .optimizer import KSeedZOOptimizer
from .trainer_rounds import FederatedRoundsCallback

__all__ = ["METHODS", "FederatedCallback", "FederatedConfig", "build_partition"]

logger = logging.getLogger(__name__)

_STATE_NAME = "federated"


class FederatedCallback(FederatedRoundsCallback):
    """Runs FedKSeed (or FedKSeed-Pro) rounds inside the stock `transformers.Trainer`.

    The Trainer's optimizer steps are the local steps of the selected clients, round after round: the callback
    selects clients (the pure `KSeedServer`), feeds each local step from the active client's shard
    (`train_dataset`), syncs the shared model to the server's accumulators (the pure `KSeedClient`), collects each
    client's (seed index, scalar) pairs through the real wire messages, aggregates them, and logs one record per
    round to the Trainer log and `OUTPUT/rounds.jsonl`. One model object serves every client: each client's local
    drift is undone before the next one (`FederatedConfig.undo`), so memory stays that of inference plus O(K).

    Checkpoints and evaluations land on round boundaries (one the Trainer asks for mid-round is taken at the round's
    end, on the aggregated model). Checkpoints carry the server, client and sampler state inside the optimizer's
    state, so `resume_from_checkpoint` continues exactly.

    Args:
        config: the federated setting.
        train_dataset: the (tokenized) training rows of all clients.
        partition: a precomputed `Partition` of `train_dataset`, instead of the one `config` describes.

    Raises:
        ValueError: for a partition that does not fit the data, and at the start of training for a `max_steps`
            too small for the rounds, an optimizer with weight decay, or a Trainer fed another dataset.

    Example:
        >>> federated = FederatedCallback(FederatedConfig(rounds=40, local_steps=200, client_fraction=0.05,
        ...                                               partition="natural", partition_column="task"), dataset)
        >>> trainer = Trainer(model=model, args=args, train_dataset=federated.train_dataset,
        ...                   optimizers=(KSeedZOOptimizer(model, lr=3e-7, eps=5e-4), None), callbacks=[federated])
    """

    def __init__(self, config: FederatedConfig, train_dataset, *, partition: Partition | None = None):
        super().__init__(config, train_dataset, partition)
        self.server: KSeedServer | None = None  # built when the Trainer hands over the optimizer (K, seed)
        self.client: KSeedClient | None = None
        self.optimizer: KSeedZOOptimizer | None = None

    def describe(self) -> str:
        return "FedKSeed-Pro" if self.config.pro else "FedKSeed"

    # ------------------------------------------------------------------ Trainer setup
    def setup(self, args, model, optimizer) -> None:
        if not isinstance(optimizer, KSeedZOOptimizer):
            raise TypeError("FederatedCallback needs `optimizers=(KSeedZOOptimizer(model, ...), None)` in the Trainer.")
        if any(group["weight_decay"] != 0 for group in optimizer.param_groups):
            raise ValueError(
                "FederatedCallback needs `weight_decay=0` in KSeedZOOptimizer: with decay the model is no longer "
                "`w0 - sum_j A_j z_j`, so K scalars cannot describe it."
            )
        self.optimizer = optimizer
        self.seed = optimizer.seed
        self.server = make_server(
            self.config, self.partition.num_clients, num_seeds=optimizer.num_seeds, seed=optimizer.seed
        )
        if not torch.equal(self.server.seed_pool, optimizer.seed_pool):
            raise ValueError(
                "The optimizer's seed pool is not the one its `seed` draws; FederatedCallback needs the pool that "
                "`make_seed_pool(num_seeds, seed)` gives (do not pass `seed_pool=`)."
            )

    def start(self, args, state, optimizer) -> None:
        optimizer = self.optimizer
        self.client = KSeedClient(
            optimizer.named_params, engine=optimizer.engine, seed_pool=optimizer.seed_pool, undo=self.config.undo
        )
        optimizer.attach_state(_STATE_NAME, self)  # restores the federated state when resuming

    # ------------------------------------------------------------------ rounds
    def begin_round(self, round_index: int) -> None:
        self._round = {
            "round": round_index,
            "clients": self.selected_clients(round_index),
            "updates": [],
            "failed": {},
            "losses": [],
            "bytes_up": 0,
            "bytes_down": 0,
            "start": time.perf_counter(),
        }
        if self.client.synced_round is None:  # the first round: everyone starts at w0
            self.client.catch_up(self._sync(round_index))

    def begin_client(self, slot: int, optimizer) -> None:
        record = self._round
        client_id = record["clients"][slot]
        # FedKSeed-Pro: the server draws the client's tau seeds from its distribution and sends them; FedKSeed: the
        # client draws them uniformly, keyed by (seed, round, client) as every runtime does.
        schedule = seed_schedule(self.server, self.config, record["round"], client_id, self.optimizer.directions)
        payload = self._sync(record["round"], schedule if self.config.pro else None).encode()
        record["bytes_down"] += len(payload)
        received = SyncMessage.decode(payload)
        self.client.catch_up(received)  # the paper's full sync; the shared model is already at this round
        self.optimizer.sampler.set_schedule(received.seed_schedule if self.config.pro else schedule)
        self.client.begin_local()

    def after_step(self, slot: int, optimizer) -> None:
        self._round["losses"].append(self.optimizer.last_step["loss"])
        self.client.record_step(self.optimizer.last_step)

    def end_client(self, slot: int) -> None:
        record = self._round
        client_id = record["clients"][slot]
        try:
            num_samples = len(self.partition.clients[client_id])  # known to the runtime, never taken from a client
            update = self.client.build_update(
                server_round=record["round"], client_id=client_id, num_samples=num_samples, pro=self.config.pro
            )
            payload = update.encode()
            record["bytes_up"] += len(payload)
            record["updates"].append(
                decode_update(
                    payload, client_id=client_id, round_index=record["round"], num_seeds=self.server.num_seeds
                )
            )
        except Exception as error:  # a failing client is left out of this round; the round goes on
            record["failed"][client_id] = f"{type(error).__name__}: {error}"
            logger.warning("Round %d: client %d failed and is left out: %s", record["round"], client_id, error)
        finally:
            self.client.end_local()
            self.optimizer.sampler.set_schedule(None)
            self.optimizer.accumulators = self.client.synced.clone()

    def end_round(self, round_index: int) -> dict:
        record = self._round
        sample_counts = {client_id: len(self.partition.clients[client_id]) for client_id in record["clients"]}
        result = self.server.aggregate(round_index, record["updates"], sample_counts=sample_counts)
        for client_id, reason in result.rejected.items():
            logger.warning("Round %d: update of client %d rejected: %s", round_index, client_id, reason)
        # One rule in every runtime: the model moves by replaying the round's change of the accumulators.
        self.client.catch_up(self._sync(round_index + 1))
        self.optimizer.accumulators = self.client.synced.clone()
        self._round = None
        return round_record(
            round_index,
            record["clients"],
            result,
            losses=record["losses"],
            bytes_up=record["bytes_up"],
            bytes_down=record["bytes_down"],
            failed=record["failed"],
            seconds=time.perf_counter() - record["start"],
        )

    def _sync(self, round_index: int, schedule: torch.Tensor | None = None) -> SyncMessage:
        # What clients receive: the server's published accumulators at the recipe's `sync_precision`.
        return full_sync(self.server, round_index, schedule)

    # ------------------------------------------------------------------ state (saved inside the optimizer's)
    def state_dict(self) -> dict:
        return {
            "config": json.dumps(asdict(self.config), default=str),
            "server": self.server.state_dict(),
            "client": self.client.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = json.loads(state["config"])
        current = json.loads(json.dumps(asdict(self.config), default=str))
        # A field added after the checkpoint was written (sync_precision) took its default in that run.
        defaults = {f.name: f.default for f in fields(self.config) if f.default is not MISSING}
        changed = sorted(
            key for key in current if key != "rounds" and saved.get(key, defaults.get(key)) != current[key]
        )
        if changed:
            raise ValueError(
                f"The checkpoint was trained with another federated setting ({', '.join(changed)} differ); resume "
                "with the same FederatedConfig (only `rounds` may grow)."
            )
        self.server.load_state_dict(state["server"])
        self.client.load_state_dict(state["client"])
        self.client.engine = self.optimizer.engine  # an older checkpoint's engine version, if the optimizer took it
        self.optimizer.accumulators = self.client.synced.clone()
