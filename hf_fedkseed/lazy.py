"""Package attributes imported on first use, so `import hf_fedkseed` and `hf-fedkseed --help` load no torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """The module-level `__getattr__` and `__dir__` of a package whose public names live in its submodules.

    Args:
        package: the package's `__name__`.
        exports: `{name: relative module that defines it}`.
        namespace: the package's `globals()`, where each name is cached once imported.

    Example:
        >>> __getattr__, __dir__ = lazy_exports(__name__, {"KSeedZOOptimizer": ".optimizer"}, globals())
    """

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
