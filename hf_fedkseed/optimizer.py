"""KSeedZOOptimizer: MeZO-style zeroth-order steps over a pool of K candidate seeds, as a `torch.optim.Optimizer`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .forward_hooks import ZOForwardHooks, eval_mode
from .perturbation import PerturbationEngine, engine_for_state, get_engine
from .zo import (
    SeedSampler,
    check_estimator,
    make_seed_pool,
    normalized_one_sided,
    projected_grad,
    validate_probabilities,
)

__all__ = ["KSeedZOOptimizer", "default_no_decay"]


def default_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and normalisation weights get no weight decay, as in the paper's code."""
    lowered = name.lower()
    return param.ndim <= 1 or "bias" in lowered or "norm" in lowered


def _all_reduce_losses(values: list[float], scaled: bool) -> list[float]:
    """Combine a step's loss scalars over the ranks of a multi-process run; the identity in one process.

    Every rank evaluated the same seeds on its share of the batch. A loss normalised by the whole batch's
    `num_items_in_batch` (`scaled`, the Trainer's default across devices) is a share of the total: the ranks' values
    are summed. A per-rank mean is averaged, as DDP averages gradients. Only these few float64 scalars travel; every
    rank then applies the identical update.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    if not scaled:
        tensor /= dist.get_world_size()
    return tensor.tolist()


@dataclass
class _PendingStep:
    """The optimizer step being evaluated: its directions (seed indices and seeds) and the losses of its
    micro-batches, one list per micro-batch with one loss per evaluation point."""

    seed_indices: list[int]
    seeds: list[int]
    eps: float
    losses: list[list[float]] = field(default_factory=list)
    scaled: bool = False


class KSeedZOOptimizer(torch.optim.Optimizer):
    """Zeroth-order SGD over K candidate seeds (FedKSeed, Qin et al. 2024; MeZO, Malladi et al. 2023).

    Each step draws one seed index j from the pool, evaluates the loss at `w + eps z_j` and `w - eps z_j`
    (z_j regenerated from its seed, never stored), and applies `w <- w - lr * (g z_j + weight_decay * w)` with
    `g = (L+ - L-) / (2 eps)`. The restore to `w` and the update are one pass, so z is generated three times a
    step. The optimizer keeps `accumulators[j] = sum of lr_t * g_t` over every use of seed j, so with
    `weight_decay=0` the model is always `w0 - sum_j accumulators[j] * z_j`, whatever the learning-rate schedule.

    With `estimator="fzoo"` a step instead takes `directions` seeds (N) and evaluates `L0 = L(w)` and
    `L_i = L(w + eps z_i)`, N + 1 forwards, and applies `w <- w - lr * sum_i s_i z_i` with the normalised slopes
    `s_i = (L_i - L0) / (N std(L_1..L_N))` (FZOO, Dang et al. 2025, arXiv 2506.09034: batched one-sided estimates,
    a normalised-SGD step). Each direction is one (seed index, `lr * s_i`) pair, so the model stays
    `w0 - sum_j A_j z_j` and everything that replays seeds works unchanged. It assumes the N losses spread (a step
    whose losses are all equal is skipped) and an `lr` on the normalised scale: the step moves each weight by about
    `lr / sqrt(N)` times a standard normal, whatever the gradient's size (the two-point `lr` is multiplied by
    `|g|`, typically 10 to 100 times larger).

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
        estimator: `"two_point"` (the paper's, default) or `"fzoo"` (see above).
        directions: seeds per step: 1 for `two_point`, at least 2 for `fzoo`.

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
        estimator: str = "two_point",
        directions: int = 1,
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
        check_estimator(estimator, directions)
        self.estimator = estimator
        self.directions = directions

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
        self._offset = 0  # the weights are at w + offset * eps * z of the pending step's direction `_direction`
        self._direction = 0
        self._hooks: ZOForwardHooks | None = None
        self._attached: dict = {}  # name -> object with state_dict()/load_state_dict(), saved with this optimizer
        self._unclaimed_state: dict = {}  # attached state loaded before its owner attached itself
        # a compiled engine starts its kernel's compilation now, in a child process, to overlap what comes first
        self.engine.prewarm(self.named_params)

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
                    losses = [closure()]
                    for point in range(1, self.points_per_micro_batch):
                        self.move_to_point(point)
                        losses.append(closure())
            except BaseException:
                self.abort_pair()
                raise
            self.record_losses(losses, scaled=False)
        if self._pending is None or not self._pending.losses:
            raise RuntimeError(
                "KSeedZOOptimizer.step() found no zeroth-order forward to use. Either pass a closure, "
                "`optimizer.step(lambda: model(**batch).loss)`, or call `optimizer.train()` before the forward "
                "(transformers.Trainer does). It never uses `.grad`: a backward pass is wasted work."
            )
        return self._finish_step()

    # ------------------------------------------------------------------ pair evaluation (the forward hooks use it)
    # One ZO step evaluates the loss at `points_per_micro_batch` points for each micro-batch: `begin_pair()` (the
    # weights go to the first point), a forward, then `move_to_point(k)` and a forward for each further point, and
    # `record_losses([...])`; `step()` restores `w` and applies the update. For the two-point estimate the points
    # are `w + eps z` and `w - eps z` (`to_minus()` is `move_to_point(1)`, `record_pair(L+, L-)` records them); for
    # FZOO they are `w` and `w + eps z_i`, i = 1..N. `abort_pair()` restores `w` and drops the step if a forward
    # raised.
    @property
    def points_per_micro_batch(self) -> int:
        """Forwards per micro-batch: 2 for the two-point estimate, `directions + 1` for FZOO."""
        return 2 if self.estimator == "two_point" else self.directions + 1

    def reported_loss(self, losses):
        """The loss a step reports from the losses at its evaluation points (floats or tensors): the pair's mean for
        the two-point estimate, the loss at `w` for FZOO."""
        return 0.5 * (losses[0] + losses[1]) if self.estimator == "two_point" else losses[0]

    def begin_pair(self) -> None:
        """Start (or continue) the pending step and move the weights to its first evaluation point."""
        if self._pending is None:
            indices = [self.sampler.sample() for _ in range(self.directions)]
            self._pending = _PendingStep(
                seed_indices=indices,
                seeds=[int(self.seed_pool[index]) for index in indices],
                eps=float(self.param_groups[0]["eps"]),
            )
        self.move_to_point(0)

    def move_to_point(self, point: int) -> None:
        """Move the weights of the pending step to its evaluation point `point` (see `points_per_micro_batch`)."""
        if self.estimator == "two_point":
            self._move_to(+1 if point == 0 else -1)
        else:
            self._move_to(0 if point == 0 else +1, direction=point - 1 if point else self._direction)

    def to_minus(self) -> None:
        """Move the weights of a pending two-point step to `w - eps z`, for the second forward of the pair."""
        self.move_to_point(1)

    def _move_to(self, offset: int, direction: int | None = None) -> None:
        """Shift the weights from `w + self._offset * eps z_(self._direction)` to `w + offset * eps z_direction`."""
        pending = self._pending
        direction = self._direction if direction is None else direction
        if direction != self._direction and self._offset != 0:
            self.engine.add_noise_(self.named_params, pending.seeds[self._direction], -self._offset * pending.eps)
            self._offset = 0
        self._direction = direction
        delta = offset - self._offset
        if delta != 0:
            self.engine.add_noise_(self.named_params, pending.seeds[direction], delta * pending.eps)
            self._offset = offset

    def record_losses(self, losses, *, scaled: bool) -> None:
        """Record the losses of one micro-batch at every evaluation point, in order (`scaled`: fractions of the
        batch's loss, as the Trainer's `num_items_in_batch` makes them, which are summed instead of averaged)."""
        values = [float(loss) for loss in losses]
        if len(values) != self.points_per_micro_batch:
            raise ValueError(f"Expected {self.points_per_micro_batch} losses for a micro-batch, got {len(values)}.")
        self._pending.losses.append(values)
        self._pending.scaled = scaled

    def record_pair(self, loss_plus, loss_minus, *, scaled: bool) -> None:
        """Record the losses at `w + eps z` and `w - eps z` of one micro-batch of a two-point step."""
        self.record_losses([loss_plus, loss_minus], scaled=scaled)

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
        if self.estimator == "two_point":
            loss_diff, loss = _all_reduce_losses(
                [
                    reduce([p - m for p, m in pending.losses]),
                    reduce([self.reported_loss(point_losses) for point_losses in pending.losses]),
                ],
                pending.scaled,
            )
            slopes = [projected_grad(loss_diff, pending.eps)] if math.isfinite(loss_diff) else None
            spread = abs(loss_diff)
        else:
            columns = zip(*pending.losses, strict=True)  # one column per evaluation point
            points = _all_reduce_losses([reduce(column) for column in columns], pending.scaled)
            loss, loss_diff = self.reported_loss(points), max(points[1:]) - min(points[1:])
            slopes = normalized_one_sided(points)
            spread = max(abs(value - points[0]) for value in points[1:])
        skipped = None
        if slopes is None:
            self.num_skipped_nonfinite += 1
            skipped = "nonfinite"
        elif self.grad_clip is not None and spread > self.grad_clip:
            self.num_skipped_clipped += 1
            skipped = "clipped"
        if skipped is not None:
            self._move_to(0)  # restore only
        else:
            # From w + o*eps*z_cur to b*w - lr * sum_i s_i z_i, b = 1 - lr*wd: the current direction's pass carries
            # the decay, p <- b*p + (-b*o*eps - lr*s_cur) z_cur; every other direction adds -lr*s_i z_i.
            current = self._direction
            betas = [1.0 - lr * self._group_of[id(p)]["weight_decay"] for _, p in self.named_params]
            alphas = [-b * self._offset * pending.eps - lr * slopes[current] for b in betas]
            self.engine.add_noise_(self.named_params, pending.seeds[current], alphas, betas)
            for index, slope in enumerate(slopes):
                if index != current:
                    self.engine.add_noise_(self.named_params, pending.seeds[index], -lr * slope)
            self._offset, self._direction = 0, 0
            for index, slope in zip(pending.seed_indices, slopes, strict=True):
                self.accumulators[index] += lr * slope
        self._pending = None
        directions = [
            {"seed_index": index, "seed": seed, "projected_grad": None if skipped else slope}
            for index, seed, slope in zip(
                pending.seed_indices, pending.seeds, slopes or [None] * len(pending.seeds), strict=True
            )
        ]
        self.last_step = {
            "step": self.num_steps,
            "seed_index": pending.seed_indices[0],
            "seed": pending.seeds[0],
            "loss": loss,
            "loss_diff": loss_diff,
            "projected_grad": directions[0]["projected_grad"],
            "directions": directions,
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
            "estimator": self.estimator,
            "directions": self.directions,
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
        engine = engine_for_state(self.engine, kseed["engine"], int(kseed["engine_version"]))
        saved = (kseed.get("estimator", "two_point"), int(kseed.get("directions", 1)))
        if saved != (self.estimator, self.directions):
            raise ValueError(
                f"The state was saved with estimator {saved[0]!r} over {saved[1]} direction(s) per step but this "
                f"optimizer uses {self.estimator!r} over {self.directions}; pass `estimator={saved[0]!r}, "
                f"directions={saved[1]}`."
            )
        if kseed["seed_pool"].numel() != self.num_seeds:
            raise ValueError(
                f"The state holds {kseed['seed_pool'].numel()} seeds but this optimizer has `num_seeds`="
                f"{self.num_seeds}."
            )
        base = {key: value for key, value in state_dict.items() if key != "kseed"}
        super().load_state_dict(base)
        self.engine = engine  # an older checkpoint resumes with the engine version it was made with
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
