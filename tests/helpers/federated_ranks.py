"""One rank of a multi-process run (torchrun / accelerate launch): FedKSeed rounds in the stock Trainer, saved.

Run by tests/test_multiprocess.py; writes the final weights and accumulators of rank 0 (and every rank's
accumulators) as safetensors into the folder given as the first argument.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import tiny_llama
from test_callback import args, config, task_dataset
from transformers import Trainer

from hf_fedkseed import FederatedCallback, KSeedZOOptimizer


def run(output: Path, per_device_batch: int) -> tuple[torch.nn.Module, KSeedZOOptimizer, Trainer]:
    """FedKSeed-Pro rounds on the callback tests' task shards, in float64 (see test_multiprocess)."""
    model = tiny_llama().double()
    optimizer = KSeedZOOptimizer(model, lr=2e-3, eps=1e-3, num_seeds=32, seed=7)
    federated_config = config(pro=True)
    federated = FederatedCallback(federated_config, task_dataset())
    steps = federated_config.rounds * federated_config.clients_per_round * federated_config.local_steps
    trainer = Trainer(
        model=model,
        args=args(output, steps, per_device_train_batch_size=per_device_batch),
        train_dataset=federated.train_dataset,
        optimizers=(optimizer, None),
        callbacks=[federated],
    )
    trainer.train()
    return model, optimizer, trainer


if __name__ == "__main__":
    output = Path(sys.argv[1])
    model, optimizer, trainer = run(output / "run", per_device_batch=int(sys.argv[2]))
    rank = trainer.args.process_index
    tensors = {"accumulators": optimizer.accumulators}
    if rank == 0:
        tensors.update({f"weight.{name}": p.detach().contiguous() for name, p in model.named_parameters()})
    save_file(tensors, str(output / f"rank{rank}.safetensors"))
