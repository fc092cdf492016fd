"""Forward hooks that turn one armed forward of a model into the two forwards of a ZO step (pure torch)."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["ZOForwardHooks", "eval_mode", "extract_loss", "labelled_logits_only"]


class eval_mode:
    """Put a module (and every submodule) in eval mode for a block, then restore each submodule's own flag."""

    def __init__(self, module: nn.Module | None):
        self.module = module
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self):
        if self.module is not None:
            self.modes = [(m, m.training) for m in self.module.modules()]
            self.module.eval()
        return self

    def __exit__(self, *exc):
        for module, training in self.modes:
            module.training = training
        self.modes = []
        return False


def extract_loss(output) -> torch.Tensor:
    """The loss of a model output: `output.loss`, `output["loss"]`, a tuple's first item, or a tensor."""
    loss = None
    if isinstance(output, torch.Tensor):
        loss = output
    elif isinstance(output, Mapping) or hasattr(output, "loss"):
        loss = output.get("loss") if isinstance(output, Mapping) else output.loss
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        loss = output[0]
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            "KSeedZOOptimizer needs the model's forward to return a scalar loss (`outputs.loss`): pass `labels` in "
            "the batch (a causal-LM collator does) and do not use `compute_loss_func`, whose loss the hook cannot see."
        )
    return loss


def _projects_labelled_positions(module: nn.Module) -> bool:
    """Whether `module` is a causal LM whose forward can project a subset of positions onto the vocabulary: a
    `logits_to_keep` argument and the causal-LM loss, which takes pre-shifted `shift_labels` (as transformers'
    `*ForCausalLM` models do)."""
    cached = getattr(module, "_hf_fedkseed_labelled_logits", None)
    if cached is None:
        try:
            parameters = inspect.signature(type(module).forward).parameters
        except (TypeError, ValueError):
            parameters = {}
        loss_function = getattr(module, "loss_function", None) if "logits_to_keep" in parameters else None
        cached = getattr(loss_function, "__name__", None) == "ForCausalLMLoss"
        module.__dict__["_hf_fedkseed_labelled_logits"] = cached
    return cached


def labelled_logits_only(module: nn.Module, kwargs: dict) -> dict:
    """The forward `kwargs` of a loss-only forward that projects only the positions carrying a label.

    A causal LM's loss reads the logits of the positions whose next token is labelled: in instruction tuning the few
    tokens of a reply, while the vocabulary projection of every other position costs a fifth of a small model's
    forward (SmolLM2-135M: 28M of its 147M multiply-adds per token) for nothing. This passes the boolean mask of the
    labelled positions as `logits_to_keep` and their labels as `shift_labels`, so the loss is the same sum over the
    same tokens; the returned logits cover the labelled positions only. Calls whose kwargs hold no `labels`, that
    already choose their logits or shifted labels, or whose model lacks those arguments are returned unchanged.
    """
    labels = kwargs.get("labels")
    if (
        not isinstance(labels, torch.Tensor)
        or labels.ndim != 2
        or kwargs.get("logits_to_keep") is not None
        or kwargs.get("shift_labels") is not None
        or not _projects_labelled_positions(module)
    ):
        return kwargs
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    keep = shifted != -100
    return {**kwargs, "logits_to_keep": keep, "shift_labels": shifted[keep]}


def _replace_loss(output, loss: torch.Tensor):
    """Return the output with its loss replaced and every other tensor dropped (frees logits and caches)."""
    if isinstance(output, torch.Tensor):
        return loss
    if isinstance(output, Mapping):
        for key in list(output.keys()):
            if key != "loss":
                output[key] = None
        output["loss"] = loss
        return output
    if isinstance(output, (tuple, list)):
        return type(output)([loss, *[None] * (len(output) - 1)])
    output.loss = loss
    return output


def _refuse_unsupported_setup() -> None:
    """Refuse training setups that cannot run ZO steps, before any weight changes.

    Several processes (`accelerate launch --num_processes N`, DDP) are supported: every rank draws the same seed and
    the optimizer all-reduces the two losses of a step, so no parameter ever travels. A DDP wrapper around the model
    is harmless: the hooks sit on the inner module, and the loss's graph reaches no parameter, so DDP has no
    gradient to reduce.

    Reads the accelerate state only if accelerate is already imported (the Trainer imports it), so this module
    stays free of Hugging Face imports.
    """
    state_module = sys.modules.get("accelerate.state")
    if state_module is None or not state_module.AcceleratorState._shared_state:
        return
    state = state_module.AcceleratorState()
    if str(state.mixed_precision) == "fp16":
        raise ValueError(
            "KSeedZOOptimizer cannot run with `fp16=True`: fp16 AMP steps through a GradScaler that needs gradients, "
            "and ZO training has none. Use `bf16=True`, or load the model with `dtype=torch.float16` and leave "
            "`fp16` off."
        )
    distributed = str(state.distributed_type)
    if "DEEPSPEED" in distributed or "FSDP" in distributed:
        raise ValueError(
            f"KSeedZOOptimizer does not support {distributed}: it shards or flattens the weights that ZO steps "
            "perturb in place. ZO training needs only inference memory: drop the DeepSpeed/FSDP config, and spread "
            'a model too large for one device with `device_map="auto"`.'
        )


class ZOForwardHooks:
    """Forward hooks on `module` that run the next forward after `arm()` as a ZO evaluation.

    Armed forward: the pre-hook samples the step's seeds (first micro-batch) and moves the weights to the first
    evaluation point (`w + eps z` for the two-point estimate, `w` for FZOO), switches to eval mode and disables
    autograd; the model's own forward computes the first loss; the post-hook moves the weights to each further point
    (`w - eps z`; or `w + eps z_i`), runs the same call again there, records the losses in the optimizer and returns
    the output with loss `(L+ + L-) / 2` (FZOO: `L(w)`) tied to a zero-cost leaf, so `loss.backward()` has nothing
    to do. The weights stay at the last point until the next micro-batch or `optimizer.step()`, which restores and
    updates. If a forward raises, the weights are restored to `w` before the error propagates.
    """

    def __init__(self, module: nn.Module, optimizer):
        _refuse_unsupported_setup()
        self.module = module
        self.optimizer = optimizer
        self.armed = False
        self._active = False
        self._in_second_forward = False
        self._grad_context = None
        self._eval_context = eval_mode(module)
        self._zero_leaf: torch.Tensor | None = None
        self._scaled = False
        self._handles = [
            module.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            module.register_forward_hook(self._post_forward, with_kwargs=True, always_call=True),
        ]

    def arm(self) -> None:
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre_forward(self, module, args, kwargs):
        if self._in_second_forward or not self.armed:
            return None
        self.armed = False
        self._active = True
        # The Trainer passes `num_items_in_batch` when micro-batch losses are fractions of the whole batch's loss.
        self._scaled = kwargs.get("num_items_in_batch") is not None
        self._eval_context.__enter__()
        self._grad_context = torch.no_grad()
        self._grad_context.__enter__()
        try:
            self.optimizer.begin_pair()
        except BaseException:
            self._leave_contexts()
            self._active = False
            raise
        return args, labelled_logits_only(module, kwargs)

    def _leave_contexts(self) -> None:
        if self._grad_context is not None:
            self._grad_context.__exit__(None, None, None)
            self._grad_context = None
        self._eval_context.__exit__(None, None, None)

    def _post_forward(self, module, args, kwargs, output):
        if self._in_second_forward or not self._active:
            return None
        self._active = False
        if sys.exc_info()[0] is not None:  # the first forward raised: restore w, let the error through
            self._leave_contexts()
            self.optimizer.abort_pair()
            return None
        try:
            first = extract_loss(output).detach()
            output = _replace_loss(output, first)
            losses = [first]
            self._in_second_forward = True
            try:
                for point in range(1, self.optimizer.points_per_micro_batch):
                    self.optimizer.move_to_point(point)
                    losses.append(extract_loss(module(*args, **kwargs)).detach())
            finally:
                self._in_second_forward = False
            self.optimizer.record_losses(losses, scaled=self._scaled)
        except BaseException:
            self._leave_contexts()
            self.optimizer.abort_pair()
            raise
        self._leave_contexts()
        loss = self.optimizer.reported_loss(losses)  # what the Trainer logs
        if torch.is_grad_enabled():
            # `accelerator.backward(loss)` needs a graph; give it one through a scalar leaf, not the weights.
            if self._zero_leaf is None or self._zero_leaf.device != loss.device:
                self._zero_leaf = torch.zeros((), device=loss.device, requires_grad=True)
            loss = loss + 0.0 * self._zero_leaf
        return _replace_loss(output, loss)
