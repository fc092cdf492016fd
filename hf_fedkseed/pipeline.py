"""The end-to-end federated job a recipe describes: load, evaluate, run FedKSeed rounds, evaluate, write outputs."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

RESOURCES = Path(__file__).resolve().parent / "resources"


def cap_rows(dataset, limit: int | None, seed: int):
    """At most `limit` rows of `dataset`, a seeded random choice when it has more (all rows for None)."""
    if limit is None or len(dataset) <= limit:
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit))


def load_tokenizer(model_args):
    """The tokenizer: `byt5` is the file-free byte-level one; anything else loads with AutoTokenizer."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name == "byt5":
        tokenizer = ByT5Tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=model_args.model_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_args, *, seed: int, vocab_size: int | None = None):
    """The causal LM: loaded from the Hub or a directory, or built from its config with seeded random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = "auto" if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    if model_args.from_scratch:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
        if vocab_size is not None and config.vocab_size < vocab_size:
            raise ValueError(
                f"The model config has vocab_size={config.vocab_size} but the tokenizer has {vocab_size} tokens; "
                "raise `vocab_size` in the config or use a matching tokenizer."
            )
        with torch.random.fork_rng(devices=[]):  # seeded weights without moving the caller's global RNG
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=None if dtype == "auto" else dtype)
        return model
    return AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, dtype=dtype
    )


@torch.no_grad()
def held_out_loss(model, rows, collator, batch_size: int) -> float | None:
    """Mean teacher-forced loss of the response tokens of held-out rows (a signal even before generation works)."""
    if len(rows) == 0:
        return None
    was_training = model.training
    model.eval()
    columns = ["input_ids", "attention_mask", "labels"]
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collator(
            [
                {key: row[key] for key in columns}
                for row in rows.select(range(start, min(start + batch_size, len(rows))))
            ]
        )
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**{key: value.to(model.device) for key, value in batch.items()}).loss.item() * tokens
        count += tokens
    model.train(was_training)
    return total / max(count, 1)


def plot_rounds(rounds: list[dict], path: Path) -> None:
    """`training.png`: the mean local training loss and the bytes per client of every round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = [entry["round"] + 1 for entry in rounds]
    figure, (loss_axis, bytes_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_axis.plot(numbers, [entry["train_loss"] for entry in rounds], marker="o")
    loss_axis.set(xlabel="round", ylabel="mean local training loss", title="Loss per round")
    bytes_axis.bar(numbers, [entry["bytes_down"] / len(entry["clients"]) for entry in rounds], label="down")
    bytes_axis.bar(
        numbers,
        [entry["bytes_up"] / len(entry["clients"]) for entry in rounds],
        bottom=[entry["bytes_down"] / len(entry["clients"]) for entry in rounds],
        label="up",
    )
    bytes_axis.set(xlabel="round", ylabel="bytes per client", title="Traffic per client and round")
    bytes_axis.set_ylim(0, 1.25 * max((entry["bytes_per_client"] for entry in rounds), default=1))
    bytes_axis.legend(loc="upper center", ncols=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_training(model_args, data_args, zo_args, federated_config, training_args) -> dict:
    """Run the job a recipe describes and return its results (also written to `output_dir`).

    Loads the tokenizer, model and instruction data, tokenizes the training split, evaluates Rouge-L on the held-out
    split, runs the federated rounds through the stock Trainer with `KSeedZOOptimizer` and `FederatedCallback`,
    evaluates again, and writes the model (safetensors), the tokenizer, `rounds.jsonl`, `eval_results.json`,
    `training.png`, the KSeed delta and the model card to `training_args.output_dir` (pushed if `push_to_hub`).
    """
    from transformers import Trainer

    from .artifacts import KSeedArtifactsCallback, run_summary
    from .baselines.setup import BASELINE_METHODS, prepare_baseline
    from .callback import FederatedCallback
    from .data import load_instruction_dataset, tokenize_for_generation, tokenize_for_training, training_collator
    from .evaluation import evaluate_rouge_l
    from .optimizer import KSeedZOOptimizer

    started = time.perf_counter()
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, seed=training_args.seed, vocab_size=len(tokenizer))
    data = load_instruction_dataset(
        data_args.dataset_name,
        data_args.dataset_format,
        eval_fraction=data_args.eval_fraction,
        held_out_categories=data_args.held_out_categories,
        max_samples_per_task=data_args.max_samples_per_task,
        seed=training_args.seed,
    )
    train_rows = tokenize_for_training(data["train"], tokenizer, data_args.max_length)
    test = cap_rows(data["test"], data_args.max_eval_samples, training_args.seed)
    eval_rows = tokenize_for_generation(test, tokenizer, data_args.max_length)
    loss_rows = tokenize_for_training(test, tokenizer, data_args.max_length)
    collator = training_collator(tokenizer)

    def rouge() -> dict:
        return evaluate_rouge_l(
            model,
            tokenizer,
            eval_rows,
            max_new_tokens=data_args.max_new_tokens,
            batch_size=training_args.per_device_eval_batch_size,
        )

    before = rouge() if len(eval_rows) else None
    loss_before = held_out_loss(model, loss_rows, collator, training_args.per_device_eval_batch_size)
    logger.info(
        "before tuning: Rouge-L %s, held-out loss %s",
        None if before is None else round(before["rougeL"], 4),
        loss_before,
    )

    method = getattr(federated_config, "method", None) or ("fedkseed_pro" if federated_config.pro else "fedkseed")
    if method in BASELINE_METHODS:  # fedzo, fedit, fedavg: the comparison methods (hf_fedkseed.baselines)
        baseline = prepare_baseline(
            method,
            model,
            train_rows,
            model_args=model_args,
            zo_args=zo_args,
            federated_config=federated_config,
            training_args=training_args,
        )
        model, optimizer, federated = baseline.model, baseline.optimizer, baseline.federated
    else:
        optimizer = KSeedZOOptimizer(
            model,
            lr=training_args.learning_rate,
            eps=zo_args.zo_eps,
            num_seeds=zo_args.num_seeds,
            seed=training_args.seed,
            engine=zo_args.engine,
            grad_clip=zo_args.grad_clip,
        )
        federated = FederatedCallback(federated_config, train_rows)
    # The KSeed delta and the model card in every checkpoint, and in `output_dir` by `artifacts.finish` below.
    artifacts = KSeedArtifactsCallback(
        run_summary(model_args, data_args, zo_args, federated_config, training_args), federated=federated
    )
    if training_args.max_steps <= 0:
        training_args.max_steps = federated.total_steps  # the rounds define the run's length
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=federated.train_dataset,
        data_collator=collator,
        optimizers=(optimizer, None),
        callbacks=[federated, artifacts],
    )
    federated.move_before_reporters(trainer)  # so `report_to` integrations receive the round records
    train_started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_started

    after = rouge() if len(eval_rows) else None
    loss_after = held_out_loss(model, loss_rows, collator, training_args.per_device_eval_batch_size)
    logger.info(
        "after tuning: Rouge-L %s, held-out loss %s", None if after is None else round(after["rougeL"], 4), loss_after
    )

    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    history = federated.history
    total_bytes = sum(entry["bytes_up"] + entry["bytes_down"] for entry in history)
    results = {
        "rougeL_before": None if before is None else before["rougeL"],
        "rougeL_after": None if after is None else after["rougeL"],
        "eval_loss_before": loss_before,
        "eval_loss_after": loss_after,
        "per_category_before": None if before is None else before.get("per_category"),
        "per_category_after": None if after is None else after.get("per_category"),
        "num_eval_samples": len(eval_rows),
        "rounds": len(history),
        "clients": federated.partition.num_clients,
        "clients_per_round": federated.clients_per_round,
        "local_steps": federated_config.local_steps,
        "method": method,
        "pro": federated_config.pro,
        "num_seeds": zo_args.num_seeds,
        "bytes_per_client_per_round": (
            sum(entry["bytes_per_client"] for entry in history) / len(history) if history else 0
        ),
        "total_bytes": total_bytes,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - started,
    }
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    if history:
        plot_rounds(history, output_dir / "training.png")
    artifacts.finish(trainer, results)  # kseed_config.json, kseed_delta.safetensors, README.md; the push if asked
    return results
