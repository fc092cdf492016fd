"""Build the model, optimizer and federated runtime of a baseline method (fedzo, fedit, fedavg) for `run_training`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .fedavg import FedAvgCallback

__all__ = ["BASELINE_METHODS", "BaselineSetup", "prepare_baseline"]

logger = logging.getLogger(__name__)

BASELINE_METHODS = ("fedzo", "fedit", "fedavg")


@dataclass
class BaselineSetup:
    """What `run_training` hands to the Trainer for a baseline.

    Args:
        model: the model to train (a `peft.PeftModel` for fedit).
        optimizer: the optimizer to pass as `optimizers=(optimizer, None)`; None lets the Trainer build AdamW.
        federated: the federated runtime callback (`total_steps`, `train_dataset`, `history`,
            `move_before_reporters`, as `FederatedCallback`).
    """

    model: Any
    optimizer: Any
    federated: FedAvgCallback


def prepare_baseline(method: str, model, train_rows, *, model_args, zo_args, federated_config, training_args):
    """The model, optimizer and callback of a baseline, from the same recipe settings as FedKSeed's.

    * `fedzo`: `FreshSeedZOOptimizer` (the recipe's `learning_rate`, `zo_eps`, `engine`, `grad_clip`; K unused),
      clients upload (seed, lr * g) pairs, the server broadcasts the model.
    * `fedit`: LoRA adapters (`lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`) on the base, optionally
      quantized (`load_in_8bit` / `load_in_4bit`), trained by the Trainer's AdamW; adapters go down and up.
    * `fedavg`: every weight trained by the Trainer's AdamW with backprop; every weight goes down and up.

    Args:
        method: one of `BASELINE_METHODS`.
        model: the loaded base model (replaced by a quantized load for a k-bit fedit base).
        train_rows: the tokenized training rows of all clients.
        model_args, zo_args, federated_config, training_args: the recipe's dataclasses.

    Returns:
        A `BaselineSetup`.

    Raises:
        ValueError: for an unknown method, or a k-bit base asked for with another method.
        RuntimeError: for a k-bit base without a `bitsandbytes` backend on this machine (the reason is given).
        ImportError: for fedit without `peft` (naming the extra).

    Example:
        >>> setup = prepare_baseline("fedavg", model, rows, model_args=m, zo_args=z, federated_config=f,
        ...                          training_args=t)
        >>> trainer = Trainer(model=setup.model, optimizers=(setup.optimizer, None), callbacks=[setup.federated], ...)
    """
    if method not in BASELINE_METHODS:
        raise ValueError(f"Invalid baseline `method` {method!r}; choose one of {BASELINE_METHODS}.")
    bits = 8 if getattr(model_args, "load_in_8bit", False) else 4 if getattr(model_args, "load_in_4bit", False) else 0
    if bits and method != "fedit":
        raise ValueError(f"`load_in_{bits}bit` applies to `method: fedit` only (a quantized base for LoRA).")

    if method == "fedzo":
        from ..build import zo_optimizer_kwargs
        from .fedzo import FreshSeedZOOptimizer

        federated = FedAvgCallback(federated_config, train_rows, payload="seed_steps")
        optimizer = FreshSeedZOOptimizer(
            model, max_steps=federated.total_steps, **zo_optimizer_kwargs(zo_args, training_args)
        )
        return BaselineSetup(model, optimizer, federated)

    if method == "fedit":
        from .fedit import apply_lora, load_quantized_model

        if bits:
            if model_args.from_scratch:
                raise ValueError(f"`load_in_{bits}bit` needs a saved model to quantize; unset `from_scratch`.")
            model = load_quantized_model(model_args.model_name_or_path, bits=bits, revision=model_args.model_revision)
        model = apply_lora(
            model,
            r=model_args.lora_r,
            alpha=model_args.lora_alpha,
            dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
            seed=training_args.seed,
        )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        targets = model_args.lora_target_modules
        logger.info("fedit: LoRA r=%d on %s, %d trainable parameters", model_args.lora_r, targets, trainable)
    else:  # fedavg
        for param in model.parameters():
            param.requires_grad_(param.dtype.is_floating_point)
    federated = FedAvgCallback(federated_config, train_rows, payload="weights")
    return BaselineSetup(model, None, federated)
