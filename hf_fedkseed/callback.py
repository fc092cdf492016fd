"""FederatedCallback: FedKSeed rounds emulated inside one stock `transformers.Trainer`, over dataset shards."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import IterableDataset
from transformers import TrainerCallback

from .federated.client import UNDO_MODES, KSeedClient
from .federated.partition import STRATEGIES, Partition, partition_dataset
from .federated.protocol import SyncMessage, UpdateMessage
from .federated.server import AGGREGATIONS, DEFAULT_PRO_CLIP, ClientUpdate, KSeedServer
from .optimizer import KSeedZOOptimizer
from .perturbation import _splitmix64

logger = logging.getLogger(__name__)

_STATE_NAME = "federated"
# The federated tuning methods a recipe's `method` selects; the last three live in hf_fedkseed.baselines.
METHODS = ("fedkseed", "fedkseed_pro", "fedzo", "fedit", "fedavg")
_DATA_SALT = 0xDA7A
_SCHEDULE_SALT = 0x5C4ED


def _mix(*parts: int) -> int:
    """A 64-bit hash of a tuple of integers: seeds one private generator per (purpose, round, client)."""
    value = 0
    for part in parts:
        value = _splitmix64(value ^ (part & ((1 << 64) - 1)))
    return value


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


def client_step_rows(config: FederatedConfig, per_step: int, round_index: int, client: int, rows) -> list[int]:
    """The dataset rows a client reads in a round, in order: `per_step` rows for each of its `local_steps` steps.

    Row `k` of local step `t` is `rows[perm[(t * per_step + k) % len(rows)]]`, with `perm` a permutation of the
    shard drawn from `(partition_seed, round, client)` alone, so any runtime that knows the round and the client
    feeds the same batches.

    Example:
        >>> client_step_rows(config, per_step=4, round_index=0, client=3, rows=partition.clients[3])[:4]
    """
    generator = torch.Generator().manual_seed(_mix(_DATA_SALT, config.partition_seed, round_index, client))
    order = torch.randperm(len(rows), generator=generator).tolist()
    return [rows[order[position % len(rows)]] for position in range(config.local_steps * per_step)]


def pro_seed_schedule(server: KSeedServer, seed: int, round_index: int, client: int, local_steps: int) -> torch.Tensor:
    """FedKSeed-Pro: the `local_steps` seed indices the server draws for a client from its current probabilities.

    The draw comes from a private generator seeded from `(seed, round, client)`, so every runtime sends the same.

    Example:
        >>> schedule = pro_seed_schedule(server, seed=42, round_index=3, client=5, local_steps=200)
    """
    generator = torch.Generator().manual_seed(_mix(_SCHEDULE_SALT, seed, round_index, client))
    return torch.multinomial(server.probabilities(), local_steps, replacement=True, generator=generator)


class FederatedTrainDataset(IterableDataset):
    """The Trainer's training stream: the rows of each round's selected clients, in step order.

    Item `k` of optimizer step `s` is row `perm[(t * per_step + k) % n]` of the active client's shard, where
    `(round, slot, t)` is where step `s` falls, `perm` a permutation of the shard drawn from (seed, round, client),
    and `per_step = per_device_train_batch_size * gradient_accumulation_steps`. So every batch of a local step comes
    from the active client's shard, and the stream is a pure function of the configuration, which makes resuming
    (the Trainer replays the stream up to the checkpoint) exact.
    """

    def __init__(self, callback: FederatedCallback):
        self.callback = callback

    def __iter__(self):
        callback = self.callback
        if callback.per_step is None:
            raise RuntimeError("FederatedTrainDataset is iterated by the Trainer once FederatedCallback has started.")
        config, per_step = callback.config, callback.per_step
        for round_index in range(config.rounds):
            for client in callback.selected_clients(round_index):
                rows = callback.partition.clients[client]
                for index in client_step_rows(config, per_step, round_index, client, rows):
                    yield callback.row(index)


class RoundScheduleCallback(TrainerCallback):
    """What every in-process federated runtime shares: the partition, the step schedule and the client stream.

    One Trainer optimizer step is one local step of the active client, round after round, so a run is
    `rounds * clients_per_round * local_steps` Trainer steps, and `train_dataset` feeds each step from the active
    client's shard. Subclasses (`FederatedCallback`, `hf_fedkseed.baselines.FedAvgCallback`) pick the clients and
    aggregate.
    """

    def __init__(self, config: FederatedConfig, train_dataset, partition: Partition | None = None):
        self.config = config
        self.dataset = train_dataset
        self.partition = build_partition(config, train_dataset) if partition is None else partition
        self.clients_per_round = KSeedServer.resolve_clients_per_round(
            self.partition.num_clients, config.clients_per_round, config.client_fraction
        )
        self.train_dataset = FederatedTrainDataset(self)
        self.columns: list[str] | None = None
        self.per_step: int | None = None
        self.rounds_path: Path | None = None
        self.history: list[dict] = []
        self._round: dict | None = None
        self._deferred: set[str] = set()  # control flags raised mid-round, honoured at the round's end
        self._pending_log: dict | None = None

    def move_before_reporters(self, trainer) -> None:
        """Run this callback right after the Trainer's flow callback, before the `report_to` integrations.

        The Trainer registers its reporting callbacks (wandb, tensorboard, ...) before user callbacks, so by default
        they log a step before this callback adds the round's fields to it. Moving it up lets `report_to` see the
        round records; it must stay after `DefaultFlowCallback`, whose save and evaluate requests it defers to
        round boundaries.

        Example:
            >>> trainer = Trainer(..., callbacks=[federated])
            >>> federated.move_before_reporters(trainer)
        """
        from transformers.trainer_callback import DefaultFlowCallback

        callbacks = trainer.callback_handler.callbacks
        callbacks.remove(self)
        position = next((i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), 0)
        callbacks.insert(position, self)

    @property
    def total_steps(self) -> int:
        """The Trainer steps the run takes: `rounds * clients_per_round * local_steps` (set `max_steps` to it)."""
        return self.config.rounds * self.clients_per_round * self.config.local_steps

    def selected_clients(self, round_index: int) -> list[int]:
        """The ids of the clients that train in round `round_index` (each runtime selects its own way)."""
        raise NotImplementedError

    def where(self, global_step: int) -> tuple[int, int, int]:
        """(round, slot among the round's clients, local step) of a Trainer optimizer step."""
        steps_per_round = self.clients_per_round * self.config.local_steps
        return (
            global_step // steps_per_round,
            (global_step % steps_per_round) // self.config.local_steps,
            global_step % self.config.local_steps,
        )

    def row(self, index: int) -> dict:
        item = self.dataset[index]
        return item if self.columns is None else {k: v for k, v in item.items() if k in self.columns}

    def _rewrite_rounds_file(self, keep_below: int, resumed_from: str | None = None) -> None:
        """Keep the records of the rounds before the resumed one, as the file and as `history`.

        A killed run may have logged later rounds (dropped here) or torn its last line mid-write (dropped with a
        warning). The kept records become `history`, so the summaries of a resumed run cover every round. Without
        a `rounds.jsonl` in the output directory, the one beside the checkpoint `resumed_from` is read.
        """
        source = self.rounds_path
        if not source.exists() and resumed_from:
            source = Path(resumed_from).parent / "rounds.jsonl"
        kept: list[dict] = []
        if keep_below and source.exists():
            lines = source.read_text(encoding="utf-8", errors="replace").splitlines()
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    round_index = record["round"]
                except (json.JSONDecodeError, TypeError, KeyError):
                    where = "its last line is torn (a run killed mid-write)" if number == len(lines) else "a line"
                    logger.warning("%s: %s; dropped line %d: %.60s", source, where, number, line)
                    continue
                if isinstance(round_index, int) and round_index < keep_below:
                    kept.append(record)
        kept = list({record["round"]: record for record in kept}.values())  # a repeated round: its last record
        kept.sort(key=lambda record: record["round"])
        if keep_below and [record["round"] for record in kept] != list(range(keep_below)):
            logger.warning(
                "%s holds records of %d of the %d rounds before the resumed one; the run's summaries cover only the "
                "rounds recorded.",
                source,
                len(kept),
                keep_below,
            )
        self.history = kept
        temporary = self.rounds_path.with_name(f".{self.rounds_path.name}.tmp")
        temporary.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
        temporary.replace(self.rounds_path)


class FederatedCallback(RoundScheduleCallback):
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
        self._client_index: int | None = None

    # ------------------------------------------------------------------ schedule
    def selected_clients(self, round_index: int) -> list[int]:
        return self.server.select_clients(round_index)

    # ------------------------------------------------------------------ Trainer events
    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not isinstance(optimizer, KSeedZOOptimizer):
            raise TypeError("FederatedCallback needs `optimizers=(KSeedZOOptimizer(model, ...), None)` in the Trainer.")
        if any(group["weight_decay"] != 0 for group in optimizer.param_groups):
            raise ValueError(
                "FederatedCallback needs `weight_decay=0` in KSeedZOOptimizer: with decay the model is no longer "
                "`w0 - sum_j A_j z_j`, so K scalars cannot describe it."
            )
        self.optimizer = optimizer
        self.server = KSeedServer(
            self.partition.num_clients,
            num_seeds=optimizer.num_seeds,
            seed=optimizer.seed,
            clients_per_round=self.clients_per_round,
            aggregation=self.config.aggregation,
            pro=self.config.pro,
            pro_clip=self.config.pro_clip,
            max_abs_scalar=self.config.max_abs_scalar,
        )
        if not torch.equal(self.server.seed_pool, optimizer.seed_pool):
            raise ValueError(
                "The optimizer's seed pool is not the one its `seed` draws; FederatedCallback needs the pool that "
                "`make_seed_pool(num_seeds, seed)` gives (do not pass `seed_pool=`)."
            )
        if args.dataloader_num_workers > 0:
            raise ValueError(
                f"`dataloader_num_workers`={args.dataloader_num_workers}: the federated stream must be read in step "
                "order (each worker would replay all of it); set `dataloader_num_workers=0`."
            )
        if args.max_steps < self.total_steps:
            raise ValueError(
                f"`max_steps`={args.max_steps} cannot hold {self.config.rounds} rounds x {self.clients_per_round} "
                f"clients x {self.config.local_steps} local steps; set `max_steps={self.total_steps}`."
            )
        if args.remove_unused_columns and model is not None:
            import inspect

            signature = inspect.signature(model.forward).parameters
            self.columns = [name for name in signature if name not in ("self", "kwargs")] + ["label", "labels"]

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if train_dataloader is not None and getattr(train_dataloader, "dataset", None) is not self.train_dataset:
            raise ValueError(
                "Pass `train_dataset=federated.train_dataset` to the Trainer, so each local step reads its client."
            )
        self.per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        optimizer = self.optimizer
        self.client = KSeedClient(
            optimizer.named_params, engine=optimizer.engine, seed_pool=optimizer.seed_pool, undo=self.config.undo
        )
        optimizer.attach_state(_STATE_NAME, self)  # restores the federated state when resuming
        round_index, slot, local_step = self.where(state.global_step)
        if slot or local_step:
            raise ValueError(
                f"Resuming at step {state.global_step}, inside round {round_index}; FederatedCallback checkpoints "
                "land on round boundaries, so resume from one of those."
            )
        if state.is_world_process_zero:
            self.rounds_path = Path(args.output_dir) / "rounds.jsonl"
            self.rounds_path.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite_rounds_file(keep_below=round_index, resumed_from=args.resume_from_checkpoint)
        logger.info(
            "FedKSeed%s: %d clients, %d per round, %d rounds x %d local steps = %d Trainer steps",
            "-Pro" if self.config.pro else "",
            self.partition.num_clients,
            self.clients_per_round,
            self.config.rounds,
            self.config.local_steps,
            self.total_steps,
        )

    def on_step_begin(self, args, state, control, **kwargs):
        round_index, slot, local_step = self.where(state.global_step)
        if local_step:
            return
        if slot == 0:
            self._begin_round(round_index)
        self._begin_client(slot)

    def on_step_end(self, args, state, control, **kwargs):
        round_index, slot, local_step = self.where(state.global_step - 1)  # global_step already counts this step
        record = self._round
        record["losses"].append(self.optimizer.last_step["loss"])
        self.client.record_step(self.optimizer.last_step)
        if local_step == self.config.local_steps - 1:
            self._end_client()
            if slot == self.clients_per_round - 1:
                self._end_round(round_index)
                control.should_log = True
                # Saves and evaluations asked for during the round happen now, on the aggregated model.
                for flag in self._deferred:
                    setattr(control, flag, True)
                self._deferred.clear()
                if round_index == self.config.rounds - 1:
                    control.should_training_stop = True
                return
        for flag in ("should_save", "should_evaluate"):  # mid-round the weights hold a client's local drift
            if getattr(control, flag):
                self._deferred.add(flag)
                setattr(control, flag, False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending_log is not None and logs is not None:
            logs.update(self._pending_log)
            if state.log_history:
                state.log_history[-1].update(self._pending_log)
            self._pending_log = None

    # ------------------------------------------------------------------ rounds
    def _begin_round(self, round_index: int) -> None:
        self._round = {
            "round": round_index,
            "clients": self.selected_clients(round_index),
            "updates": [],
            "failed": {},
            "losses": [],
            "bytes_up": 0,
            "bytes_down": 0,
            "aggregated": {},  # client id -> unnormalised weight, added to the client's running aggregate
            "start": time.perf_counter(),
        }
        if self.config.undo == "snapshot":
            self.client.reset_aggregate()
        if self.client.synced_round is None:  # the first round: everyone starts at w0
            self.client.catch_up(self._sync_message(round_index, schedule=None))

    def _begin_client(self, slot: int) -> None:
        record = self._round
        client_id = record["clients"][slot]
        schedule = None
        if self.config.pro:  # the server draws the client's tau seeds from the Pro distribution and sends them
            schedule = pro_seed_schedule(
                self.server, self.optimizer.seed, record["round"], client_id, self.config.local_steps
            )
        sync = self._sync_message(record["round"], schedule=schedule)
        payload = sync.encode()
        record["bytes_down"] += len(payload)
        received = SyncMessage.decode(payload)
        self.client.catch_up(received)
        self.optimizer.sampler.set_schedule(received.seed_schedule)
        self.client.begin_local()
        self._client_index = slot

    def _end_client(self) -> None:
        record = self._round
        client_id = record["clients"][self._client_index]
        weight = 0.0
        try:
            num_samples = len(self.partition.clients[client_id])  # known to the runtime, never taken from a client
            update = self.client.build_update(
                server_round=record["round"], client_id=client_id, num_samples=num_samples, pro=self.config.pro
            )
            payload = update.encode()
            record["bytes_up"] += len(payload)
            received = UpdateMessage.decode(payload)
            client_update = ClientUpdate(
                client_id=received.client_id,
                num_samples=received.num_samples,
                seed_indices=received.seed_indices,
                scalars=received.scalars,
                projected_grads=received.projected_grads,
                server_round=received.server_round,
                num_seeds=received.num_seeds,
            )
            record["updates"].append(client_update)
            if self.server.check_update(record["round"], client_update) is None:
                weight = self.server.client_weight(num_samples)
                record["aggregated"][client_id] = weight
        except Exception as error:  # a failing client is left out of this round; the round goes on
            record["failed"][client_id] = f"{type(error).__name__}: {error}"
            logger.warning("Round %d: client %d failed and is left out: %s", record["round"], client_id, error)
        finally:
            self.client.end_local(weight if self.config.undo == "snapshot" else 0.0)
            self.optimizer.sampler.set_schedule(None)
            self.optimizer.accumulators = self.client.synced.clone()

    def _end_round(self, round_index: int) -> None:
        record = self._round
        sample_counts = {client_id: len(self.partition.clients[client_id]) for client_id in record["clients"]}
        result = self.server.aggregate(round_index, record["updates"], sample_counts=sample_counts)
        for client_id, reason in result.rejected.items():
            logger.warning("Round %d: update of client %d rejected: %s", round_index, client_id, reason)
        sync = self._sync_message(round_index + 1, schedule=None)
        aggregated = record["aggregated"]
        corrections = self._corrections(aggregated, result) if self.config.undo == "snapshot" else None
        if corrections is not None:
            # The weighted sum of the accepted clients' weight changes is the round's update: apply it in one pass
            # instead of replaying every touched seed; a clipped client's share is then scaled down by replaying its
            # own seeds only.
            self.client.commit_aggregate(
                sync,
                scale=1.0 / sum(aggregated.values()),
                correction=self._correction_coefficients(record["updates"], corrections),
            )
        else:  # a robust statistic or a client screened out: replay the server's accumulators
            self.client.catch_up(sync)
        self.optimizer.accumulators = self.client.synced.clone()
        clients = len(record["clients"])
        entry = {
            "round": round_index,
            "clients": record["clients"],
            "accepted": result.accepted,
            "failed": sorted(record["failed"]),
            "rejected": sorted(result.rejected),
            "reasons": {str(client_id): result.rejected[client_id] for client_id in sorted(result.rejected)},
            "weighting": result.weighting,
            "clipped": {str(client_id): factor for client_id, factor in sorted(result.clipped.items())},
            "train_loss": sum(record["losses"]) / max(len(record["losses"]), 1),
            "bytes_up": record["bytes_up"],
            "bytes_down": record["bytes_down"],
            "bytes_per_client": (record["bytes_up"] + record["bytes_down"]) / clients,
            "seeds_touched": result.seeds_touched,
            "seconds": time.perf_counter() - record["start"],
        }
        self.history.append(entry)
        self._pending_log = {
            "round": entry["round"],
            "round_train_loss": entry["train_loss"],
            "bytes_up": entry["bytes_up"],
            "bytes_down": entry["bytes_down"],
            "seeds_touched": entry["seeds_touched"],
            "round_seconds": entry["seconds"],
        }
        if self.rounds_path is not None:
            with self.rounds_path.open("a") as handle:
                handle.write(json.dumps(entry) + "\n")
        logger.info(
            "round %d/%d  loss %.4f  bytes/client %.0f  seeds %d  %.1fs",
            round_index + 1,
            self.config.rounds,
            entry["train_loss"],
            entry["bytes_per_client"],
            entry["seeds_touched"],
            entry["seconds"],
        )
        self._round = None

    @staticmethod
    def _corrections(aggregated: dict[int, float], result) -> dict[int, float] | None:
        """How the clients' running aggregate differs from the server's round, or None when it cannot be corrected.

        The running aggregate, normalised, gives client c the share `r_c = n_c / sum(n)`; the server's round is
        `sum_c s_c dw_c` (`result.effective_weights`: `s_c = r_c * clip factor`). When both hold the same clients
        with the same unclipped shares, the round is the committed aggregate plus `sum_c (s_c - r_c) dw_c` over the
        clipped clients only: returns `{client_id: s_c - r_c}` of those (empty without clipping). None for a
        coordinate-wise statistic, or when a client in the aggregate was screened out: the others' shares change
        then, which would touch every client, and rejections are rare, so the caller replays the accumulators.
        """
        effective = result.effective_weights
        if not result.accepted or effective is None or sorted(aggregated) != result.accepted:
            return None
        total = sum(aggregated.values())
        corrections = {}
        for client_id, weight in result.weights.items():
            share = aggregated[client_id] / total
            if abs(share - weight) > 1e-12 * weight:  # another weighting than the running aggregate's
                return None
            if client_id in result.clipped:
                corrections[client_id] = effective[client_id] - share
        return corrections

    def _correction_coefficients(self, updates: list[ClientUpdate], corrections: dict[int, float]):
        """`sum_c (s_c - r_c) dw_c` as seed-pool coefficients (float64, K), or None when there is nothing to add.

        A client's local steps moved the weights by `dw_c = -sum_t scalar_t z_{seed_t}`, exactly the per-seed sums of
        the update the server aggregated, so the correction replays only the corrected clients' seeds, merged.
        """
        if not corrections:
            return None
        coefficients = torch.zeros(self.server.num_seeds, dtype=torch.float64)
        for update in updates:
            factor = corrections.get(update.client_id)
            if factor:
                seeds = torch.as_tensor(update.seed_indices).to(torch.int64)
                scalars = torch.as_tensor(update.scalars, dtype=torch.float64)
                coefficients.index_add_(0, seeds, scalars, alpha=-factor)
        return coefficients

    def _sync_message(self, round_index: int, schedule: torch.Tensor | None) -> SyncMessage:
        return SyncMessage.build(
            server_round=round_index, accumulators=self.server.accumulators, encoding="full", seed_schedule=schedule
        )

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
        changed = sorted(key for key in current if key != "rounds" and saved.get(key) != current[key])
        if changed:
            raise ValueError(
                f"The checkpoint was trained with another federated setting ({', '.join(changed)} differ); resume "
                "with the same FederatedConfig (only `rounds` may grow)."
            )
        self.server.load_state_dict(state["server"])
        self.client.load_state_dict(state["client"])
        self.optimizer.accumulators = self.client.synced.clone()
