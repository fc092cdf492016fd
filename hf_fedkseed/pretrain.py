"""The pretrained miniature base: backprop on the shipped data's training task families, cached by settings hash."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "INFO_FILE",
    "QUICKSTART",
    "RESOURCES",
    "TINY_LLAMA",
    "PretrainConfig",
    "cached_base",
    "main",
    "pretrain_base",
]

logger = logging.getLogger(__name__)

RESOURCES = Path(__file__).resolve().parent / "resources"
TINY_LLAMA = RESOURCES / "tiny-llama"
QUICKSTART = RESOURCES / "quickstart"
INFO_FILE = "pretrain_info.json"
# Bump when the training procedure changes in a way the settings do not show, so old caches are rebuilt.
_PROCEDURE_VERSION = 1


@dataclass(frozen=True)
class PretrainConfig:
    """How the miniature base is pretrained. Every field enters the cache hash.

    The objective is language modelling (loss on every token of prompt + response), as a base LM's pretraining is,
    plus `response_weight` times the loss on the response tokens, over the rows of the *training* task families
    only: the held-out families never reach the base, so evaluating on them measures transfer, as the paper's unseen
    Natural-Instructions tasks do.

    Args:
        model_config: directory holding the Llama `config.json` (default: the packaged tiny Llama).
        dataset_name: natural-instructions directory (default: the packaged quickstart tasks).
        steps: AdamW steps (a few minutes on 2 CPU cores at the default).
        batch_size: rows per step.
        learning_rate: peak AdamW learning rate (linear warm-up, then cosine decay to 10%).
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW decoupled weight decay.
        max_length: tokens (bytes) per row.
        response_weight: weight of an extra loss term over the response tokens only (they are ~3% of a row, so
            plain language modelling would spend nearly all its steps on the prompt template); 0 disables it.
        seed: seeds the weight initialisation and the batch order (private generators only).

    Example:
        >>> PretrainConfig(steps=10).hash()[:12]  # doctest: +SKIP
        '3f0c8a9d21b7'
    """

    model_config: str = str(TINY_LLAMA)
    dataset_name: str = str(QUICKSTART)
    steps: int = 400
    batch_size: int = 8
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    max_length: int = 384
    response_weight: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Invalid `{name}`: {value!r}; it must be a positive integer.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"Invalid `learning_rate`: {self.learning_rate!r}; it must be a finite number > 0.")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"Invalid `warmup_steps`: {self.warmup_steps!r}; it must be an integer >= 0.")

    def hash(self) -> str:
        """SHA-256 over the settings, the model config file and every data file: the cache key."""
        digest = hashlib.sha256()
        digest.update(json.dumps({**asdict(self), "procedure": _PROCEDURE_VERSION}, sort_keys=True).encode())
        files = [Path(self.model_config) / "config.json"]
        data = Path(self.dataset_name)
        files += sorted(data.rglob("*.json")) + sorted(data.rglob("*.txt"))
        for path in files:
            digest.update(str(path.relative_to(path.parents[1])).encode())
            digest.update(path.read_bytes() if path.is_file() else b"<missing>")
        return digest.hexdigest()


def cached_base(output_dir: str | Path, config: PretrainConfig) -> Path | None:
    """The directory of a finished pretraining with these exact settings, or None."""
    output_dir = Path(output_dir)
    info = output_dir / INFO_FILE
    if not (info.is_file() and (output_dir / "model.safetensors").is_file()):
        return None
    try:
        saved = json.loads(info.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return output_dir if saved.get("hash") == config.hash() else None


def pretrain_base(
    output_dir: str | Path, config: PretrainConfig | None = None, *, force: bool = False, log_every: int = 100
) -> Path:
    """Pretrain the miniature base by backprop (AdamW) and save it to `output_dir`, or reuse a cached one.

    Deterministic: the weights are initialised inside `torch.random.fork_rng` from `config.seed`, the batch order
    comes from a private `torch.Generator`, and nothing else is random, so the same settings give the same weights
    on the same machine. The result is a standard `from_pretrained` directory (safetensors) plus
    `pretrain_info.json` (the settings, their hash, the loss curve and the time taken); a later call with the same
    settings returns at once.

    Args:
        output_dir: where the model goes (created if needed).
        config: the settings; `PretrainConfig()` by default.
        force: retrain even when a matching cache exists.
        log_every: log the running loss every this many steps (0: never).

    Returns:
        `output_dir` as a Path, ready for `AutoModelForCausalLM.from_pretrained` and for a recipe's
        `model_name_or_path` (with `tokenizer_name: byt5`).

    Raises:
        ValueError: if the data has no training rows, or a held-out task family would leak into the base.

    Example:
        >>> base = pretrain_base("outputs/paper_miniature/base")  # about 2 minutes on 2 CPU cores, then cached
        >>> # hf-fedkseed train recipes/quickstart.yaml --model_name_or_path outputs/... --from_scratch false
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, ByT5Tokenizer

    from .data import load_instruction_dataset, tokenize_for_training, training_collator

    config = config or PretrainConfig()
    output_dir = Path(output_dir)
    if not force and cached_base(output_dir, config) is not None:
        logger.info("pretrained base found in %s (settings hash matches); reusing it", output_dir)
        return output_dir

    started = time.perf_counter()
    tokenizer = ByT5Tokenizer()
    splits = load_instruction_dataset(config.dataset_name, "natural_instructions")
    train, held_out = splits["train"], splits["test"]
    leaked = set(train["category"]) & set(held_out["category"])
    if leaked:
        raise ValueError(f"The held-out task families {sorted(leaked)} are also in the training split; fix the splits.")
    if len(train) == 0:
        raise ValueError(f"{config.dataset_name!r} has no training rows to pretrain on.")
    rows = tokenize_for_training(train, tokenizer, config.max_length)
    examples = [
        {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
        for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True)
    ]
    collator = training_collator(tokenizer)

    model_config = AutoConfig.from_pretrained(config.model_config)
    with torch.random.fork_rng(devices=[]):  # seeded init without moving the caller's global RNG
        torch.manual_seed(config.seed)
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    losses: list[float] = []
    running = 0.0
    for step in range(config.steps):
        if len(order) < config.batch_size:  # epochs of seeded permutations, batches never straddle a reshuffle
            order = torch.randperm(len(examples), generator=generator).tolist()
        batch = collator([examples[i] for i in order[: config.batch_size]])
        order = order[config.batch_size :]
        labels = batch.pop("labels")  # -100 on the prompt: the response tokens
        logits = model(**batch).logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        vocab = logits.shape[-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=-100)
        if config.response_weight:
            response = torch.nn.functional.cross_entropy(
                logits.reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            loss = loss + config.response_weight * response
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % 25 == 0 or step + 1 == config.steps:
            losses.append(round(running / (25 if (step + 1) % 25 == 0 else (step + 1) % 25), 5))
            running = 0.0
        if log_every and (step + 1) % log_every == 0:
            logger.info("pretraining step %d/%d  loss %.4f", step + 1, config.steps, losses[-1])

    model.eval()
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    info = {
        "hash": config.hash(),
        "config": asdict(config),
        "train_task_families": sorted(set(train["category"])),
        "held_out_task_families": sorted(set(held_out["category"])),
        "train_rows": len(examples),
        "loss_every_25_steps": losses,
        "seconds": round(time.perf_counter() - started, 2),
    }
    (output_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    logger.info("pretrained base saved to %s in %.1fs (final loss %.4f)", output_dir, info["seconds"], losses[-1])
    return output_dir


def main(argv: list[str] | None = None) -> int:
    """`python -m hf_fedkseed.pretrain OUTPUT_DIR [--steps N ...]`: pretrain (or reuse) the miniature base."""
    parser = argparse.ArgumentParser(prog="python -m hf_fedkseed.pretrain", description=__doc__)
    parser.add_argument("output_dir", help="where the base model goes (reused when its settings hash matches)")
    defaults = PretrainConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name}", type=type(value), default=value, help=f"default: {value}")
    parser.add_argument("--force", action="store_true", help="retrain even if a matching cache exists")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("hf_fedkseed").setLevel(logging.INFO)
    settings = {name: getattr(args, name) for name in asdict(defaults)}
    try:
        config = PretrainConfig(**settings)
    except ValueError as error:
        parser.error(str(error))
    path = pretrain_base(args.output_dir, config, force=args.force)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
