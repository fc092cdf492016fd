"""The Flower deployment of FedKSeed: a ServerApp and a ClientApp over the same server, client and wire messages."""

from __future__ import annotations

from ..lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
