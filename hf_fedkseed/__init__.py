"""hf_fedkseed: federated full-parameter tuning of language models with zeroth-order steps over K seeds."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public names and the module that defines each. They are imported on first use, so `import hf_fedkseed` (and the
# `hf-fedkseed --help` console script) stays fast: torch and transformers load only when something needs them.
_EXPORTS = {
    "KSeedZOOptimizer": ".optimizer",
    "FederatedCallback": ".callback",
    "FederatedConfig": ".callback",
    "DEFAULT_ENGINE": ".perturbation",
    "ENGINES": ".perturbation",
    "ChunkedGeneratorEngine": ".perturbation",
    "PerturbationEngine": ".perturbation",
    "SequentialGeneratorEngine": ".perturbation",
    "get_engine": ".perturbation",
    "SeedSampler": ".zo",
    "make_seed_pool": ".zo",
}

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "ChunkedGeneratorEngine",
    "FederatedCallback",
    "FederatedConfig",
    "KSeedZOOptimizer",
    "PerturbationEngine",
    "SeedSampler",
    "SequentialGeneratorEngine",
    "get_engine",
    "make_seed_pool",
]

if TYPE_CHECKING:  # for type checkers and IDEs
    from .callback import FederatedCallback, FederatedConfig
    from .optimizer import KSeedZOOptimizer
    from .perturbation import (
        DEFAULT_ENGINE,
        ENGINES,
        ChunkedGeneratorEngine,
        PerturbationEngine,
        SequentialGeneratorEngine,
        get_engine,
    )
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
