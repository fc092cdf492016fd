"""What the Flower ServerApp and ClientApp share: the recipe's data, partition and model, and the local ZO steps."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..callback import FederatedConfig, build_partition, client_step_rows
from ..federated.client import KSeedClient
from ..federated.protocol import SyncMessage, UpdateMessage
from ..federated.server import KSeedServer

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
        known = {"recipe", "recipe_overrides", "round_timeout", "num_supernodes", "client_num_cpus"}
        return cls(**{key: value for key, value in run_config.items() if key in known})


class FederatedTask:
    """A recipe loaded for one Flower process: its data, partition and (for a client) model and optimizer.

    The data, partition, model and optimizer are built exactly as `hf-fedkseed train` builds them, so a Flower run
    and the in-process emulation of the same recipe start from the same `w0`, shards and seed pool.

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
        from ..configs import parse_recipe
        from ..data import load_instruction_dataset, tokenize_for_training, training_collator
        from ..pipeline import load_tokenizer

        self.recipe, self.overrides = str(recipe), list(overrides)
        parsed = parse_recipe(recipe, overrides, prog="hf-fedkseed flower")
        self.model_args, self.data_args, self.zo_args, self.federated, self.training_args = parsed
        self.federated: FederatedConfig
        self.tokenizer = load_tokenizer(self.model_args)
        data = load_instruction_dataset(
            self.data_args.dataset_name,
            self.data_args.dataset_format,
            eval_fraction=self.data_args.eval_fraction,
            held_out_categories=self.data_args.held_out_categories,
            max_samples_per_task=self.data_args.max_samples_per_task,
            seed=self.training_args.seed,
        )
        self.train_rows = tokenize_for_training(
            data["train"], self.tokenizer, self.data_args.max_length, prompt_format=self.data_args.prompt_format
        )
        self.partition = build_partition(self.federated, self.train_rows)
        self.clients_per_round = KSeedServer.resolve_clients_per_round(
            self.partition.num_clients, self.federated.clients_per_round, self.federated.client_fraction
        )
        args = self.training_args
        self.per_device_batch = args.per_device_train_batch_size
        self.per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        self.total_steps = self.federated.rounds * self.clients_per_round * self.federated.local_steps
        self.max_steps = args.max_steps if args.max_steps > 0 else self.total_steps
        self.collator = training_collator(self.tokenizer)
        self.model = self.optimizer = self.client = None
        if with_model:
            self._build_model()

    def make_server(self) -> KSeedServer:
        """The `KSeedServer` of the recipe: the same one `FederatedCallback` builds for `hf-fedkseed train`."""
        config = self.federated
        return KSeedServer(
            self.partition.num_clients,
            num_seeds=self.zo_args.num_seeds,
            seed=self.training_args.seed,
            clients_per_round=self.clients_per_round,
            aggregation=config.aggregation,
            pro=config.pro,
            pro_clip=config.pro_clip,
            max_abs_scalar=config.max_abs_scalar,
        )

    def step_offset(self, round_index: int, slot: int) -> int:
        """The emulation's Trainer step at which the `slot`-th client of `round_index` starts its local steps."""
        return (round_index * self.clients_per_round + slot) * self.federated.local_steps

    def _build_model(self) -> None:
        import inspect

        from transformers import get_scheduler

        from ..optimizer import KSeedZOOptimizer
        from ..pipeline import load_model

        args = self.training_args
        self.model = load_model(self.model_args, seed=args.seed, vocab_size=len(self.tokenizer))
        self.optimizer = KSeedZOOptimizer(
            self.model,
            lr=args.learning_rate,
            eps=self.zo_args.zo_eps,
            num_seeds=self.zo_args.num_seeds,
            seed=args.seed,
            engine=self.zo_args.engine,
            grad_clip=self.zo_args.grad_clip,
        )
        self.client = KSeedClient(
            self.optimizer.named_params,
            engine=self.optimizer.engine,
            seed_pool=self.optimizer.seed_pool,
            undo=self.federated.undo,
        )
        # The Trainer's schedule, evaluated at any step: lr(t) = base * lambda(t), as its LambdaLR computes it.
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
        self._base_lr, self._lr_lambda = scheduler.base_lrs[0], scheduler.lr_lambdas[0]
        signature = inspect.signature(self.model.forward).parameters
        self.columns = {name for name in signature if name not in ("self", "kwargs")} | {"label", "labels"}
        # As the Trainer decides whether the model normalises its loss by `num_items_in_batch`.
        self.accepts_num_items = getattr(
            self.model, "accepts_loss_kwargs", any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
        )
        self._sampler_position = 0

    def learning_rate(self, step: int) -> float:
        """The Trainer's learning rate at (0-based) step `step` of the emulated run."""
        return self._base_lr * self._lr_lambda(step)

    def _advance_sampler(self, position: int) -> None:
        """Put the optimizer's seed sampler where the emulation's is after `position` uniform draws."""
        from ..zo import SeedSampler

        optimizer = self.optimizer
        if position < self._sampler_position:  # behind: start the generator over
            optimizer.sampler = SeedSampler(optimizer.num_seeds, optimizer.seed, optimizer.seed_probabilities)
            self._sampler_position = 0
        for _ in range(position - self._sampler_position):
            optimizer.sampler.sample()
        self._sampler_position = position

    def batch(self, indices: Sequence[int]) -> dict:
        """The collated batch of these dataset rows, with the columns the Trainer would keep."""
        rows = [{k: v for k, v in self.train_rows[int(i)].items() if k in self.columns} for i in indices]
        return self.collator(rows)

    @torch.no_grad()
    def train_client(self, sync: SyncMessage, *, client_id: int, step_offset: int) -> tuple[UpdateMessage, list[float]]:
        """One client's part of a round: catch up to `sync`, run `local_steps` ZO steps, undo them, report.

        The steps replay the emulation's: the same rows (`client_step_rows`), the same micro-batches and
        `num_items_in_batch` as the Trainer, the seed indices of `sync.seed_schedule` (Pro) or of the optimizer's
        sampler after `step_offset` draws, and the Trainer's learning rate at steps `step_offset + t`.

        Args:
            sync: the decoded `SyncMessage` of the round.
            client_id: the partition this node trains on.
            step_offset: the emulated Trainer step of this client's first local step.

        Returns:
            The `UpdateMessage` of the local steps and the loss of every step.

        Raises:
            RuntimeError: if the task was built without a model.
            ValueError: for a client id outside the partition, a sync for another K, a seed schedule that is not
                exactly `local_steps` long, or a `step_offset` outside the run (nothing is topped up or skipped).
        """
        if self.model is None:
            raise RuntimeError("This FederatedTask was built with `with_model=False`; a client needs the model.")
        if not 0 <= client_id < self.partition.num_clients:
            raise ValueError(f"client_id {client_id} is outside the partition's [0, {self.partition.num_clients}).")
        # Nothing the server sends is taken on faith either: refuse, with the reason, before any state changes.
        if sync.num_seeds != self.optimizer.num_seeds:
            raise ValueError(
                f"The sync is for K={sync.num_seeds} seeds but this client's optimizer has K="
                f"{self.optimizer.num_seeds}; server and clients must run the same recipe (`num_seeds`)."
            )
        if sync.seed_schedule is not None and sync.seed_schedule.numel() != self.federated.local_steps:
            raise ValueError(
                f"The sync's seed schedule holds {sync.seed_schedule.numel()} seed indices but a client takes "
                f"local_steps={self.federated.local_steps} steps; the server must schedule exactly one per step."
            )
        last_offset = self.total_steps - self.federated.local_steps
        if isinstance(step_offset, bool) or not isinstance(step_offset, int) or not 0 <= step_offset <= last_offset:
            raise ValueError(
                f"`step_offset`={step_offset!r} is outside this run: a client's first step is in [0, {last_offset}] "
                f"({self.total_steps} steps in all)."
            )
        config, optimizer, client = self.federated, self.optimizer, self.client
        rows = self.partition.clients[client_id]
        order = client_step_rows(config, self.per_step, sync.server_round, client_id, rows)
        client.catch_up(sync)
        optimizer.accumulators = client.synced.clone()
        if sync.seed_schedule is None:
            self._advance_sampler(step_offset)
        optimizer.sampler.set_schedule(sync.seed_schedule)
        client.begin_local()
        losses: list[float] = []
        try:
            for step in range(config.local_steps):
                for group in optimizer.param_groups:
                    group["lr"] = self.learning_rate(step_offset + step)
                indices = order[step * self.per_step : (step + 1) * self.per_step]
                micro = [
                    self.batch(indices[start : start + self.per_device_batch])
                    for start in range(0, len(indices), self.per_device_batch)
                ]
                extra = {}
                if self.accepts_num_items and "labels" in micro[0]:  # as the Trainer counts them
                    extra["num_items_in_batch"] = sum(batch["labels"][..., 1:].ne(-100).sum() for batch in micro)
                for batch in micro:
                    optimizer.train()
                    self.model(**batch, **extra)
                optimizer.step()
                if sync.seed_schedule is None:
                    self._sampler_position += 1
                client.record_step(optimizer.last_step)
                losses.append(optimizer.last_step["loss"])
            update = client.build_update(
                server_round=sync.server_round, client_id=client_id, num_samples=len(rows), pro=config.pro
            )
        finally:
            optimizer.eval()
            client.end_local(0.0)
            optimizer.sampler.set_schedule(None)
            optimizer.accumulators = client.synced.clone()
        return update, losses


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
