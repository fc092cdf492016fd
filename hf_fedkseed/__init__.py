"""hf_fedkseed: federated full-parameter tuning of language models with zeroth-order steps over K seeds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports
from .version import __version__ as __version__  # re-exported: `hf_fedkseed.__version__`

# The public API: each name and the module that defines it, in one list (`__all__` is its keys). The names are
# imported on first use, so `import hf_fedkseed` (and the `hf-fedkseed --help` console script) stays fast: torch and
# transformers load only when something needs them; the Flower names need the `flower` extra.
_EXPORTS = {
    # training inside the stock transformers.Trainer
    "KSeedZOOptimizer": ".optimizer",
    "FederatedCallback": ".callback",
    "FederatedConfig": ".federated.config",
    "METHODS": ".federated.config",
    "KSeedArtifactsCallback": ".artifacts",
    # the federated round core, for custom runtimes
    "KSeedServer": ".federated.server",
    "KSeedClient": ".federated.client",
    "ClientUpdate": ".federated.server",
    "SyncMessage": ".federated.messages",
    "UpdateMessage": ".federated.messages",
    "ProtocolError": ".federated.wire",
    # perturbation engines, by name or class
    "DEFAULT_ENGINE": ".perturbation",
    "ENGINES": ".perturbation",
    "get_engine": ".perturbation",
    "PerturbationEngine": ".perturbation",
    "CounterEngine": ".perturbation",
    "RademacherCounterEngine": ".perturbation",
    "ShiftCounterEngine": ".perturbation",
    "ChunkedGeneratorEngine": ".perturbation",
    "SequentialGeneratorEngine": ".perturbation",
    # the kilobyte delta and the Hub
    "KSeedDelta": ".delta",
    "apply_kseed": ".delta",
    "base_weights_sha256": ".delta",
    "load_kseed_delta": ".delta",
    "save_kseed_delta": ".delta",
    "push_output_dir": ".hub",
    # the Flower runtime (extra `flower`)
    "FlowerConfig": ".flower.task",
    "FlowerRun": ".flower.server_app",
    "simulate": ".flower.simulation",
    "make_server_app": ".flower.server_app",
    "make_client_app": ".flower.client_app",
    # the baselines and the pretraining of the tiny base
    "BASELINE_METHODS": ".baselines",
    "FedAvgCallback": ".baselines",
    "FreshSeedZOOptimizer": ".baselines",
    "PretrainConfig": ".pretrain",
    "pretrain_base": ".pretrain",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from .artifacts import KSeedArtifactsCallback
    from .baselines import BASELINE_METHODS, FedAvgCallback, FreshSeedZOOptimizer
    from .callback import FederatedCallback
    from .delta import KSeedDelta, apply_kseed, base_weights_sha256, load_kseed_delta, save_kseed_delta
    from .federated.client import KSeedClient
    from .federated.config import METHODS, FederatedConfig
    from .federated.messages import SyncMessage, UpdateMessage
    from .federated.server import ClientUpdate, KSeedServer
    from .federated.wire import ProtocolError
    from .flower.client_app import make_client_app
    from .flower.server_app import FlowerRun, make_server_app
    from .flower.simulation import simulate
    from .flower.task import FlowerConfig
    from .hub import push_output_dir
    from .optimizer import KSeedZOOptimizer
    from .perturbation import (
        DEFAULT_ENGINE,
        ENGINES,
        ChunkedGeneratorEngine,
        CounterEngine,
        PerturbationEngine,
        RademacherCounterEngine,
        SequentialGeneratorEngine,
        ShiftCounterEngine,
        get_engine,
    )
    from .pretrain import PretrainConfig, pretrain_base


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
