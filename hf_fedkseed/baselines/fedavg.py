"""FedAvgCallback: weight-averaging federated rounds (FedAvg, FedIT, FedZO) inside one stock `transformers.Trainer`."""

from __future__ import annotations

import logging
import time

import torch

from ..federated.aggregation import client_weight
from ..federated.config import FederatedConfig
from ..federated.partition import Partition
from ..trainer_rounds import FederatedRoundsCallback
from .fedzo import SeedStepsMessage, encode_seed_history

__all__ = ["PAYLOADS", "FedAvgCallback", "decode_tensors", "encode_tensors"]

logger = logging.getLogger(__name__)

PAYLOADS = ("weights", "seed_steps")


def encode_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """The safetensors encoding of named tensors: what a FedAvg or FedIT server and client actually send.

    Example:
        >>> payload = encode_tensors({name: p.detach() for name, p in model.named_parameters()})
        >>> len(payload)  # 8-byte header length + JSON header + raw float32 data
    """
    from safetensors.torch import save

    return save({name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()})


def decode_tensors(payload: bytes) -> dict[str, torch.Tensor]:
    """The named tensors of an `encode_tensors` payload (safetensors: no pickle, nothing executed)."""
    from safetensors.torch import load

    return load(payload)


class FedAvgCallback(FederatedRoundsCallback):
    """Federated rounds that average client *weights*, emulated inside the stock `transformers.Trainer`.

    The runtime of the baselines that FedKSeed is compared with. Each round the server selects clients with the
    seeded, stateless draw of FedKSeed's server (`select_clients`: every method sees the same clients in the same
    rounds) and broadcasts the trained tensors; each selected client loads them, runs `tau` local optimizer steps on
    its shard (the Trainer's optimizer: AdamW for FedAvg and FedIT, a ZO optimizer for FedZO), with its optimizer
    state reset first (as FedAvg and FedIT clients start each round afresh), and uploads its result; the server
    averages the client weights, weighted by sample count ("samples") or equally ("equal").

    One model object serves every client: the round's global tensors live on the host and are reloaded before each
    client, and a host-memory running sum collects the weighted client changes (two host copies of the *trained*
    tensors: the whole model for FedAvg and FedZO, only the LoRA adapters for FedIT).

    The bytes are the lengths of the real encoded payloads, each sent through its encoder and decoder:

    * `payload="weights"` (FedAvg, FedIT): down and up, the safetensors encoding of the trained tensors (every
      weight for FedAvg, the adapters for FedIT).
    * `payload="seed_steps"` (FedZO): down, the safetensors encoding of every weight (FedZO's server broadcasts the
      model: with a fresh seed per step, a client could only rebuild it by replaying every step of every client
      since round 0, whose size `bytes_down_seed_history` records per round); up, the client's (64-bit seed,
      float32 `lr * g`) pair of every local step (`SeedStepsMessage`), 12 bytes a step, which rebuild the client's
      weights from the broadcast model exactly (tests check it). The server here averages the client weights
      directly, which equals replaying the pairs up to float rounding.

    Args:
        config: the federated setting (`method` is informational here; `pro` must be off).
        train_dataset: the (tokenized) training rows of all clients.
        payload: "weights" or "seed_steps" (see above).
        trained: the `(name, parameter)` pairs that clients train and send; default the model's parameters with
            `requires_grad=True` (taken when the Trainer starts).
        partition: a precomputed `Partition` of `train_dataset`, instead of the one `config` describes.

    Raises:
        ValueError: for an unknown payload, `pro=True`, a partition that does not fit the data, and at the start of
            training for a `max_steps` too small for the rounds or `dataloader_num_workers > 0`.

    Example:
        >>> federated = FedAvgCallback(FederatedConfig(rounds=10, local_steps=20, clients_per_round=3,
        ...                                            partition="natural", partition_column="category",
        ...                                            method="fedavg"), rows)
        >>> args.max_steps = federated.total_steps
        >>> trainer = Trainer(model=model, args=args, train_dataset=federated.train_dataset, callbacks=[federated])
        >>> trainer.train()
    """

    def __init__(
        self,
        config: FederatedConfig,
        train_dataset,
        *,
        payload: str = "weights",
        trained: list[tuple[str, torch.nn.Parameter]] | None = None,
        partition: Partition | None = None,
    ):
        if payload not in PAYLOADS:
            raise ValueError(f"Invalid `payload` {payload!r}; choose one of {PAYLOADS}.")
        if config.pro:
            raise ValueError("FedAvgCallback averages weights; run FedKSeed-Pro (`pro`) with FederatedCallback.")
        super().__init__(config, train_dataset, partition)  # train_dataset: the very stream FedKSeed's clients read
        self.payload = payload
        self.trained = trained
        self._model = None
        self._optimizer = None
        self._loss_hook = None
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        self._loss_count = 0
        self._seed_history: list[tuple[int, float]] = []  # every (seed, lr*g) of every client so far (FedZO)

    # ------------------------------------------------------------------ Trainer setup
    def setup(self, args, model, optimizer) -> None:
        self.seed = args.seed  # the clients FedKSeed's server selects: its seed is the optimizer's, `args.seed`
        self._model = model
        if self.trained is None and model is not None:
            self.trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not self.trained:
            raise ValueError("FedAvgCallback found no trainable parameter; pass the model or `trained=`.")

    def start(self, args, state, optimizer) -> None:
        if self._model is not None and self._loss_hook is None:
            self._loss_hook = self._model.register_forward_hook(self._record_loss)

    def describe(self) -> str:
        return f"{self.config.method} ({len(self.trained)} trained tensors)"

    def on_train_end(self, args, state, control, **kwargs):
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None

    def after_step(self, slot: int, optimizer) -> None:
        record = self._round
        last_step = getattr(_unwrap(optimizer), "last_step", None)
        if last_step is not None:  # a zeroth-order optimizer: its loss, and (FedZO) the step's seed and lr*g
            record["losses"].append(float(last_step["loss"]))
            if last_step.get("skipped") is None:
                record["steps"].append((int(last_step["seed"]), float(last_step["lr"] * last_step["projected_grad"])))
                record["indices"].setdefault(record["clients"][slot], []).append(int(last_step["seed_index"]))
        elif self._loss_count:
            record["losses"].append(float(self._loss_sum) / self._loss_count)
        self._loss_sum.zero_()
        self._loss_count = 0

    # ------------------------------------------------------------------ rounds
    def _record_loss(self, module, inputs, output) -> None:
        """Forward hook: the training loss of first-order steps (ZO forwards run without grad and are skipped)."""
        loss = getattr(output, "loss", None)
        if loss is not None and module.training and torch.is_grad_enabled():
            self._loss_sum += loss.detach().to("cpu", torch.float64)
            self._loss_count += 1

    @torch.no_grad()
    def begin_round(self, round_index: int) -> None:
        global_tensors = {name: p.detach().to("cpu", copy=True) for name, p in self.trained}
        self._round = {
            "round": round_index,
            "clients": self.selected_clients(round_index),
            "global": global_tensors,
            "download": encode_tensors(global_tensors),  # the broadcast, encoded once, sent to every client
            "aggregate": {name: torch.zeros_like(t) for name, t in global_tensors.items()},
            "weights": {},
            "losses": [],
            "steps": [],
            "indices": {},  # FedZO: client id -> the optimizer's seed indices of its steps
            "bytes_up": 0,
            "bytes_down": 0,
            "start": time.perf_counter(),
        }

    @torch.no_grad()
    def begin_client(self, slot: int, optimizer) -> None:
        record = self._round
        record["bytes_down"] += len(record["download"])
        received = decode_tensors(record["download"])  # what the client loads: the round's global tensors
        for name, param in self.trained:
            param.copy_(received[name])
        inner = _unwrap(optimizer)
        if inner is not None and not hasattr(inner, "last_step"):
            inner.state.clear()  # a fresh AdamW per client and round (moments and step counts), as FedAvg/FedIT
        record["steps"] = []
        self._optimizer = inner

    @torch.no_grad()
    def end_client(self, slot: int) -> None:
        record = self._round
        client_id = record["clients"][slot]
        num_samples = len(self.partition.clients[client_id])
        if self.payload == "weights":
            upload = encode_tensors({name: p for name, p in self.trained})
            received = decode_tensors(upload)
            client_tensors = {name: received[name] for name, _ in self.trained}
        else:
            message = SeedStepsMessage(
                server_round=record["round"],
                client_id=client_id,
                num_samples=num_samples,
                seeds=[seed for seed, _ in record["steps"]],
                scalars=[scalar for _, scalar in record["steps"]],
            )
            upload = message.encode()
            received_steps = SeedStepsMessage.decode(upload)
            self._seed_history.extend(zip(received_steps.seeds.tolist(), received_steps.scalars.tolist(), strict=True))
            # Replaying the pairs on the broadcast model gives these weights up to float rounding (see the tests).
            client_tensors = {name: p.detach().to("cpu", copy=True) for name, p in self.trained}
        record["bytes_up"] += len(upload)
        weight = client_weight(self.config.aggregation, num_samples)  # as FedKSeed's server weighs
        record["weights"][client_id] = weight
        for name, tensor in client_tensors.items():
            record["aggregate"][name].add_(tensor.to(torch.float32) - record["global"][name], alpha=weight)

    @torch.no_grad()
    def end_round(self, round_index: int) -> dict:
        record = self._round
        total = sum(record["weights"].values())
        for name, param in self.trained:
            update = record["global"][name] + record["aggregate"][name] / total
            param.copy_(update.to(param.dtype))
        accumulators = getattr(self._optimizer, "accumulators", None)
        if self.payload == "seed_steps" and accumulators is not None:
            # Each fresh seed was used by one step of one client, so weighting its scalar by the client's share
            # keeps the optimizer's description `w = w0 - sum_j A_j z_j` of the averaged model (its KSeed delta).
            for client_id, indices in record["indices"].items():
                accumulators[torch.tensor(indices, dtype=torch.int64)] *= record["weights"][client_id] / total
        clients = len(record["clients"])
        entry = {
            "round": round_index,
            "method": self.config.method,
            "clients": record["clients"],
            "accepted": sorted(record["weights"]),
            "train_loss": sum(record["losses"]) / max(len(record["losses"]), 1),
            "bytes_up": record["bytes_up"],
            "bytes_down": record["bytes_down"],
            "bytes_per_client": (record["bytes_up"] + record["bytes_down"]) / clients,
            "trained_parameters": sum(t.numel() for t in record["global"].values()),
            "seconds": time.perf_counter() - record["start"],
        }
        if self.payload == "seed_steps":
            # The alternative download: every (seed, lr*g) since round 0 for a client to replay from w0.
            entry["bytes_down_seed_history"] = len(encode_seed_history(self._seed_history))
        self._round = None
        return entry


def _unwrap(optimizer):
    """The torch optimizer inside accelerate's `AcceleratedOptimizer` (or the optimizer itself, or None)."""
    return getattr(optimizer, "optimizer", optimizer)
