"""What the Flower ServerApp and ClientApp share: the recipe's data, partition and model, and the local ZO steps."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from ..federated.client import KSeedClient
from ..federated.config import FederatedConfig
from ..federated.protocol import SyncMessage, UpdateMessage
from ..federated.rounds import make_server
from ..federated.schedule import RoundSchedule, build_partition, client_seed_schedule
from ..federated.server import KSeedServer
from ..trainer_rounds import ClientRowStream

__all__ = [
    "FLOWER_EXTRA",
    "METRICS_RECORD",
    "NODE_RECORD",
    "QUERY",
    "SYNC_RECORD",
    "TRAIN",
    "UPDATE_RECORD",
    "FederatedTask",
    "FlowerConfig",
    "load_task",
    "require_flwr",
]

FLOWER_EXTRA = 'pip install "hf-fedkseed[flower]"'
# The message types of the app: registration ("query": which partition a node holds) and one round ("train").
QUERY = "query"
TRAIN = "train"
# Record names inside a Flower `RecordDict`; the keys inside each record are our own field names.
SYNC_RECORD = "sync"
UPDATE_RECORD = "update"
METRICS_RECORD = "metrics"
NODE_RECORD = "node"


def require_flwr():
    """Import `flwr` or raise an ImportError that names the extra to install.

    Raises:
        ImportError: if Flower is not installed.

    Example:
        >>> flwr = require_flwr()
    """
    try:
        import flwr
    except ImportError as error:
        raise ImportError(f"The Flower runtime needs Flower (flwr); install it with `{FLOWER_EXTRA}`.") from error
    return flwr


@dataclass
class FlowerConfig:
    """The Flower-only settings of a run; everything else comes from the recipe.

    With `flwr run`, these are the keys of the app's `[tool.flwr.app.config]` (same names), beside `recipe`.
    """

    recipe: str = field(metadata={"help": "Path of the YAML recipe both apps read (recipes/*.yaml)."})
    recipe_overrides: str = field(
        default="", metadata={"help": "Recipe overrides as one string of `--field value` pairs."}
    )
    round_timeout: float = field(
        default=3600.0, metadata={"help": "Seconds the server waits for a round's replies; late nodes are left out."}
    )
    num_supernodes: int | None = field(
        default=None, metadata={"help": "Simulated SuperNodes (default: one per client of the partition)."}
    )
    client_num_cpus: float = field(default=1.0, metadata={"help": "CPU cores Ray gives each simulated ClientApp."})
    sync_from: str = field(
        default="node",
        metadata={
            "help": "Where a node's syncs start: `node` (its last sync: each SuperNode keeps its own model between "
            "rounds) or `start` (round 0: nodes share processes, as in the local simulation, and each process "
            "applies the rounds it lacks)."
        },
    )

    def __post_init__(self):
        if not isinstance(self.recipe, str) or not self.recipe:
            raise ValueError("`recipe` must be the path of a YAML recipe, e.g. recipes/quickstart.yaml.")
        if not isinstance(self.round_timeout, (int, float)) or not self.round_timeout > 0:
            raise ValueError(f"Invalid `round_timeout`: {self.round_timeout!r}; it must be a number of seconds > 0.")
        if self.num_supernodes is not None and (
            not isinstance(self.num_supernodes, int) or isinstance(self.num_supernodes, bool) or self.num_supernodes < 1
        ):
            raise ValueError(f"Invalid `num_supernodes`: {self.num_supernodes!r}; it must be a positive integer.")
        if not isinstance(self.client_num_cpus, (int, float)) or not self.client_num_cpus > 0:
            raise ValueError(f"Invalid `client_num_cpus`: {self.client_num_cpus!r}; it must be a number > 0.")
        if self.sync_from not in ("node", "start"):
            raise ValueError(f"Invalid `sync_from`: {self.sync_from!r}; choose `node` or `start`.")

    @property
    def overrides(self) -> list[str]:
        return shlex.split(self.recipe_overrides)

    @classmethod
    def from_run_config(cls, run_config) -> FlowerConfig:
        """Read the settings from a Flower `run_config` (`flwr run ... --run-config "recipe='...'"`).

        Raises:
            ValueError: if `recipe` is missing or a value is invalid.
        """
        if "recipe" not in run_config:
            raise ValueError(
                "The Flower run config has no `recipe`; run `flwr run . --run-config \"recipe='recipes/x.yaml'\"`."
            )
        known = {"recipe", "recipe_overrides", "round_timeout", "num_supernodes", "client_num_cpus", "sync_from"}
        return cls(**{key: value for key, value in run_config.items() if key in known})


class _LocalStepRecorder(TrainerCallback):
    """Records each local step of a client's Trainer run in its `KSeedClient` (as `FederatedCallback` does)."""

    def __init__(self, client, optimizer):
        self.client, self.optimizer, self.losses = client, optimizer, []

    def on_step_end(self, args, state, control, **kwargs):
        self.losses.append(self.optimizer.last_step["loss"])
        self.client.record_step(self.optimizer.last_step)


class FederatedTask:
    """A recipe loaded for one Flower process: its data, partition and (for a client) model and optimizer.

    Everything is built by `hf_fedkseed.build` and the round core, as `hf-fedkseed train` builds it, so a Flower run
    and the in-process emulation of the same recipe start from the same `w0`, shards, seed pool and server; a
    client's local steps run through the stock `transformers.Trainer` with `KSeedZOOptimizer`, as in the emulation.

    Args:
        recipe: path of the YAML recipe.
        overrides: `--field value` overrides of the recipe.
        with_model: also build the model, optimizer and `KSeedClient` (a ServerApp needs only the partition).

    Raises:
        RecipeError: for a recipe that cannot be parsed.
        ValueError: for a learning-rate schedule that is not a `LambdaLR` (it could not be replayed by step).

    Example:
        >>> task = FederatedTask("recipes/quickstart.yaml", ["--rounds", "2"])
        >>> task.partition.num_clients
        6
    """

    def __init__(self, recipe: str | Path, overrides: Sequence[str] = (), *, with_model: bool = True):
        from ..build import build_data
        from ..configs import parse_recipe

        self.recipe, self.overrides = str(recipe), list(overrides)
        parsed = parse_recipe(recipe, overrides, prog="hf-fedkseed flower")
        self.model_args, self.data_args, self.zo_args, self.federated, self.training_args = parsed
        self.federated: FederatedConfig
        data = build_data(self.data_args, self.model_args, seed=self.training_args.seed, with_eval=False)
        self.tokenizer, self.train_rows, self.collator = data.tokenizer, data.train_rows, data.collator
        self.partition = build_partition(self.federated, self.train_rows)
        self.schedule = RoundSchedule(self.federated, self.partition.num_clients, self.training_args.seed)
        self.clients_per_round = self.schedule.clients_per_round
        args = self.training_args
        self.per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        self.total_steps = self.schedule.total_steps
        self.max_steps = args.max_steps if args.max_steps > 0 else self.total_steps
        self.model = self.optimizer = self.client = None
        if with_model:
            self._build_model()

    def make_server(self) -> KSeedServer:
        """The `KSeedServer` of the recipe: the one `FederatedCallback` builds for `hf-fedkseed train`."""
        return make_server(
            self.federated, self.partition.num_clients, num_seeds=self.zo_args.num_seeds, seed=self.training_args.seed
        )

    def step_offset(self, round_index: int, slot: int) -> int:
        """The emulation's Trainer step at which the `slot`-th client of `round_index` starts its local steps."""
        return self.schedule.step_offset(round_index, slot)

    def _build_model(self) -> None:
        from transformers import get_scheduler

        from ..build import build_optimizer, load_model
        from ..trainer_rounds import model_columns

        args = self.training_args
        self.model = load_model(self.model_args, seed=args.seed, vocab_size=len(self.tokenizer))
        self.optimizer = build_optimizer(self.model, self.zo_args, args)
        self.client = KSeedClient(
            self.optimizer.named_params,
            engine=self.optimizer.engine,
            seed_pool=self.optimizer.seed_pool,
            undo=self.federated.undo,
        )
        # The Trainer's schedule over the whole emulated run, evaluated at any step: lr(t) = base * lambda(t).
        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer=self.optimizer,
            num_warmup_steps=args.get_warmup_steps(self.max_steps),
            num_training_steps=self.max_steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs,
        )
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(
                f"`lr_scheduler_type={args.lr_scheduler_type!r}` cannot be replayed by step in a Flower client; use a "
                "step-wise schedule such as constant, linear or cosine."
            )
        self._lr_lambda = scheduler.lr_lambdas[0]
        self.columns = model_columns(self.model) if args.remove_unused_columns else None

    def train_client(
        self, syncs: Sequence[SyncMessage], *, client_id: int, step_offset: int
    ) -> tuple[UpdateMessage, list[float]]:
        """One client's part of a round: catch up round by round, run `local_steps` ZO steps, undo them, report.

        The local steps run through the stock Trainer and `KSeedZOOptimizer`, as in the emulation: the same rows
        (`ClientRowStream`), micro-batches and `num_items_in_batch`, the seed indices of the last sync's schedule
        (Pro) or the uniform draw keyed by (seed, round, client), and the learning rate of the emulation's steps
        `step_offset + t`.

        Args:
            syncs: the decoded `SyncMessage`s of the round, applied in order (`SyncChain.for_client`).
            client_id: the partition this node trains on.
            step_offset: the emulated Trainer step of this client's first local step.

        Returns:
            The `UpdateMessage` of the local steps and the loss of every step.

        Raises:
            RuntimeError: if the task was built without a model.
            ValueError: for a client id outside the partition, a sync for another K or a state this client does
                not hold, a seed schedule that is not exactly `local_steps` long, or a `step_offset` outside the run
                (nothing is topped up or skipped).
        """
        if self.model is None:
            raise RuntimeError("This FederatedTask was built with `with_model=False`; a client needs the model.")
        if not 0 <= client_id < self.partition.num_clients:
            raise ValueError(f"client_id {client_id} is outside the partition's [0, {self.partition.num_clients}).")
        if not syncs:
            raise ValueError("The round carries no SyncMessage; the server sends at least one.")
        # Nothing the server sends is taken on faith either: refuse, with the reason, before any state changes.
        for sync in syncs:
            if sync.num_seeds != self.optimizer.num_seeds:
                raise ValueError(
                    f"The sync is for K={sync.num_seeds} seeds but this client's optimizer has K="
                    f"{self.optimizer.num_seeds}; server and clients must run the same recipe (`num_seeds`)."
                )
        final = syncs[-1]
        directions = self.optimizer.directions
        draws = self.federated.local_steps * directions
        if final.seed_schedule is not None and final.seed_schedule.numel() != draws:
            raise ValueError(
                f"The sync's seed schedule holds {final.seed_schedule.numel()} seed indices but a client takes "
                f"local_steps={self.federated.local_steps} steps of {directions} direction(s); the server must "
                "schedule exactly one per step and direction (server and clients must run the same recipe)."
            )
        last_offset = self.total_steps - self.federated.local_steps
        if isinstance(step_offset, bool) or not isinstance(step_offset, int) or not 0 <= step_offset <= last_offset:
            raise ValueError(
                f"`step_offset`={step_offset!r} is outside this run: a client's first step is in [0, {last_offset}] "
                f"({self.total_steps} steps in all)."
            )
        config, optimizer, client = self.federated, self.optimizer, self.client
        round_index = final.server_round
        for sync in syncs:  # rounds this process's model already holds (another node it hosts synced) are skipped
            if client.synced_round is None or sync.server_round > client.synced_round:
                client.catch_up(sync)
        optimizer.accumulators = client.synced.clone()
        schedule = final.seed_schedule
        if schedule is None:
            schedule = client_seed_schedule(self.training_args.seed, round_index, client_id, draws, optimizer.num_seeds)
        optimizer.sampler.set_schedule(schedule)
        client.begin_local()
        recorder = _LocalStepRecorder(client, optimizer)
        try:
            self._local_trainer(round_index, client_id, step_offset, recorder).train()
            update = client.build_update(
                server_round=round_index,
                client_id=client_id,
                num_samples=len(self.partition.clients[client_id]),
                pro=config.pro,
            )
        finally:
            optimizer.eval()
            client.end_local()
            optimizer.sampler.set_schedule(None)
            optimizer.accumulators = client.synced.clone()
        return update, recorder.losses

    def _local_trainer(self, round_index: int, client_id: int, step_offset: int, recorder: TrainerCallback):
        """A stock Trainer over this client's rows of the round, at the emulation's learning rates."""
        from transformers import Trainer

        lr_lambda = self._lr_lambda
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_lambda(step_offset + step))
        args = replace(
            self.training_args,
            max_steps=self.federated.local_steps,
            output_dir=str(Path(self.training_args.output_dir) / ".flower_client"),
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            resume_from_checkpoint=None,
        )
        stream = ClientRowStream(
            self.train_rows, self.partition, self.federated, [(round_index, client_id)], self.per_step, self.columns
        )
        trainer = Trainer(
            model=self.model,
            args=args,
            train_dataset=stream,
            data_collator=self.collator,
            optimizers=(self.optimizer, scheduler),
            callbacks=[recorder],
        )
        trainer.remove_callback(PrinterCallback)  # a node logs its round through the server, not a line per call
        return trainer


_TASKS: dict[tuple, FederatedTask] = {}


def load_task(recipe: str | Path, overrides: Sequence[str] = (), *, with_model: bool = True) -> FederatedTask:
    """The process-wide `FederatedTask` of a recipe: built once, then reused by every message this process handles.

    One model object serves every node a process hosts (as in the emulation): each round's catch-up moves it to the
    server's accumulators, whatever client it served last.

    Example:
        >>> task = load_task("recipes/quickstart.yaml", ["--rounds", "2"])
    """
    key = (str(Path(recipe).resolve()), tuple(overrides), with_model)
    if key not in _TASKS:
        _TASKS[key] = FederatedTask(recipe, overrides, with_model=with_model)
    return _TASKS[key]
