"""`hf-fedkseed flower RECIPE.yaml`: the FedKSeed Flower apps in a local simulation, one SuperNode per client."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace

USAGE_ERROR = 2


def simulate(settings, *, verbose: bool = False):
    """Run the ServerApp and one ClientApp per SuperNode in Flower's local (Ray) simulation.

    Args:
        settings: the recipe and the Flower settings.
        verbose: Flower's verbose logging.

    Returns:
        The `FlowerRun` of the ServerApp (server, per-round records, final sync).

    Raises:
        ImportError: if Flower is not installed.
        RuntimeError: if the simulation fails.

    Example:
        >>> run = simulate(FlowerConfig(recipe="recipes/quickstart.yaml"))
        >>> run.history[-1]["bytes_down"]
    """
    import warnings

    from .task import load_task, require_flwr

    require_flwr()

    from flwr.simulation import run_simulation

    from .client_app import make_client_app
    from .server_app import FlowerRun, make_server_app

    # Ray runs the ClientApps of many SuperNodes in one process, which shares one model between them: every node's
    # syncs start at round 0 and each process applies the rounds its model lacks.
    settings = replace(settings, sync_from="start")
    task = load_task(settings.recipe, settings.overrides, with_model=False)
    num_supernodes = settings.num_supernodes or task.partition.num_clients
    run = FlowerRun()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
        run_simulation(
            server_app=make_server_app(settings, run),
            client_app=make_client_app(settings),
            num_supernodes=num_supernodes,
            backend_config={
                "client_resources": {"num_cpus": settings.client_num_cpus, "num_gpus": 0.0},
                "init_args": {"include_dashboard": False, "log_to_driver": verbose},
            },
            verbose_logging=verbose,
        )
    if run.final_sync is None:
        raise RuntimeError("The Flower simulation ended before the ServerApp finished; see the log above.")
    return run


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
    from ..configs import RecipeError
    from .task import FlowerConfig, load_task, require_flwr

    try:
        require_flwr()
        settings = FlowerConfig(
            recipe=args.recipe,
            recipe_overrides=" ".join(overrides),
            round_timeout=args.round_timeout,
            num_supernodes=args.num_supernodes,
            client_num_cpus=args.client_num_cpus,
        )
        load_task(settings.recipe, settings.overrides, with_model=False)  # recipe errors surface before Ray starts
    except (ImportError, RecipeError, ValueError) as error:
        print(f"hf-fedkseed flower: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    logging.getLogger("hf_fedkseed").setLevel(logging.INFO)
    started = time.perf_counter()
    run = simulate(settings, verbose=args.verbose)
    summary = {
        "rounds": len(run.history),
        "accepted": [entry["accepted"] for entry in run.history],
        "bytes_per_client_per_round": sum(e["bytes_per_client"] for e in run.history) / max(len(run.history), 1),
        "flower_bytes_down": sum(e["flower_bytes_down"] for e in run.history),
        "flower_bytes_up": sum(e["flower_bytes_up"] for e in run.history),
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(summary, indent=2))
    return 0
