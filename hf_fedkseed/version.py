"""The package version, in one place: `hf_fedkseed.__version__`, seed deltas and pyproject.toml read it here."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
