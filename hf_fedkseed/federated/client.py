"""The FedKSeed client: catch up to the server's accumulators, record local ZO steps, undo them, report (no Trainer)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..perturbation import PerturbationEngine
from .messages import SyncMessage, UpdateMessage

__all__ = ["UNDO_MODES", "KSeedClient", "LocalStep"]

UNDO_MODES = ("snapshot", "replay")


@dataclass
class LocalStep:
    """One applied local ZO step: the seed index it used, its projected gradient and its learning rate."""

    seed_index: int
    projected_grad: float
    lr: float


class KSeedClient:
    """The model state of a FedKSeed client, independent of any training loop.

    The weights always satisfy `w = w0 - sum_j synced[j] * z_j` outside local training: `catch_up` moves them to a
    server's accumulators by replaying only the seeds whose accumulator changed (the cached-state catch-up), local
    ZO steps then move them further, and `end_local` puts them back at `w(synced)`, so that one model object can
    emulate any number of clients in turn without a per-client copy.

    Args:
        named_params: the trained `(name, parameter)` pairs, in the optimizer's order.
        engine: the perturbation engine of the optimizer (it fixes every z).
        seed_pool: the K candidate seeds.
        undo: how local drift is undone. "snapshot" copies the trained weights once per client to host memory
            (off the accelerator) and copies them back: exact and fast, one copy of the weights in CPU RAM.
            "replay" adds back `lr_t g_t z_t` of every local step: no extra memory, one z pass per local step,
            exact only up to float rounding.

    Example:
        >>> client = KSeedClient(optimizer.named_params, engine=optimizer.engine, seed_pool=optimizer.seed_pool)
        >>> client.catch_up(SyncMessage.decode(sync_bytes))
        >>> client.begin_local()
        >>> ...  # tau optimizer steps, each followed by client.record_step(optimizer.last_step)
        >>> update = client.build_update(server_round=r, client_id=c, num_samples=n)
        >>> client.end_local()
    """

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.Tensor]],
        *,
        engine: PerturbationEngine,
        seed_pool: torch.Tensor,
        undo: str = "snapshot",
    ):
        if undo not in UNDO_MODES:
            raise ValueError(f"Invalid `undo` {undo!r}; choose one of {UNDO_MODES}.")
        self.named_params = list(named_params)
        self.engine = engine
        self.seed_pool = seed_pool
        self.undo = undo
        self.synced = torch.zeros(seed_pool.numel(), dtype=torch.float64)
        self.synced_round: int | None = None
        self.steps: list[LocalStep] = []
        self._snapshot: list[torch.Tensor] | None = None
        self._in_local = False

    @property
    def num_seeds(self) -> int:
        return self.seed_pool.numel()

    @torch.no_grad()
    def catch_up(self, sync: SyncMessage) -> int:
        """Move the weights to the accumulators `sync` carries; returns how many seeds were replayed.

        Raises:
            RuntimeError: during local training (undo the local steps first), or if the replay overflowed the
                model's dtype (accumulators far beyond any honest run; the server bounds them).
            ValueError: if the message is for another K, does not apply to this client's state, or would give
                non-finite accumulators (refused before any weight changes).
        """
        if self._in_local:
            raise RuntimeError("catch_up() during local training; call end_local() first.")
        if sync.num_seeds != self.num_seeds:
            raise ValueError(f"The sync message is for K={sync.num_seeds} seeds but this client has {self.num_seeds}.")
        target = sync.apply_to(self.synced, client_round=self.synced_round)
        changed = (target != self.synced).nonzero().flatten()
        coefficients = -(target[changed] - self.synced[changed])
        if not (torch.isfinite(target).all() and torch.isfinite(coefficients).all()):
            raise ValueError("The sync message would give non-finite accumulators; refused, the weights are unchanged.")
        if changed.numel():
            self.engine.replay_(self.named_params, self.seed_pool[changed].tolist(), coefficients.tolist())
            self._check_finite("catch_up()")
        self.synced = target
        self.synced_round = sync.server_round
        return changed.numel()

    def _check_finite(self, where: str) -> None:
        """Fail loudly, naming the parameter, if a weight is NaN or inf (one pass over the weights, no copy)."""
        for name, param in self.named_params:
            if not bool(torch.isfinite(param).all()):
                raise RuntimeError(
                    f"{where} left a non-finite weight in `{name}`: the accumulators overflow the model's dtype "
                    f"{param.dtype}; the server's bounds exist to prevent this (check `max_abs_scalar`)."
                )

    def begin_local(self) -> None:
        """Start a client's local training from `w(synced)`."""
        if self._in_local:
            raise RuntimeError("begin_local() twice; call end_local() first.")
        if self.undo == "snapshot":
            if self._snapshot is None:  # allocated once, reused by every client
                self._snapshot = [torch.empty_like(p, device="cpu") for _, p in self.named_params]
            for buffer, (_, param) in zip(self._snapshot, self.named_params, strict=True):
                buffer.copy_(param.detach(), non_blocking=False)
        self.steps = []
        self._in_local = True

    def record_step(self, last_step: dict) -> None:
        """Record one optimizer step (`KSeedZOOptimizer.last_step`): one (seed index, g) pair per direction it took
        (FZOO steps take several); skipped steps moved nothing and are left out."""
        if last_step.get("skipped") is None:
            directions = last_step.get("directions") or [last_step]
            for direction in directions:
                self.steps.append(
                    LocalStep(direction["seed_index"], float(direction["projected_grad"]), last_step["lr"])
                )

    def local_coefficients(self) -> torch.Tensor:
        """The accumulator change of the local steps so far: `sum lr_t g_t` per seed (float64, K)."""
        delta = torch.zeros(self.num_seeds, dtype=torch.float64)
        for step in self.steps:
            delta[step.seed_index] += step.lr * step.projected_grad
        return delta

    def build_update(self, *, server_round: int, client_id: int, num_samples: int, pro: bool = False) -> UpdateMessage:
        """The update message of the recorded local steps (FedKSeed: `lr*g`; Pro: `g` and the learning rates)."""
        lrs = [step.lr for step in self.steps]
        constant_lr = len(set(lrs)) <= 1
        return UpdateMessage.from_steps(
            server_round=server_round,
            client_id=client_id,
            num_samples=num_samples,
            num_seeds=self.num_seeds,
            seed_indices=[step.seed_index for step in self.steps],
            projected_grads=[step.projected_grad for step in self.steps],
            learning_rates=(lrs[0] if lrs else 0.0) if constant_lr else lrs,
            pro=pro,
        )

    @torch.no_grad()
    def end_local(self) -> None:
        """Undo the local steps: the weights are back at `w(synced)`."""
        if not self._in_local:
            return
        if self.undo == "snapshot":
            for buffer, (_, param) in zip(self._snapshot, self.named_params, strict=True):
                param.copy_(buffer)
        else:
            self.engine.replay_(
                self.named_params,
                [int(self.seed_pool[step.seed_index]) for step in self.steps],
                [step.lr * step.projected_grad for step in self.steps],
            )
        self.steps = []
        self._in_local = False

    def state_dict(self) -> dict:
        """The synced accumulators and round (local training is never checkpointed: see FederatedCallback)."""
        return {"synced": self.synced.clone(), "synced_round": -1 if self.synced_round is None else self.synced_round}

    def load_state_dict(self, state: dict) -> None:
        synced = state["synced"].to(torch.float64)
        if synced.numel() != self.num_seeds:
            raise ValueError(f"The client state holds {synced.numel()} accumulators; this client has {self.num_seeds}.")
        self.synced = synced.clone()
        self.synced_round = None if int(state["synced_round"]) < 0 else int(state["synced_round"])
