"""Perturbation engines: regenerate z(seed, parameter) and add `alpha * z` to parameters in place (pure torch).

The registry (`ENGINES`, `DEFAULT_ENGINE`, `get_engine`) and the public surface of the package:

- `base`: the `PerturbationEngine` interface and `canonical_name`;
- `hashing`: the integer hashing behind every seed (`splitmix64`, `mix`, `name_key`, `to_int32`);
- `generator`: engines on `torch.Generator` streams (`torch-chunked`, `torch-sequential`);
- `counter`, `counter_rng`: the counter-based engines (`counter`, the default, and `counter-rademacher`);
- `shift`: `counter-shift`, cyclic shifts of one sequence per block, whose replay of K seeds costs O(d log B);
- `subset`: `TensorSubsetEngine`, directions on a seed-chosen fraction of the tensors (`counter@tensors=0.25`).

An engine's `name` and `version` pin down every z it produces; checkpoints and seed deltas record them.
"""

from __future__ import annotations

import logging

from .base import PerturbationEngine, canonical_name
from .counter import CounterEngine, RademacherCounterEngine
from .generator import ChunkedGeneratorEngine, SequentialGeneratorEngine
from .shift import ShiftCounterEngine
from .subset import TensorSubsetEngine, parse_subset_name

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "ChunkedGeneratorEngine",
    "CounterEngine",
    "PerturbationEngine",
    "RademacherCounterEngine",
    "SequentialGeneratorEngine",
    "ShiftCounterEngine",
    "TensorSubsetEngine",
    "canonical_name",
    "check_engine_name",
    "engine_for_state",
    "get_engine",
]

ENGINES: dict[str, type[PerturbationEngine]] = {
    CounterEngine.name: CounterEngine,
    RademacherCounterEngine.name: RademacherCounterEngine,
    ShiftCounterEngine.name: ShiftCounterEngine,
    ChunkedGeneratorEngine.name: ChunkedGeneratorEngine,
    SequentialGeneratorEngine.name: SequentialGeneratorEngine,
}
DEFAULT_ENGINE = CounterEngine.name
logger = logging.getLogger(__name__)


def check_engine_name(name: str) -> tuple[str, float | None]:
    """Check an engine name without building the engine: one of `ENGINES`, optionally with a `@tensors=<fraction>`
    suffix (`TensorSubsetEngine`).

    Returns:
        The base engine's name and the tensor fraction (None without the suffix).

    Raises:
        ValueError: naming the valid spellings.
    """
    base, fraction = parse_subset_name(name) or (name, None)
    if base not in ENGINES:
        raise ValueError(
            f"Unknown perturbation `engine` {name!r}; choose one of {sorted(ENGINES)}, optionally with a tensor "
            "subset such as `counter@tensors=0.25`."
        )
    return base, fraction


def get_engine(engine: str | PerturbationEngine | None = None, version: int | None = None) -> PerturbationEngine:
    """Return an engine instance from its name (see `ENGINES`; `<name>@tensors=<fraction>` wraps it in a
    `TensorSubsetEngine`) or pass an instance through.

    Args:
        engine: a name, an instance, or None for `DEFAULT_ENGINE`.
        version: the engine version to build (what a checkpoint or a delta recorded); None for the newest.

    Raises:
        ValueError: if the name is unknown, or the engine has no such version (naming the versions it has).
    """
    if engine is None:
        engine = DEFAULT_ENGINE
    if isinstance(engine, PerturbationEngine):
        if version is not None and engine.version != version:
            raise ValueError(f"{engine!r} is not version {version}.")
        return engine
    base, fraction = check_engine_name(engine)
    cls = ENGINES[base]
    if version is None or version == cls.version:
        inner = cls()
    elif hasattr(cls, "VERSIONS"):  # a versioned engine checks the version itself
        inner = cls(version=version)
    else:
        raise ValueError(
            f"Engine {base!r} has no version {version}; this hf_fedkseed knows [{cls.version}]. Install the "
            "hf_fedkseed version that wrote the file (its `hf_fedkseed_version`)."
        )
    return inner if fraction is None else TensorSubsetEngine(inner, fraction)


def engine_for_state(current: PerturbationEngine, name: str, version: int) -> PerturbationEngine:
    """The engine that replays state recorded with engine `name` at `version`: `current` if it is that engine, the
    same engine at the recorded version if `current` is another version of it (an older checkpoint), else an error.

    Raises:
        ValueError: if the state was made with another engine, or a version this hf_fedkseed does not have.
    """
    if (name, version) == (current.name, current.version):
        return current
    if name != current.name:
        raise ValueError(
            f"The state was saved with engine {name!r} v{version} but this optimizer uses {current.name!r} "
            f"v{current.version}; pass `engine={name!r}`."
        )
    logger.info("Replaying with engine %r v%d, the version the state was saved with.", name, version)
    return get_engine(name, version=version)
