"""The Trainer side of every emulated federated method: the client stream, round boundaries and the round log."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

from torch.utils.data import IterableDataset
from transformers import TrainerCallback

from .federated.config import FederatedConfig
from .federated.partition import Partition
from .federated.rounds import RoundLog
from .federated.schedule import RoundSchedule, build_partition, client_step_rows, resolve_clients_per_round

__all__ = ["ClientRowStream", "FederatedRoundsCallback", "FederatedTrainDataset"]

logger = logging.getLogger(__name__)


class ClientRowStream(IterableDataset):
    """The training rows of `(round, client)` pairs, in step order, with only the columns the model takes.

    Item `k` of local step `t` is row `perm[(t * per_step + k) % n]` of the client's shard (`client_step_rows`), so
    every batch of a local step comes from the active client's shard and the stream is a pure function of the
    configuration: the Trainer's resume replays it exactly, and a Flower node feeds the very same batches.
    """

    def __init__(self, dataset, partition: Partition, config: FederatedConfig, pairs, per_step: int, columns=None):
        self.dataset, self.partition, self.config = dataset, partition, config
        self.pairs, self.per_step, self.columns = pairs, per_step, columns

    def __iter__(self):
        for round_index, client in self.pairs:
            rows = self.partition.clients[client]
            for index in client_step_rows(self.config, self.per_step, round_index, client, rows):
                item = self.dataset[index]
                yield item if self.columns is None else {k: v for k, v in item.items() if k in self.columns}


class FederatedTrainDataset(IterableDataset):
    """The emulation's training stream: the rows of each round's selected clients, round after round."""

    def __init__(self, callback: FederatedRoundsCallback):
        self.callback = callback

    def __iter__(self):
        callback = self.callback
        if callback.per_step is None:
            raise RuntimeError("The federated train_dataset is iterated by the Trainer once its callback has started.")
        pairs = (
            (round_index, client)
            for round_index in range(callback.config.rounds)
            for client in callback.selected_clients(round_index)
        )
        stream = ClientRowStream(
            callback.dataset, callback.partition, callback.config, pairs, callback.per_step, callback.columns
        )
        yield from stream


def model_columns(model) -> list[str]:
    """The batch columns a model's forward takes, as the Trainer keeps them with `remove_unused_columns`."""
    signature = inspect.signature(model.forward).parameters
    return [name for name in signature if name not in ("self", "kwargs")] + ["label", "labels"]


class FederatedRoundsCallback(TrainerCallback):
    """What every federated method emulated in one stock `transformers.Trainer` shares.

    One Trainer optimizer step is one local step of the active client, round after round, so a run is
    `rounds * clients_per_round * local_steps` Trainer steps, and `train_dataset` feeds each step from the active
    client's shard. This base checks the Trainer setup, finds round and client boundaries, defers checkpoints and
    evaluations asked for mid-round to the round's end, keeps `rounds.jsonl` (repaired on resume) and puts the
    round's fields in the Trainer log. Subclasses (`FederatedCallback` for FedKSeed, `FedAvgCallback` for the
    baselines) implement `setup`, `start`, `begin_round`, `begin_client`, `after_step`, `end_client` and
    `end_round`.
    """

    def __init__(self, config: FederatedConfig, train_dataset, partition: Partition | None = None):
        self.config = config
        self.dataset = train_dataset
        self.partition = build_partition(config, train_dataset) if partition is None else partition
        self.clients_per_round = resolve_clients_per_round(self.partition.num_clients, config)
        self.train_dataset = FederatedTrainDataset(self)
        self.seed: int | None = None  # selects the clients; set in `setup` (the optimizer's or the Trainer's seed)
        self.schedule: RoundSchedule | None = None  # built once `setup` has set the seed
        self.columns: list[str] | None = None
        self.per_step: int | None = None
        self.log: RoundLog | None = None
        self.history: list[dict] = []
        self._round: dict | None = None
        self._deferred: set[str] = set()  # control flags raised mid-round, honoured at the round's end
        self._pending_log: dict | None = None

    # ------------------------------------------------------------------ subclass hooks
    def setup(self, args, model, optimizer) -> None:
        """At `on_init_end`: check the model and optimizer; set `self.seed`."""
        raise NotImplementedError

    def start(self, args, state, optimizer) -> None:
        """At `on_train_begin`, before the resume check: build per-run state (may restore a checkpoint's)."""

    def begin_round(self, round_index: int) -> None:
        raise NotImplementedError

    def begin_client(self, slot: int, optimizer) -> None:
        raise NotImplementedError

    def after_step(self, slot: int, optimizer) -> None:
        """After every local step (record its loss)."""

    def end_client(self, slot: int) -> None:
        raise NotImplementedError

    def end_round(self, round_index: int) -> dict:
        """Aggregate and return the round's record."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.config.method

    # ------------------------------------------------------------------ schedule
    @property
    def total_steps(self) -> int:
        """The Trainer steps the run takes: `rounds * clients_per_round * local_steps` (set `max_steps` to it)."""
        return self.config.rounds * self.clients_per_round * self.config.local_steps

    def selected_clients(self, round_index: int) -> list[int]:
        """The ids of the clients that train in round `round_index` (the same draw for every method)."""
        return self.schedule.selected_clients(round_index)

    def where(self, global_step: int) -> tuple[int, int, int]:
        """(round, slot among the round's clients, local step) of a Trainer optimizer step."""
        return self.schedule.where(global_step)

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

    # ------------------------------------------------------------------ Trainer events
    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.setup(args, model, optimizer)
        self.schedule = RoundSchedule(self.config, self.partition.num_clients, self.seed)
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
            self.columns = model_columns(model)

    def on_train_begin(self, args, state, control, train_dataloader=None, optimizer=None, **kwargs):
        if train_dataloader is not None and getattr(train_dataloader, "dataset", None) is not self.train_dataset:
            raise ValueError(
                "Pass `train_dataset=federated.train_dataset` to the Trainer, so each local step reads its client."
            )
        # Rows per local step: with several processes (`accelerate launch`) the main process reads every rank's
        # micro-batches from this stream and dispatches them, and the ranks all-reduce their two losses.
        self.per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.start(args, state, optimizer)
        round_index, slot, local_step = self.where(state.global_step)
        if slot or local_step:
            raise ValueError(
                f"Resuming at step {state.global_step}, inside round {round_index}; federated checkpoints land on "
                "round boundaries, so resume from one of those."
            )
        if state.is_world_process_zero:
            self.log = RoundLog(Path(args.output_dir) / "rounds.jsonl")
            self.history = self.log.restore(keep_below=round_index, resumed_from=args.resume_from_checkpoint)
        logger.info(
            "%s: %d clients, %d per round, %d rounds x %d local steps = %d Trainer steps",
            self.describe(),
            self.partition.num_clients,
            self.clients_per_round,
            self.config.rounds,
            self.config.local_steps,
            self.total_steps,
        )

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        round_index, slot, local_step = self.where(state.global_step)
        if local_step:
            return
        if slot == 0:
            self.begin_round(round_index)
        self.begin_client(slot, optimizer)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        round_index, slot, local_step = self.where(state.global_step - 1)  # global_step already counts this step
        self.after_step(slot, optimizer)
        if local_step == self.config.local_steps - 1:
            self.end_client(slot)
            if slot == self.clients_per_round - 1:
                self._finish_round(self.end_round(round_index))
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

    def _finish_round(self, entry: dict) -> None:
        self.history.append(entry)
        self._pending_log = {
            "round": entry["round"],
            "round_train_loss": entry["train_loss"],
            "bytes_up": entry["bytes_up"],
            "bytes_down": entry["bytes_down"],
            "round_seconds": entry["seconds"],
        }
        if "seeds_touched" in entry:
            self._pending_log["seeds_touched"] = entry["seeds_touched"]
        if self.log is not None:
            self.log.append(entry)
        logger.info(
            "round %d/%d  loss %.4f  bytes/client %.0f  %.1fs",
            entry["round"] + 1,
            self.config.rounds,
            entry["train_loss"],
            entry["bytes_per_client"],
            entry["seconds"],
        )
