"""Federated FedKSeed: partitioners, server, client and wire protocol (no Trainer inside)."""

from .client import KSeedClient, LocalStep
from .messages import SyncMessage, UpdateMessage, decode_message
from .partition import (
    STRATEGIES,
    Partition,
    dirichlet_partition,
    iid_partition,
    natural_partition,
    partition_dataset,
)
from .pro import DEFAULT_PRO_CLIP
from .server import KSeedServer
from .updates import AggregationResult, ClientUpdate, SparseVector
from .wire import PROTOCOL_VERSION, ProtocolError, seed_index_dtype

__all__ = [
    "DEFAULT_PRO_CLIP",
    "PROTOCOL_VERSION",
    "STRATEGIES",
    "AggregationResult",
    "ClientUpdate",
    "KSeedClient",
    "KSeedServer",
    "LocalStep",
    "Partition",
    "ProtocolError",
    "SparseVector",
    "SyncMessage",
    "UpdateMessage",
    "decode_message",
    "dirichlet_partition",
    "iid_partition",
    "natural_partition",
    "partition_dataset",
    "seed_index_dtype",
]
