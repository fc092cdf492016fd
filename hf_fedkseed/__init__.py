"""hf_fedkseed: federated full-parameter tuning of language models with zeroth-order steps over K seeds."""

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

__version__ = "0.1.0"

_LAZY = {"FederatedCallback": ".callback", "FederatedConfig": ".callback"}


def __getattr__(name: str):
    """Import the Trainer-side classes (and transformers) only when they are used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
