"""KSeedClient: catch-up from full and sparse syncs, recording and undoing local steps, its update, its state."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import max_abs_diff, tiny_llama, token_batch

from hf_fedkseed import KSeedZOOptimizer
from hf_fedkseed.federated import KSeedClient, SyncMessage, UpdateMessage


def setup(undo: str = "snapshot", num_seeds: int = 16):
    model = tiny_llama()
    optimizer = KSeedZOOptimizer(model, lr=1e-3, eps=1e-3, num_seeds=num_seeds, seed=3)
    client = KSeedClient(optimizer.named_params, engine=optimizer.engine, seed_pool=optimizer.seed_pool, undo=undo)
    return model, optimizer, client


def accumulators(num_seeds: int, values: dict[int, float]) -> torch.Tensor:
    result = torch.zeros(num_seeds, dtype=torch.float64)
    for index, value in values.items():
        result[index] = value
    return result


def test_catch_up_replays_only_changed_seeds_to_w0_minus_sum():
    model, optimizer, client = setup()
    base = copy.deepcopy(model)
    target = accumulators(16, {2: 0.5, 7: -0.25})
    replayed = client.catch_up(SyncMessage.build(server_round=1, accumulators=target))
    assert replayed == 2 and client.synced_round == 1
    optimizer.engine.replay_(list(base.named_parameters()), optimizer.seed_pool.tolist(), (-target).tolist())
    assert max_abs_diff(model, base) == 0.0
    assert client.catch_up(SyncMessage.build(server_round=2, accumulators=target)) == 0  # nothing changed


def test_sparse_sync_gives_bit_for_bit_what_a_full_sync_gives():
    full_model, _, full_client = setup()
    sparse_model, _, sparse_client = setup()
    first = accumulators(16, {1: 0.5, 4: 0.125})
    second = accumulators(16, {1: 0.5, 4: -0.75, 9: 0.25})
    for client in (full_client, sparse_client):
        client.catch_up(SyncMessage.build(server_round=1, accumulators=first))
    full_client.catch_up(SyncMessage.build(server_round=2, accumulators=second, encoding="full"))
    sparse = SyncMessage.build(
        server_round=2, accumulators=second, changed_indices=[4, 9], base_round=1, encoding="sparse"
    )
    sparse_client.catch_up(SyncMessage.decode(sparse.encode()))
    assert max_abs_diff(full_model, sparse_model) == 0.0
    assert torch.equal(full_client.synced, sparse_client.synced)


@pytest.mark.parametrize("undo", ["snapshot", "replay"])
def test_end_local_undoes_the_local_steps(undo):
    model, optimizer, client = setup(undo)
    client.catch_up(SyncMessage.build(server_round=0, accumulators=accumulators(16, {3: 0.1})))
    synced_weights = copy.deepcopy(model)
    batch = token_batch()
    client.begin_local()
    for _ in range(5):
        optimizer.step(lambda: model(input_ids=batch, labels=batch).loss)
        client.record_step(optimizer.last_step)
    assert max_abs_diff(model, synced_weights) > 1e-4
    delta = client.local_coefficients()
    torch.testing.assert_close(delta, optimizer.accumulators, rtol=0, atol=1e-12)  # the optimizer started at zero
    client.end_local()
    tolerance = 0.0 if undo == "snapshot" else 1e-6
    assert max_abs_diff(model, synced_weights) <= tolerance


def test_skipped_steps_are_not_reported():
    _, _, client = setup()
    client.begin_local()
    client.record_step({"seed_index": 1, "projected_grad": 2.0, "lr": 0.5, "skipped": None})
    client.record_step({"seed_index": 2, "projected_grad": None, "lr": 0.5, "skipped": "nonfinite"})
    update = client.build_update(server_round=0, client_id=4, num_samples=10)
    assert update.seed_indices.tolist() == [1] and update.scalars.tolist() == [1.0]
    pro = UpdateMessage.decode(client.build_update(server_round=0, client_id=4, num_samples=10, pro=True).encode())
    assert pro.projected_grads.tolist() == [2.0] and pro.learning_rates.tolist() == [0.5]
    client.end_local()


def test_state_round_trip_and_errors():
    _, _, client = setup()
    client.catch_up(SyncMessage.build(server_round=3, accumulators=accumulators(16, {0: 1.0})))
    _, _, restored = setup()
    restored.load_state_dict(client.state_dict())
    assert torch.equal(restored.synced, client.synced) and restored.synced_round == 3
    with pytest.raises(ValueError, match="this client has 16"):
        client.catch_up(SyncMessage.build(server_round=4, accumulators=torch.zeros(8, dtype=torch.float64)))
    client.begin_local()
    with pytest.raises(RuntimeError, match="call end_local"):
        client.catch_up(SyncMessage.build(server_round=4, accumulators=torch.zeros(16, dtype=torch.float64)))
    with pytest.raises(ValueError, match="Invalid `undo`"):
        setup(undo="forget")
