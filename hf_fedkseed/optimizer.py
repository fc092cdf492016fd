"""KSeedZOOptimizer: MeZO-style zeroth-order steps over a pool of K candidate seeds, as a `torch.optim.Optimizer`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .forward_hooks import ZOForwardHooks, eval_mode
from .perturbation import PerturbationEngine, get_engine
from .zo import SeedSampler, make_seed_pool, projected_grad, validate_probabilities

__all__ = ["KSeedZOOptimizer", "default_no_decay"]


def default_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and normalisation weights get no weight decay, as in the paper's code."""
    lowered = name.lower()
    return param.ndim <= 1 or "bias" in lowered or "norm" in lowered


def _all_reduce_losses(loss_diff: float, loss: float, scaled: bool) -> tuple[float, float]:
    """Combine a step's two loss scalars over the ranks of a multi-process run; the identity in one process.

    Every rank evaluated the same seed on its share of the batch. A loss normalised by the whole batch's
    `num_items_in_batch` (`scaled`, the Trainer's default across devices) is a share of the total: the ranks' values
    are summed. A per-rank mean is averaged, as DDP averages gradients. Only these two float64 scalars travel; every
    rank then applies the identical update.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return loss_diff, loss
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor([loss_diff, loss], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    if not scaled:
        values /= dist.get_world_size()
    loss_diff, loss = values.tolist()
    return loss_diff, loss


@dataclass
class _PendingStep:
    """The optimizer step being evaluated: its seed and the loss pairs of its micro-batches."""

    seed_index: int
    seed: int
    eps: float
    loss_diffs: list[float] = field(default_factory=list)
    loss_means: list[float] = field(default_factory=list)
    scaled: bool = False


class KSeedZOOptimizer(torch.optim.Optimizer):
    """Zeroth-order SGD over K candidate seeds (FedKSeed, Qin et al. 2024; MeZO, Malladi et al. 2023).

    Each step draws one seed index j from the pool, evaluates the loss at `w + eps z_j` and `w - eps z_j`
    (z_j regenerated from its seed, never stored), and applies `w <- w - lr * (g z_j + weight_decay * w)` with
    `g = (L+ - L-) / (2 eps)`. The restore to `w` and the update are one pass, so z is generated three times a
    step. The optimizer keeps `accumulators[j] = sum of lr_t * g_t` over every use of seed j, so with
    `weight_decay=0` the model is always `w0 - sum_j accumulators[j] * z_j`, whatever the learning-rate schedule.

    It runs in two ways:

    * Inside the stock `transformers.Trainer`: pass it as `optimizers=(KSeedZOOptimizer(model, ...), None)`. The
      Trainer calls `optimizer.train()` before each micro-batch; that arms forward hooks on `model` which turn the
      Trainer's forward into the two ZO forwards (eval mode, no autograd graph, no `.grad`), and `step()` applies
      the update. Micro-batches of one optimizer step share one seed, so gradient accumulation equals a larger
      batch.
    * With a closure, MeZO style: `optimizer.step(lambda: model(**batch).loss)`.

    Args:
        params: the `nn.Module` to train (needed for the Trainer path), or its `named_parameters()`. Parameters
            with `requires_grad=False` are left untouched. z is keyed by parameter name.
        lr: learning rate; read from the param group at every step, so schedulers act.
        eps: perturbation scale of the two-point estimate.
        num_seeds: K, the number of candidate seeds.
        seed: seeds the candidate pool and the seed sampler.
        weight_decay: decoupled from z; not applied to biases and norms. Non-zero decay breaks the
            `w0 - sum_j A_j z_j` description of the model.
        grad_clip: if set, a step whose `|L+ - L-|` exceeds it is skipped (the official code's `grad_clip`).
        seed_pool: explicit candidate seeds (for example the official code's), instead of drawing K from `seed`.
        seed_probabilities: sampling distribution over the pool (FedKSeed-Pro); uniform when None.
        engine: perturbation engine name or instance (see `hf_fedkseed.perturbation.ENGINES`).
        no_decay: predicate `(name, param) -> bool` choosing the parameters without weight decay.

    Raises:
        ValueError: for an argument out of range, naming the argument.
        TypeError: if `params` is neither a module nor named parameters.

    Example:
        >>> optimizer = KSeedZOOptimizer(model, lr=1e-6, eps=1e-3, num_seeds=4096)
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(optimizer, None))
        >>> trainer.train()
    """

    def __init__(
        self,
        params: nn.Module | Iterable[tuple[str, torch.Tensor]],
        *,
        lr: float,
        eps: float = 1e-3,
        num_seeds: int = 4096,
        seed: int = 0,
        weight_decay: float = 0.0,
        grad_clip: float | None = None,
        seed_pool: torch.Tensor | None = None,
        seed_probabilities: torch.Tensor | None = None,
        engine: str | PerturbationEngine | None = None,
        no_decay: Callable[[str, torch.Tensor], bool] = default_no_decay,
    ):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"Invalid `lr`: {lr}; it must be a finite number >= 0.")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"Invalid `eps`: {eps}; the perturbation scale must be a finite number > 0.")
        if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"Invalid `weight_decay`: {weight_decay}; it must be a finite number >= 0.")
        if grad_clip is not None and not (math.isfinite(grad_clip) and grad_clip > 0):
            raise ValueError(f"Invalid `grad_clip`: {grad_clip}; use None to disable or a bound > 0 on |L+ - L-|.")
        if not isinstance(num_seeds, int) or isinstance(num_seeds, bool) or num_seeds <= 0:
            raise ValueError(f"Invalid `num_seeds`: {num_seeds}; K must be a positive integer.")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"Invalid `seed`: {seed!r}; it must be an integer.")

        self.module = params if isinstance(params, nn.Module) else None
        named = list(params.named_parameters() if isinstance(params, nn.Module) else params)
        if not all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in named):
            raise TypeError(
                "KSeedZOOptimizer needs the model or its `named_parameters()`: z is regenerated per parameter name."
            )
        named = [(name, p) for name, p in named if p.requires_grad]
        if not named:
            raise ValueError("`params` holds no parameter with `requires_grad=True`; there is nothing to train.")
        self.named_params: list[tuple[str, torch.Tensor]] = named
        self._decays = [not no_decay(name, p) for name, p in named]

        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay)
        groups = [
            {"params": [np for np, d in zip(named, self._decays, strict=True) if d], "weight_decay": weight_decay},
            {"params": [np for np, d in zip(named, self._decays, strict=True) if not d], "weight_decay": 0.0},
        ]
        super().__init__([g for g in groups if g["params"]], defaults)
        self._group_of = {id(p): group for group in self.param_groups for p in group["params"]}

        if seed_pool is not None:
            seed_pool = torch.as_tensor(seed_pool, dtype=torch.int64).flatten().clone()
            if seed_pool.numel() != num_seeds:
                raise ValueError(f"`seed_pool` has {seed_pool.numel()} seeds but `num_seeds` is {num_seeds}.")
        self.engine = get_engine(engine)
        self.grad_clip = grad_clip
        self.seed = seed
        self.seed_pool = make_seed_pool(num_seeds, seed) if seed_pool is None else seed_pool
        self.accumulators = torch.zeros(num_seeds, dtype=torch.float64)
        self.sampler = SeedSampler(num_seeds, seed, seed_probabilities)
        self.num_steps = 0
        self.num_skipped_nonfinite = 0
        self.num_skipped_clipped = 0
        self.last_step: dict | None = None
        self._pending: _PendingStep | None = None
        self._offset = 0  # the weights are at w + offset * eps * z_pending
        self._hooks: ZOForwardHooks | None = None
        self._attached: dict = {}  # name -> object with state_dict()/load_state_dict(), saved with this optimizer
        self._unclaimed_state: dict = {}  # attached state loaded before its owner attached itself

    # ------------------------------------------------------------------ public API
    @property
    def num_seeds(self) -> int:
        return self.seed_pool.numel()

    @property
    def seed_probabilities(self) -> torch.Tensor | None:
        return self.sampler.probabilities

    def set_seed_probabilities(self, probabilities: torch.Tensor | None) -> None:
        """Sample seeds from `probabilities` (FedKSeed-Pro) from now on; None restores uniform sampling."""
        self.sampler.probabilities = (
            None if probabilities is None else validate_probabilities(probabilities, self.num_seeds)
        )

    def train(self, mode: bool = True) -> None:
        """Arm the forward hooks: the next forward of the model is a two-point ZO evaluation.

        `transformers.Trainer` calls this at the start of every `training_step`; evaluation forwards, which the
        Trainer precedes with `optimizer.eval()`, are left untouched.
        """
        if not mode:
            self.eval()
            return
        if self.module is None:
            raise RuntimeError(
                "KSeedZOOptimizer was built from `named_parameters()`, so it cannot hook the model's forward. "
                "Pass the model itself, `KSeedZOOptimizer(model, ...)`, to train inside `transformers.Trainer`."
            )
        if self._hooks is None:
            self._hooks = ZOForwardHooks(self.module, self)
        self._hooks.arm()

    def eval(self) -> None:
        """Disarm the hooks and put the weights back at `w` if a step is half evaluated."""
        if self._hooks is not None:
            self._hooks.disarm()
        if self._pending is not None:
            self._move_to(0)

    def attach_state(self, name: str, owner) -> None:
        """Save `owner.state_dict()` inside this optimizer's state, so Trainer checkpoints carry it.

        A callback (such as `FederatedCallback`) attaches itself; if a checkpoint holding state under `name` was
        loaded before the owner attached, `owner.load_state_dict` receives it now.
        """
        self._attached[name] = owner
        if name in self._unclaimed_state:
            owner.load_state_dict(self._unclaimed_state.pop(name))

    def remove_hooks(self) -> None:
        """Detach the forward hooks from the model (they are installed on the first `train()`)."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float] | None = None) -> torch.Tensor | None:
        """Finish one ZO step: with a closure, evaluate it at `w + eps z` and `w - eps z` first.

        Without a closure, the step uses the loss pairs the armed forwards recorded since the last step.

        Returns:
            `(L+ + L-) / 2` of the step as a 0-dim tensor.

        Raises:
            RuntimeError: if there is neither a closure nor a recorded forward pair, which means the loop did not
                arm the hooks (it may have backpropagated instead: this optimizer never uses gradients).
        """
        if closure is not None:
            if self._pending is not None:
                raise RuntimeError("A hooked step is half evaluated; call `step()` without a closure to finish it.")
            try:
                with eval_mode(self.module):
                    self.begin_pair()
                    loss_plus = closure()
                    self.to_minus()
                    loss_minus = closure()
            except BaseException:
                self.abort_pair()
                raise
            self.record_pair(loss_plus, loss_minus, scaled=False)
        if self._pending is None or not self._pending.loss_diffs:
            raise RuntimeError(
                "KSeedZOOptimizer.step() found no zeroth-order forward to use. Either pass a closure, "
                "`optimizer.step(lambda: model(**batch).loss)`, or call `optimizer.train()` before the forward "
                "(transformers.Trainer does). It never uses `.grad`: a backward pass is wasted work."
            )
        return self._finish_step()

    # ------------------------------------------------------------------ pair evaluation (the forward hooks use it)
    # One ZO step evaluates the loss at `w + eps z` and `w - eps z` for each micro-batch: `begin_pair()` (the
    # weights go to `w + eps z`), a forward, `to_minus()`, a forward, `record_pair(L+, L-)`; then `step()` restores
    # `w` and applies the update in one pass. `abort_pair()` restores `w` and drops the step if a forward raised.
    def begin_pair(self) -> None:
        """Start (or continue) the pending step and move the weights to `w + eps z`."""
        if self._pending is None:
            index = self.sampler.sample()
            self._pending = _PendingStep(
                seed_index=index, seed=int(self.seed_pool[index]), eps=float(self.param_groups[0]["eps"])
            )
        self._move_to(+1)

    def to_minus(self) -> None:
        """Move the weights of the pending step to `w - eps z`, for the second forward of the pair."""
        self._move_to(-1)

    def _move_to(self, offset: int) -> None:
        """Shift the weights from `w + self._offset * eps z` to `w + offset * eps z` in one pass."""
        delta = offset - self._offset
        if delta != 0:
            pending = self._pending
            self.engine.add_noise_(self.named_params, pending.seed, delta * pending.eps)
            self._offset = offset

    def record_pair(self, loss_plus, loss_minus, *, scaled: bool) -> None:
        """Record the losses at `w + eps z` and `w - eps z` of one micro-batch (`scaled`: fractions of the batch's
        loss, as the Trainer's `num_items_in_batch` makes them, which are summed instead of averaged)."""
        plus, minus = float(loss_plus), float(loss_minus)
        self._pending.loss_diffs.append(plus - minus)
        self._pending.loss_means.append(0.5 * (plus + minus))
        self._pending.scaled = scaled

    def abort_pair(self) -> None:
        """Restore `w` and drop the pending step (a forward raised)."""
        if self._pending is not None:
            self._move_to(0)
            self._pending = None

    def _finish_step(self) -> torch.Tensor:
        pending = self._pending
        lrs = {group["lr"] for group in self.param_groups}
        if len(lrs) != 1:
            self.abort_pair()
            raise ValueError(
                f"KSeedZOOptimizer needs one learning rate for all parameters, found {sorted(lrs)}: seed replay "
                "describes the model with one scalar per seed. Give every param group the same `lr`."
            )
        lr = float(lrs.pop())
        # With `num_items_in_batch` the Trainer's micro-batch losses are already fractions of the batch loss
        # (sum them); otherwise the Trainer averages them over the accumulation steps (mean them).
        reduce = sum if pending.scaled else (lambda values: sum(values) / len(values))
        loss_diff, loss = _all_reduce_losses(reduce(pending.loss_diffs), reduce(pending.loss_means), pending.scaled)
        skipped = None
        if not math.isfinite(loss_diff):
            self.num_skipped_nonfinite += 1
            skipped = "nonfinite"
        elif self.grad_clip is not None and abs(loss_diff) > self.grad_clip:
            self.num_skipped_clipped += 1
            skipped = "clipped"
        grad = None
        if skipped is not None:
            self._move_to(0)  # restore only
        else:
            grad = projected_grad(loss_diff, pending.eps)
            # From w + o*eps*z to b*w - lr*g*z with b = 1 - lr*wd: one pass p <- b*p + (-b*o*eps - lr*g) z.
            betas = [1.0 - lr * self._group_of[id(p)]["weight_decay"] for _, p in self.named_params]
            alphas = [-b * self._offset * pending.eps - lr * grad for b in betas]
            self.engine.add_noise_(self.named_params, pending.seed, alphas, betas)
            self._offset = 0
            self.accumulators[pending.seed_index] += lr * grad
        self._pending = None
        self.last_step = {
            "step": self.num_steps,
            "seed_index": pending.seed_index,
            "seed": pending.seed,
            "loss": loss,
            "loss_diff": loss_diff,
            "projected_grad": grad,
            "lr": lr,
            "skipped": skipped,
        }
        self.num_steps += 1
        return torch.tensor(loss)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The param groups plus the K-seed state: pool, accumulators, sampler generator and counters."""
        state = super().state_dict()
        state["kseed"] = {
            "engine": self.engine.name,
            "engine_version": self.engine.version,
            "seed": self.seed,
            "seed_pool": self.seed_pool.clone(),
            "accumulators": self.accumulators.clone(),
            "sampler": self.sampler.state_dict(),
            "num_steps": self.num_steps,
            "num_skipped_nonfinite": self.num_skipped_nonfinite,
            "num_skipped_clipped": self.num_skipped_clipped,
            "attached": {name: owner.state_dict() for name, owner in self._attached.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a `state_dict()`; refuses one made with another engine or pool size before changing anything.

        Raises:
            ValueError: if the state comes from a different engine, engine version or number of seeds.
        """
        kseed = state_dict.get("kseed")
        if kseed is None:
            raise ValueError("This optimizer state has no `kseed` entry; it was not saved by KSeedZOOptimizer.")
        if (kseed["engine"], kseed["engine_version"]) != (self.engine.name, self.engine.version):
            raise ValueError(
                f"The state was saved with engine {kseed['engine']!r} v{kseed['engine_version']} but this optimizer "
                f"uses {self.engine.name!r} v{self.engine.version}; pass `engine={kseed['engine']!r}`."
            )
        if kseed["seed_pool"].numel() != self.num_seeds:
            raise ValueError(
                f"The state holds {kseed['seed_pool'].numel()} seeds but this optimizer has `num_seeds`="
                f"{self.num_seeds}."
            )
        base = {key: value for key, value in state_dict.items() if key != "kseed"}
        super().load_state_dict(base)
        self._group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        self.seed = int(kseed["seed"])
        self.seed_pool = kseed["seed_pool"].to(torch.int64).clone()
        self.accumulators = kseed["accumulators"].to(torch.float64).clone()
        self.sampler.load_state_dict(kseed["sampler"])
        self.num_steps = int(kseed["num_steps"])
        self.num_skipped_nonfinite = int(kseed["num_skipped_nonfinite"])
        self.num_skipped_clipped = int(kseed["num_skipped_clipped"])
        for name, attached_state in kseed.get("attached", {}).items():
            if name in self._attached:
                self._attached[name].load_state_dict(attached_state)
            else:
                self._unclaimed_state[name] = attached_state

    def reconstruct_(self, base_params: Iterable[tuple[str, torch.Tensor]] | None = None) -> None:
        """Rebuild `w0 - sum_j accumulators[j] * z_j` in place on `base_params` (default: this optimizer's own).

        The parameters must hold the base weights `w0`. Exact up to float rounding when `weight_decay` is 0.
        """
        params = self.named_params if base_params is None else list(base_params)
        self.engine.replay_(params, self.seed_pool.tolist(), (-self.accumulators).tolist())
