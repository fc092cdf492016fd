"""Multi-process ZO steps: ranks share the seed, all-reduce only their two losses, and match one process exactly."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hf_fedkseed.optimizer import KSeedZOOptimizer

ROWS, FEATURES, STEPS = 8, 6, 4
SHARES = ([0, 1, 2, 3, 4], [5, 6, 7])  # unequal shares of the batch: rank 0 holds 5 rows, rank 1 three


class Regression(nn.Module):
    """A tiny model whose forward returns its loss, normalised by `num_items_in_batch` when given (like HF models)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.hidden = nn.Linear(FEATURES, 16)
        self.out = nn.Linear(16, 1)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)

    def forward(self, inputs, targets, num_items_in_batch=None):
        errors = (self.out(torch.tanh(self.hidden(inputs))).squeeze(-1) - targets) ** 2
        return errors.sum() / num_items_in_batch if num_items_in_batch is not None else errors.mean()


def data():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(ROWS, FEATURES, generator=generator, dtype=torch.float64)
    return inputs, torch.randn(ROWS, generator=generator, dtype=torch.float64)


def train(closure_rows: list[int], hooked_rows: list[int], *, wrap=None) -> dict:
    """STEPS closure steps on a per-rank mean loss, then STEPS hooked steps on a loss over the whole batch's count."""
    inputs, targets = data()
    model = Regression().double()  # float64: the ranks' other summation order moves L only at 1e-16
    optimizer = KSeedZOOptimizer(model, lr=0.05, eps=1e-3, num_seeds=16, seed=3)
    mine = torch.tensor(closure_rows)
    for _ in range(STEPS):  # closure path: each rank's mean over its rows
        optimizer.step(lambda: model(inputs[mine], targets[mine]))
    mine = torch.tensor(hooked_rows)
    after_closure = [p.detach().clone() for p in model.parameters()]
    trained = model if wrap is None else wrap(model)  # the Trainer's accelerate wraps the model in DDP
    for _ in range(STEPS):  # hooked path, as the Trainer runs it: the loss is the rank's share of the batch total
        trained.train()
        optimizer.train()
        loss = trained(inputs[mine], targets[mine], num_items_in_batch=torch.tensor(ROWS))
        loss.backward()
        optimizer.step()
    return {
        "after_closure": after_closure,
        "final": [p.detach().clone() for p in model.parameters()],
        "accumulators": optimizer.accumulators.clone(),
        "grads": [p.grad for p in model.parameters()],
    }


def _rank(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # The closure path averages per-rank means, as DDP weights ranks equally: equal shares there. The hooked
        # path's loss is normalised by the whole batch's item count, so unequal shares add up exactly.
        halves = list(range(rank * ROWS // 2, (rank + 1) * ROWS // 2))
        result = train(halves, SHARES[rank], wrap=lambda model: nn.parallel.DistributedDataParallel(model))
        # numpy arrays travel by value (tensors would be shared memory that dies with this process).
        queue.put((rank, {key: _to_numpy(value) for key, value in result.items()}))
    finally:
        dist.destroy_process_group()


def _to_numpy(value):
    if isinstance(value, list):
        return [None if item is None else item.numpy() for item in value]
    return value.numpy()


def _to_torch(value):
    if isinstance(value, list):
        return [None if item is None else torch.from_numpy(item) for item in value]
    return torch.from_numpy(value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_half_batches_equal_one_process_on_the_full_batch():
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = _free_port()
    processes = [context.Process(target=_rank, args=(rank, 2, port, queue)) for rank in (0, 1)]
    for process in processes:
        process.start()
    results = {rank: {k: _to_torch(v) for k, v in result.items()} for rank, result in (queue.get() for _ in processes)}
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    single = train(list(range(ROWS)), list(range(ROWS)))
    for rank in (0, 1):
        result = results[rank]
        # Hooked path (unequal shares, DDP-wrapped): the summed shares are the full-batch loss, so every rank lands
        # on the one-process weights. Only the order of the float additions differs (two partial sums, then one
        # all-reduce, against one sum): a rounding-level change of L that g = (L+ - L-) / 2eps magnifies by 1/eps,
        # which is why the model is float64 here (in float32 the weights agree to ~2e-5, not to 1e-6).
        for got, want in zip(result["final"], single["final"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(result["accumulators"], single["accumulators"], rtol=1e-8, atol=1e-12)
        for got, want in zip(result["after_closure"], single["after_closure"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        # No parameter traffic: DDP found no gradient to all-reduce (the loss graph reaches no parameter).
        assert all(grad is None for grad in result["grads"])
    # ... and the ranks hold bit-identical models: they applied the same all-reduced scalars.
    for a, b in zip(results[0]["final"], results[1]["final"], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(results[0]["accumulators"], results[1]["accumulators"])


@pytest.mark.slow
def test_federated_rounds_on_two_processes_equal_one_process(tmp_path):
    """Two processes (torchrun, as `accelerate launch` with a MULTI_CPU config) run FedKSeed-Pro rounds with each
    rank on half of every local step's rows; the ranks end identical, and equal to one process on the whole rows."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    script = Path(__file__).parent / "helpers" / "federated_ranks.py"
    # torchrun: `accelerate launch --cpu` starts one process unless an accelerate config says MULTI_CPU (mpirun);
    # the Trainer's accelerate state reads the same RANK/WORLD_SIZE either way.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([*command, str(script), str(tmp_path), "1"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{rank}.safetensors")) for rank in (0, 1)]
    assert torch.equal(ranks[0]["accumulators"], ranks[1]["accumulators"])  # the same all-reduced scalars

    sys.path.insert(0, str(script.parent))
    try:
        import federated_ranks
    finally:
        sys.path.remove(str(script.parent))
    model, optimizer, _ = federated_ranks.run(tmp_path / "single", per_device_batch=2)
    # As above, only the order of the float additions differs (two ranks' partial sums, then one all-reduce), a
    # rounding-level change of L that g = (L+ - L-) / 2eps magnifies by 1/eps. Here L is float32 even for a float64
    # model (transformers' causal-LM loss upcasts the logits to float32), so the bound is the undo test's: about one
    # ulp of each loss (4.8e-7 for losses in [4, 8)) a step, times lr / eps, summed over the steps; weights also
    # times |z| < 6. A real disagreement (a row read twice, a step not all-reduced) moves them by lr * |g| ~ 1e-3.
    federated_config = federated_ranks.config(pro=True)
    steps = federated_config.rounds * federated_config.clients_per_round * federated_config.local_steps
    lr, zo_eps, z_max = 2e-3, 1e-3, 6.0
    bound = steps * lr * 4 * torch.finfo(torch.float32).eps / zo_eps
    torch.testing.assert_close(ranks[0]["accumulators"], optimizer.accumulators, rtol=0, atol=bound)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ranks[0][f"weight.{name}"], param.detach(), rtol=0, atol=bound * z_max)
    assert optimizer.accumulators.abs().max() > 100 * bound
