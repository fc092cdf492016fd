"""`hf-fedkseed flower RECIPE.yaml`: the FedKSeed Flower apps in a local simulation, one SuperNode per client."""

from __future__ import annotations

from dataclasses import replace

__all__ = ["simulate"]


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
