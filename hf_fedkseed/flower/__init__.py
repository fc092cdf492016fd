"""The Flower deployment of FedKSeed: a ServerApp and a ClientApp over the same server, client and wire messages."""

from __future__ import annotations

import importlib

# Imported on first use, so `hf-fedkseed --help` does not load torch, transformers or flwr.
_EXPORTS = {
    "FLOWER_EXTRA": ".task",
    "FederatedTask": ".task",
    "FlowerConfig": ".task",
    "load_task": ".task",
    "require_flwr": ".task",
    "FlowerRun": ".server_app",
    "make_server_app": ".server_app",
    "make_client_app": ".client_app",
    "simulate": ".simulation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
