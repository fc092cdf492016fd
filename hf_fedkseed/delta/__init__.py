"""The KSeed delta: a tuned model as K scalars over its base (save, verify, load from a folder or the Hub, apply)."""

from __future__ import annotations

from . import apply, files
from .apply import *  # noqa: F403  (the names of apply.__all__)
from .files import *  # noqa: F403  (the names of files.__all__)

__all__ = sorted([*files.__all__, *apply.__all__])
