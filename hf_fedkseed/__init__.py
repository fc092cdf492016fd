"""hf_fedkseed: federated full-parameter tuning of language models with zeroth-order steps over K seeds."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__ as __version__  # re-exported: `hf_fedkseed.__version__`

# Public names and the module that defines each. They are imported on first use, so `import hf_fedkseed` (and the
# `hf-fedkseed --help` console script) stays fast: torch and transformers load only when something needs them;
# the Flower names need the `flower` extra.
_EXPORTS = {
    "KSeedZOOptimizer": ".optimizer",
    "FederatedCallback": ".callback",
    "FederatedConfig": ".federated.config",
    "METHODS": ".federated.config",
    "DEFAULT_ENGINE": ".perturbation",
    "ENGINES": ".perturbation",
    "ChunkedGeneratorEngine": ".perturbation",
    "CounterEngine": ".perturbation",
    "PerturbationEngine": ".perturbation",
    "RademacherCounterEngine": ".perturbation",
    "SequentialGeneratorEngine": ".perturbation",
    "get_engine": ".perturbation",
    "SeedSampler": ".zo",
    "make_seed_pool": ".zo",
    "KSeedDelta": ".delta",
    "apply_kseed": ".delta",
    "base_weights_sha256": ".delta",
    "load_kseed_delta": ".delta",
    "save_kseed_delta": ".delta",
    "KSeedArtifactsCallback": ".artifacts",
    "run_summary": ".artifacts",
    "push_output_dir": ".hub",
    "render_model_card": ".model_card",
    "write_model_card": ".model_card",
    "FederatedTask": ".flower.task",
    "FlowerConfig": ".flower.task",
    "simulate": ".flower.simulation",
    "FlowerRun": ".flower.server_app",
    "make_server_app": ".flower.server_app",
    "make_client_app": ".flower.client_app",
    "FedAvgCallback": ".baselines",
    "FreshSeedZOOptimizer": ".baselines",
    "SeedStepsMessage": ".baselines",
    "prepare_baseline": ".baselines",
    "BASELINE_METHODS": ".baselines",
    "pretrain_base": ".pretrain",
    "PretrainConfig": ".pretrain",
}

__all__ = [
    "BASELINE_METHODS",
    "DEFAULT_ENGINE",
    "ENGINES",
    "METHODS",
    "ChunkedGeneratorEngine",
    "CounterEngine",
    "FedAvgCallback",
    "FederatedCallback",
    "FederatedConfig",
    "FederatedTask",
    "FlowerConfig",
    "FlowerRun",
    "FreshSeedZOOptimizer",
    "KSeedArtifactsCallback",
    "KSeedDelta",
    "KSeedZOOptimizer",
    "PerturbationEngine",
    "PretrainConfig",
    "RademacherCounterEngine",
    "SeedSampler",
    "SeedStepsMessage",
    "SequentialGeneratorEngine",
    "apply_kseed",
    "base_weights_sha256",
    "get_engine",
    "load_kseed_delta",
    "make_client_app",
    "make_seed_pool",
    "make_server_app",
    "prepare_baseline",
    "pretrain_base",
    "push_output_dir",
    "render_model_card",
    "run_summary",
    "save_kseed_delta",
    "simulate",
    "write_model_card",
]

if TYPE_CHECKING:  # for type checkers and IDEs
    from .artifacts import KSeedArtifactsCallback, run_summary
    from .baselines import BASELINE_METHODS, FedAvgCallback, FreshSeedZOOptimizer, SeedStepsMessage, prepare_baseline
    from .callback import FederatedCallback
    from .delta import KSeedDelta, apply_kseed, base_weights_sha256, load_kseed_delta, save_kseed_delta
    from .federated.config import METHODS, FederatedConfig
    from .flower.client_app import make_client_app
    from .flower.server_app import FlowerRun, make_server_app
    from .flower.simulation import simulate
    from .flower.task import FederatedTask, FlowerConfig
    from .hub import push_output_dir
    from .model_card import render_model_card, write_model_card
    from .optimizer import KSeedZOOptimizer
    from .perturbation import (
        DEFAULT_ENGINE,
        ENGINES,
        ChunkedGeneratorEngine,
        CounterEngine,
        PerturbationEngine,
        RademacherCounterEngine,
        SequentialGeneratorEngine,
        get_engine,
    )
    from .pretrain import PretrainConfig, pretrain_base
    from .zo import SeedSampler, make_seed_pool


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
