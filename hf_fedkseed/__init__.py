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

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "ChunkedGeneratorEngine",
    "KSeedZOOptimizer",
    "PerturbationEngine",
    "SeedSampler",
    "SequentialGeneratorEngine",
    "get_engine",
    "make_seed_pool",
]
