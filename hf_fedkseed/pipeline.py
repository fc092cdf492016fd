"""The end-to-end federated job a recipe describes: load, evaluate, run FedKSeed rounds, evaluate, write outputs."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .build import build_data, build_optimizer, load_model
from .reporting import (
    HeldOutEvaluation,
    RoundEvaluationCallback,
    base_fingerprint,
    cumulative_bytes_per_client,
    read_base_evaluation,
    run_results,
    write_run_files,
)

__all__ = ["RESOURCES", "check_output_dir", "run_training"]

logger = logging.getLogger(__name__)

RESOURCES = Path(__file__).resolve().parent / "resources"


def check_output_dir(output_dir: str | Path) -> None:
    """Create `output_dir` if needed and make sure files can be written in it, before anything heavy loads.

    Raises:
        RecipeError: for a path that is an existing file, or a directory that cannot be created or written.

    Example:
        >>> check_output_dir("outputs/smoke")
    """
    from .configs import RecipeError

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RecipeError(f"`output_dir`: {str(output_dir)!r} is an existing file; pass a directory path.")
    probe = output_dir / f".hf_fedkseed_write_test_{os.getpid()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise RecipeError(
            f"`output_dir`: cannot write in {str(output_dir)!r} ({error.strerror or error}); pass a writable directory."
        ) from None


def run_training(model_args, data_args, zo_args, federated_config, training_args) -> dict:
    """Run the job a recipe describes and return its results (also written to `output_dir`).

    Checks the output directory, the checkpoint to resume from (`resume_from_checkpoint`: a path or `last`, verified
    against its manifest), the instruction data and the partition before the model loads; then tokenizes, evaluates
    Rouge-L on the held-out split, runs the federated rounds through the stock Trainer with `KSeedZOOptimizer` and
    `FederatedCallback` (resumed when asked), evaluates again, and writes the model (safetensors), the tokenizer,
    `rounds.jsonl`, `eval_results.json`, `training.png`, the KSeed delta and the model card to
    `training_args.output_dir` (pushed if `push_to_hub`). A resumed run's summaries cover every round.

    Raises:
        RecipeError: for an output directory that cannot be written, a checkpoint that is incomplete or corrupted
            (`CheckpointError`), data that cannot be read, or a partition that does not fit the data; raised before
            the model loads.
    """
    from transformers import Trainer

    from .artifacts import KSeedArtifactsCallback, resolve_resume_checkpoint, run_summary
    from .baselines.setup import BASELINE_METHODS, prepare_baseline
    from .callback import FederatedCallback
    from .configs import RecipeError
    from .federated.schedule import build_partition, resolve_clients_per_round
    from .perturbation import get_engine

    started = time.perf_counter()
    # Everything a recipe can get wrong is checked before the model loads: the output directory, the checkpoint to
    # resume from, the data and the partition (RecipeError: the CLI prints one line and exits with code 2).
    output_dir = Path(training_args.output_dir)
    existed = output_dir.exists()
    try:
        check_output_dir(output_dir)
        resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, output_dir)
        training_args.resume_from_checkpoint = resume  # FederatedCallback reads it to restore the round history
        if resume is not None:
            logger.info("Resuming from %s (manifest verified)", resume)

        recipe_data = build_data(data_args, model_args, seed=training_args.seed)
        tokenizer, train_rows = recipe_data.tokenizer, recipe_data.train_rows
        eval_rows, loss_rows, collator = recipe_data.eval_rows, recipe_data.loss_rows, recipe_data.collator
        try:
            partition = build_partition(federated_config, train_rows)
            resolve_clients_per_round(partition.num_clients, federated_config)
        except ValueError as error:
            raise RecipeError(" ".join(str(error).split())) from None
        fingerprint = base_fingerprint(
            model_args,
            data_args,
            eval_batch_size=training_args.per_device_eval_batch_size,
            seed=training_args.seed,
            eval_rows=eval_rows,
            loss_rows=loss_rows,
        )
        reused_base = None
        if data_args.base_evaluation is not None:  # an earlier run's evaluation of this very base on these rows
            reused_base = read_base_evaluation(data_args.base_evaluation, fingerprint, num_rows=len(eval_rows))
    except RecipeError:  # leave no empty output directory behind
        if not existed and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise
    model = load_model(model_args, seed=training_args.seed, vocab_size=len(tokenizer))
    if getattr(federated_config, "method", None) not in BASELINE_METHODS:
        # the ZO kernel compiles in a child process while the base model is evaluated (a cold cache costs minutes)
        get_engine(zo_args.engine_name).prewarm([(n, p) for n, p in model.named_parameters() if p.requires_grad])

    evaluation = HeldOutEvaluation(
        model,
        tokenizer,
        eval_rows,
        loss_rows,
        collator,
        max_new_tokens=data_args.max_new_tokens,
        batch_size=training_args.per_device_eval_batch_size,
        fingerprint=fingerprint,
    )
    evaluation.evaluate_base(reused_base)  # the untuned base (or its reused evaluation)

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
        evaluation.model = model  # FedIT evaluates through its LoRA wrapper
    else:
        optimizer = build_optimizer(model, zo_args, training_args)
        federated = FederatedCallback(federated_config, train_rows, partition=partition)
        optimizer.attach_state("held_out_evaluation", evaluation)  # checkpoints carry the evaluations after rounds
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
    if data_args.eval_every_rounds:  # after the federated callback, so it sees each round's aggregate
        trainer.add_callback(
            RoundEvaluationCallback(
                evaluation, federated, optimizer, every=data_args.eval_every_rounds, rounds=federated_config.rounds
            )
        )
    train_started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - train_started

    history = federated.history
    periodic_seconds = sum(record["seconds"] for record in evaluation.records[1:])
    evaluation(len(history), cumulative_bytes_per_client(history))

    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    results = run_results(
        evaluation,
        history,
        federated_config,
        zo_args,
        federated,
        method=method,
        train_seconds=train_seconds - periodic_seconds,  # the evaluations between rounds are not training
        total_seconds=time.perf_counter() - started,
    )
    write_run_files(output_dir, results, evaluation, history)
    artifacts.finish(trainer, results)  # kseed_config.json, kseed_delta.safetensors, README.md; the push if asked
    return results
