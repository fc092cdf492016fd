"""`hf-fedkseed flower RECIPE.yaml`: a recipe's Flower simulation, ending with the outputs `train` writes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace

__all__ = ["add_flower_arguments", "finish_flower_run", "run_flower"]

USAGE_ERROR = 2
logger = logging.getLogger(__name__)


def add_flower_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `flower` subcommand's arguments: the recipe, the Flower settings; recipe overrides pass through."""
    parser.add_argument("recipe", help="path of the YAML recipe, e.g. recipes/quickstart.yaml")
    parser.add_argument("--num_supernodes", type=int, default=None, help="SuperNodes (default: one per client)")
    parser.add_argument(
        "--round_timeout", type=float, default=3600.0, help="seconds to wait for a round's replies (default 3600)"
    )
    parser.add_argument("--client_num_cpus", type=float, default=1.0, help="CPU cores per simulated ClientApp")
    parser.add_argument("--verbose", action="store_true", help="Flower's verbose logging")


def run_flower(args: argparse.Namespace, overrides: list[str]) -> int:
    """Run `hf-fedkseed flower`; returns the exit code (2 for a usage error)."""
    from .configs import RecipeError
    from .flower.simulation import simulate
    from .flower.task import FlowerConfig, load_task, require_flwr

    try:
        require_flwr()
        settings = FlowerConfig(
            recipe=args.recipe,
            recipe_overrides=" ".join(overrides),
            round_timeout=args.round_timeout,
            num_supernodes=args.num_supernodes,
            client_num_cpus=args.client_num_cpus,
        )
        task = load_task(settings.recipe, settings.overrides, with_model=False)  # recipe errors before Ray starts
        if task.data_args.base_evaluation is not None:
            raise RecipeError(
                "`base_evaluation` applies to `hf-fedkseed train`; the Flower runtime evaluates its base itself: "
                "drop the field."
            )
    except (ImportError, RecipeError, ValueError) as error:
        print(f"hf-fedkseed flower: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    logging.getLogger("hf_fedkseed").setLevel(logging.INFO)
    started = time.perf_counter()
    run = simulate(settings, verbose=args.verbose)
    results = finish_flower_run(run, settings, started=started)
    summary = {
        "rounds": len(run.history),
        "accepted": [entry["accepted"] for entry in run.history],
        "bytes_per_client_per_round": results["bytes_per_client_per_round"],
        "bytes_down_full_per_round": sum(e["bytes_down_full"] for e in run.history) / max(len(run.history), 1),
        "flower_bytes_down": sum(e["flower_bytes_down"] for e in run.history),
        "flower_bytes_up": sum(e["flower_bytes_up"] for e in run.history),
        "rougeL_before": results["rougeL_before"],
        "rougeL_after": results["rougeL_after"],
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(summary, indent=2))
    return 0


def finish_flower_run(run, settings, *, started: float | None = None) -> dict:
    """Write what `hf-fedkseed train` writes for the recipe, from the Flower server's final state.

    In this process: the base `w0` is loaded as every node loads it and moved to the final model round by round
    (`run.final_syncs`, the rule every runtime follows, so it is the emulation's model bit for bit); held-out
    Rouge-L and loss are measured before and after; then the merged model, the tokenizer, `kseed_config.json` and
    `kseed_delta.safetensors`, the model card, `eval_results.json`, `predictions.jsonl` and `training.png` join the
    ServerApp's `rounds.jsonl` in `output_dir`.

    Returns:
        The run's results (`eval_results.json`).
    """
    from .artifacts import KSeedArtifactsCallback, run_summary
    from .build import build_data
    from .delta import base_weights_sha256
    from .flower.task import FederatedTask
    from .reporting import HeldOutEvaluation, cumulative_bytes_per_client, run_results, write_run_files

    started = time.perf_counter() if started is None else started
    task = FederatedTask(settings.recipe, settings.overrides)
    output_dir = Path(task.training_args.output_dir)
    data = build_data(task.data_args, task.model_args, seed=task.training_args.seed, tokenizer=task.tokenizer)
    evaluation = HeldOutEvaluation(
        task.model,
        task.tokenizer,
        data.eval_rows,
        data.loss_rows,
        data.collator,
        max_new_tokens=task.data_args.max_new_tokens,
        batch_size=task.training_args.per_device_eval_batch_size,
    )
    evaluation(0, 0.0)  # the untuned base
    base_hash = base_weights_sha256(task.model)
    for sync in run.final_syncs:
        task.client.catch_up(sync)
    task.optimizer.accumulators = task.client.synced.clone()
    history = run.history
    evaluation(len(history), cumulative_bytes_per_client(history))
    task.model.save_pretrained(str(output_dir))
    task.tokenizer.save_pretrained(str(output_dir))
    config = task.federated
    rounds = SimpleNamespace(history=history, partition=task.partition, clients_per_round=task.clients_per_round)
    elapsed = time.perf_counter() - started
    results = run_results(evaluation, history, config, task.zo_args, rounds, runtime="flower", total_seconds=elapsed)
    write_run_files(output_dir, results, evaluation, history)
    summary = run_summary(task.model_args, task.data_args, task.zo_args, config, task.training_args)
    artifacts = KSeedArtifactsCallback(summary, federated=rounds)
    artifacts.base_weights_sha256 = base_hash
    artifacts.results = results
    artifacts.write(output_dir, optimizer=task.optimizer)
    return results
