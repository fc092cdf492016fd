"""Perturbation engines: regenerate z(seed, parameter) and add `alpha * z` to parameters in place (pure torch).

The registry (`ENGINES`, `DEFAULT_ENGINE`, `get_engine`) and the public surface of the package:

- `base`: the `PerturbationEngine` interface and `canonical_name`;
- `hashing`: the integer hashing behind every seed (`splitmix64`, `mix`, `name_key`, `to_int32`);
- `generator`: engines on `torch.Generator` streams (`torch-chunked`, `torch-sequential`);
- `counter`, `counter_rng`: the counter-based engines (`counter`, the default, and `counter-rademacher`).

An engine's `name` and `version` pin down every z it produces; checkpoints and seed deltas record them.
"""

from __future__ import annotations

from .base import PerturbationEngine, canonical_name
from .counter import CounterEngine, RademacherCounterEngine
from .generator import ChunkedGeneratorEngine, SequentialGeneratorEngine

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "ChunkedGeneratorEngine",
    "CounterEngine",
    "PerturbationEngine",
    "RademacherCounterEngine",
    "SequentialGeneratorEngine",
    "canonical_name",
    "get_engine",
]

ENGINES: dict[str, type[PerturbationEngine]] = {
    CounterEngine.name: CounterEngine,
    RademacherCounterEngine.name: RademacherCounterEngine,
    ChunkedGeneratorEngine.name: ChunkedGeneratorEngine,
    SequentialGeneratorEngine.name: SequentialGeneratorEngine,
}
DEFAULT_ENGINE = CounterEngine.name


def get_engine(engine: str | PerturbationEngine | None = None) -> PerturbationEngine:
    """Return an engine instance from its name (see `ENGINES`) or pass an instance through.

    Raises:
        ValueError: if the name is unknown.
    """
    if engine is None:
        engine = DEFAULT_ENGINE
    if isinstance(engine, PerturbationEngine):
        return engine
    try:
        return ENGINES[engine]()
    except KeyError:
        raise ValueError(f"Unknown perturbation `engine` {engine!r}; choose one of {sorted(ENGINES)}.") from None
