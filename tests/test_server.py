"""KSeedServer: selection, weighted aggregation, rejection of bad updates, FedKSeed-Pro by hand, state round trip."""

from __future__ import annotations

import math
import random

import pytest
import torch

from hf_fedkseed.federated.server import DEFAULT_PRO_CLIP, ClientUpdate, KSeedServer
from hf_fedkseed.zo import make_seed_pool


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float64 tensor, so comparisons are bit-for-bit (-0.0 differs from 0.0)."""
    return tensor.view(torch.int64).clone()


def snapshot(server: KSeedServer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    return bits(server.accumulators), server.pro_count.clone(), bits(server.pro_abs_sum), server.last_round


def assert_same_snapshot(a, b) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3], strict=True)) and a[3] == b[3]


def two_client_server(**kwargs) -> KSeedServer:
    """Both clients are selected every round, which keeps hand examples short."""
    kwargs.setdefault("num_seeds", 4)
    return KSeedServer(2, clients_per_round=2, **kwargs)


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


# ---------------------------------------------------------------------- FedKSeed-Pro by hand
# Seed 0 sees g = 1.0 and -3.0 (beyond the clip of 2.0, so it counts as 2.0), seed 1 sees 0.5, seed 2 sees
# -0.25, 0.75 and 1.0, and seed 3 is never seen.
PRO_UPDATES = [
    ClientUpdate(0, 10, [0, 0, 1], [1e-3, -3e-3, 5e-4], projected_grads=[1.0, -3.0, 0.5]),
    ClientUpdate(1, 30, [2, 2, 2], [-2.5e-4, 7.5e-4, 1e-3], projected_grads=[-0.25, 0.75, 1.0]),
]


def test_pro_probabilities_match_the_official_formula_by_hand():
    server = two_client_server(pro=True, pro_clip=2.0)  # default pro_grad_initial=0.0, as the official code
    server.aggregate(0, PRO_UPDATES)
    # The official history of each seed starts with grad_initial = 0: mean |clip(g)| over [0, g...].
    importance = [(0 + 1.0 + 2.0) / 3, (0 + 0.5) / 2, (0 + 0.25 + 0.75 + 1.0) / 4, 0.0]
    assert importance == [1.0, 0.25, 0.5, 0.0]
    low, high = min(importance), max(importance)
    expected = softmax([(v - low) / (high + 1e-10 - low) for v in importance])
    assert server.pro_count.tolist() == [2, 1, 3, 0]
    assert server.pro_abs_sum.tolist() == [3.0, 0.5, 2.0, 0.0]
    assert server.importance().tolist() == importance
    probabilities = server.probabilities()
    assert probabilities.dtype == torch.float64
    torch.testing.assert_close(probabilities, torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=0)
    assert abs(probabilities.sum().item() - 1.0) < 1e-15
    # the most important seed is e times likelier than the least important one (up to the 1e-10)
    assert probabilities[0].item() / probabilities[3].item() == pytest.approx(math.e, rel=1e-9)


def test_pro_without_initial_entry_is_the_plain_mean_over_seen_gradients():
    server = two_client_server(pro=True, pro_clip=2.0, pro_grad_initial=None)
    server.aggregate(0, PRO_UPDATES)
    importance = [(1.0 + 2.0) / 2, 0.5 / 1, (0.25 + 0.75 + 1.0) / 3, 0.0]  # seed 3 never seen: 0
    torch.testing.assert_close(server.importance(), torch.tensor(importance, dtype=torch.float64), rtol=0, atol=0)
    low, high = min(importance), max(importance)
    expected = softmax([(v - low) / (high + 1e-10 - low) for v in importance])
    torch.testing.assert_close(server.probabilities(), torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=0)


def test_pro_statistics_accumulate_over_rounds_unweighted_and_use_the_default_clip():
    server = two_client_server(pro=True)
    assert server.pro_clip == DEFAULT_PRO_CLIP == 1000.0
    server.aggregate(0, [ClientUpdate(0, 1, [1], [0.0], [5000.0]), ClientUpdate(1, 99, [1], [0.0], [-2.0])])
    server.aggregate(1, [ClientUpdate(0, 1, [1, 2], [0.0, 0.0], [4.0, 8.0])])
    # every g counts once whatever the client's weight; 5000 is clipped to 1000
    assert server.pro_count.tolist() == [0, 3, 1, 0]
    assert server.pro_abs_sum.tolist() == [0.0, 1006.0, 8.0, 0.0]
    assert server.importance().tolist() == [0.0, 1006.0 / 4, 8.0 / 2, 0.0]


def test_probabilities_are_uniform_without_pro_or_before_any_gradient():
    assert torch.equal(two_client_server(pro=True).probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    plain = two_client_server()
    plain.aggregate(0, PRO_UPDATES)
    assert torch.equal(plain.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    assert plain.pro_count.sum().item() == 0  # no Pro statistics kept with pro=False


# ---------------------------------------------------------------------- selection
def test_selection_is_seeded_sorted_and_without_replacement():
    server = KSeedServer(200, num_seeds=4, seed=3, client_fraction=0.05)
    for round in range(20):
        chosen = server.select_clients(round)
        assert len(chosen) == 10 == len(set(chosen))
        assert chosen == sorted(chosen) and chosen[0] >= 0 and chosen[-1] < 200
        assert chosen == KSeedServer(200, num_seeds=4, seed=3, clients_per_round=10).select_clients(round)
    assert len({tuple(server.select_clients(r)) for r in range(20)}) == 20  # rounds differ
    other = KSeedServer(200, num_seeds=4, seed=4, client_fraction=0.05)
    assert server.select_clients(0) != other.select_clients(0)


def test_selection_does_not_depend_on_call_history():
    fresh = KSeedServer(50, num_seeds=4, seed=9, clients_per_round=5).select_clients(7)
    used = KSeedServer(50, num_seeds=4, seed=9, clients_per_round=5)
    for round in [0, 1, 2, 7, 3, 7, 100]:
        used.select_clients(round)
    assert used.select_clients(7) == fresh


def test_selection_is_roughly_uniform_over_clients():
    server = KSeedServer(10, num_seeds=4, seed=0, clients_per_round=3)
    counts = torch.bincount(torch.tensor([c for r in range(2000) for c in server.select_clients(r)]), minlength=10)
    assert counts.sum().item() == 6000
    assert counts.min().item() > 500 and counts.max().item() < 700  # each ~600, sd ~20


@pytest.mark.parametrize(
    ("num_clients", "fraction", "expected"),
    [(200, 0.05, 10), (100, 0.07, 7), (100, 0.29, 29), (10, 0.25, 3), (10, 0.01, 1), (7, 1.0, 7), (3, 0.5, 2)],
)
def test_client_fraction_rounds_to_nearest_with_at_least_one(num_clients, fraction, expected):
    # 0.07 * 100 = 7.000000000000001 (ceil would give 8); 0.29 * 100 = 28.999999999999996 (floor would give 28)
    server = KSeedServer(num_clients, num_seeds=4, client_fraction=fraction)
    assert server.clients_per_round == expected
    assert len(server.select_clients(0)) == expected


def test_select_clients_rejects_a_bad_round():
    server = two_client_server()
    with pytest.raises(ValueError, match="`round`"):
        server.select_clients(-1)
    with pytest.raises(ValueError, match="`round`"):
        server.select_clients(1.0)


# ---------------------------------------------------------------------- aggregation
HAND_UPDATES = [
    ClientUpdate(0, 1, [0, 2, 0], [0.5, 1.0, 0.25]),
    ClientUpdate(1, 3, [2, 3], [2.0, -1.0]),
]


def test_sample_weighted_aggregation_by_hand():
    server = two_client_server()
    result = server.aggregate(0, HAND_UPDATES)
    # w = (1/4, 3/4): A0 = 1/4 * 0.75, A2 = 1/4 * 1 + 3/4 * 2, A3 = 3/4 * -1
    assert server.accumulators.tolist() == [0.1875, 0.0, 1.75, -0.75]
    assert result.accepted == [0, 1] and result.rejected == {} and result.weights == {0: 0.25, 1: 0.75}
    assert result.seeds_touched == 3
    assert result.delta.indices.tolist() == [0, 2, 3] and result.delta.values.tolist() == [0.1875, 1.75, -0.75]
    assert torch.equal(server.model_coefficients(), -server.accumulators)


def test_equal_aggregation_by_hand_and_accumulation_over_rounds():
    server = two_client_server(aggregation="equal")
    server.aggregate(0, HAND_UPDATES)
    assert server.accumulators.tolist() == [0.375, 0.0, 1.5, -0.5]
    result = server.aggregate(3, [ClientUpdate(1, 0, [1, 0], [4.0, 1.0])])  # rounds may skip; n=0 is fine here
    assert result.weights == {1: 1.0}
    assert server.accumulators.tolist() == [1.375, 4.0, 1.5, -0.5]
    assert server.last_round == 3


def test_accepts_tensors_and_arrival_order_does_not_change_the_bits():
    generator = torch.Generator().manual_seed(0)
    kwargs = dict(num_seeds=16, seed=5, clients_per_round=6)
    ids = KSeedServer(6, **kwargs).select_clients(0)
    updates = [
        ClientUpdate(
            c,
            int(torch.randint(1, 100, (1,), generator=generator)),
            torch.randint(0, 16, (7,), generator=generator),
            torch.randn(7, generator=generator, dtype=torch.float64) * 1e-3,
        )
        for c in ids
    ]
    forward, backward = KSeedServer(6, **kwargs), KSeedServer(6, **kwargs)
    forward.aggregate(0, updates)
    backward.aggregate(0, updates[::-1])
    assert torch.equal(bits(forward.accumulators), bits(backward.accumulators))
    assert forward.accumulators.abs().sum().item() > 0


def test_rounds_must_increase():
    server = two_client_server()
    server.aggregate(2, HAND_UPDATES)
    before = snapshot(server)
    for round in (2, 1):
        with pytest.raises(ValueError, match="rounds must increase"):
            server.aggregate(round, HAND_UPDATES)
    assert_same_snapshot(snapshot(server), before)


def test_a_round_without_valid_updates_leaves_the_accumulators_unchanged():
    server = two_client_server(pro=True)
    server.aggregate(0, PRO_UPDATES)
    before = snapshot(server)
    result = server.aggregate(1, [])
    assert result.accepted == [] and result.seeds_touched == 0 and len(result.delta) == 0
    assert_same_snapshot(snapshot(server), (*before[:3], 1))


# ---------------------------------------------------------------------- rejection
def _rejection_server() -> tuple[KSeedServer, list[int], int]:
    server = KSeedServer(3, num_seeds=8, seed=1, clients_per_round=2, pro=True, max_abs_scalar=1.0)
    server.aggregate(0, [ClientUpdate(c, 5, [c, 7], [0.1, -0.2], [1.0, -2.0]) for c in server.select_clients(0)])
    selected = server.select_clients(1)
    (outsider,) = set(range(3)) - set(selected)
    return server, selected, outsider


BAD_UPDATES = {
    "not selected": (lambda sel, out: ClientUpdate(out, 5, [1], [0.1], [1.0]), "not selected in round 1"),
    "nan scalar": (lambda sel, out: ClientUpdate(sel[0], 5, [1, 2], [0.1, math.nan], [1.0, 1.0]), "scalar"),
    "inf grad": (lambda sel, out: ClientUpdate(sel[0], 5, [1, 2], [0.1, 0.1], [1.0, math.inf]), "gradient"),
    "index too big": (lambda sel, out: ClientUpdate(sel[0], 5, [1, 8], [0.1, 0.1], [1.0, 1.0]), "seed index 8"),
    "index negative": (lambda sel, out: ClientUpdate(sel[0], 5, [-1], [0.1], [1.0]), "seed index -1"),
    "float index": (lambda sel, out: ClientUpdate(sel[0], 5, [1.0], [0.1], [1.0]), "must be integers"),
    "short scalars": (lambda sel, out: ClientUpdate(sel[0], 5, [1, 2], [0.1], [1.0, 1.0]), "length mismatch"),
    "short grads": (lambda sel, out: ClientUpdate(sel[0], 5, [1, 2], [0.1, 0.1], [1.0]), "length mismatch"),
    "no grads": (lambda sel, out: ClientUpdate(sel[0], 5, [1], [0.1]), "`projected_grads` is missing"),
    "2-D": (lambda sel, out: ClientUpdate(sel[0], 5, [[1]], [[0.1]], [[1.0]]), "flat lists"),
    "beyond max": (lambda sel, out: ClientUpdate(sel[0], 5, [1, 2], [0.1, -1.5], [1.0, 1.0]), "max_abs_scalar"),
    "no samples": (lambda sel, out: ClientUpdate(sel[0], 0, [1], [0.1], [1.0]), "`num_samples` is 0"),
    "bool samples": (lambda sel, out: ClientUpdate(sel[0], True, [1], [0.1], [1.0]), "`num_samples` is True"),
    "not numbers": (lambda sel, out: ClientUpdate(sel[0], 5, [1], ["x"], [1.0]), "could not be read"),
}


@pytest.mark.parametrize("kind", list(BAD_UPDATES))
def test_a_bad_update_is_rejected_and_changes_nothing(kind):
    server, selected, outsider = _rejection_server()
    make, reason = BAD_UPDATES[kind]
    bad = make(selected, outsider)
    before = snapshot(server)
    result = server.aggregate(1, [bad])
    assert result.accepted == [] and list(result.rejected) == [bad.client_id]
    assert reason in result.rejected[bad.client_id]
    assert_same_snapshot(snapshot(server), (*before[:3], 1))


@pytest.mark.parametrize("kind", list(BAD_UPDATES))
def test_valid_updates_beside_a_bad_one_aggregate_as_if_it_were_absent(kind):
    server, selected, outsider = _rejection_server()
    reference, _, _ = _rejection_server()
    good = ClientUpdate(selected[1], 7, [3, 3, 5], [0.3, 0.01, -0.7], [0.5, 0.5, 9.0])
    bad = BAD_UPDATES[kind][0](selected, outsider)
    result = server.aggregate(1, [bad, good])
    reference.aggregate(1, [good])
    assert result.accepted == [selected[1]] and result.weights == {selected[1]: 1.0}
    assert_same_snapshot(snapshot(server), snapshot(reference))


def test_duplicate_updates_from_one_client_are_all_rejected():
    server, selected, _ = _rejection_server()
    before = snapshot(server)
    twice = [ClientUpdate(selected[0], 5, [1], [0.1], [1.0]), ClientUpdate(selected[0], 5, [2], [0.2], [1.0])]
    result = server.aggregate(1, twice)
    assert result.accepted == [] and "2 updates" in result.rejected[selected[0]]
    assert_same_snapshot(snapshot(server), (*before[:3], 1))


# ---------------------------------------------------------------------- catch-up helpers
def test_delta_since_lets_a_client_catch_up_bit_for_bit():
    server = two_client_server(num_seeds=8)
    server.aggregate(0, [ClientUpdate(0, 3, [1, 5], [0.1, 0.2]), ClientUpdate(1, 4, [5], [-0.3])])
    first = server.delta_since(None)
    assert first.indices.tolist() == [1, 5]
    client_copy = first.to_dense(8)
    assert torch.equal(bits(client_copy), bits(server.accumulators))
    server.aggregate(1, [ClientUpdate(0, 3, [2], [1 / 3])])
    delta = server.delta_since(client_copy)
    assert delta.indices.tolist() == [2]
    client_copy[delta.indices] = delta.values
    assert torch.equal(bits(client_copy), bits(server.accumulators))
    with pytest.raises(ValueError, match="`previous_accumulators` has 3 entries"):
        server.delta_since(torch.zeros(3))


def test_the_seed_pool_is_the_clients_pool():
    assert torch.equal(KSeedServer(4, seed=11, clients_per_round=2).seed_pool, make_seed_pool(4096, 11))


# ---------------------------------------------------------------------- state
def _run_rounds(server: KSeedServer, rounds: range) -> None:
    generator = torch.Generator().manual_seed(rounds.start)
    for round in rounds:
        updates = []
        for client in server.select_clients(round):
            grads = torch.randn(5, generator=generator, dtype=torch.float64)
            indices = torch.randint(0, server.num_seeds, (5,), generator=generator)
            updates.append(ClientUpdate(client, client + 1, indices, 1e-3 * grads, grads))
        server.aggregate(round, updates)


def test_state_round_trip_through_torch_save_continues_identically(tmp_path):
    kwargs = dict(num_seeds=32, seed=2, client_fraction=0.5, pro=True)
    original = KSeedServer(6, **kwargs)
    _run_rounds(original, range(0, 3))
    torch.save(original.state_dict(), tmp_path / "server.pt")
    resumed = KSeedServer(6, **kwargs)
    resumed.load_state_dict(torch.load(tmp_path / "server.pt", weights_only=True))
    assert_same_snapshot(snapshot(resumed), snapshot(original))
    with pytest.raises(ValueError, match="rounds must increase"):
        resumed.aggregate(2, [])
    _run_rounds(original, range(3, 6))
    _run_rounds(resumed, range(3, 6))
    assert_same_snapshot(snapshot(resumed), snapshot(original))
    assert torch.equal(bits(resumed.probabilities()), bits(original.probabilities()))
    assert resumed.select_clients(6) == original.select_clients(6)


@pytest.mark.parametrize(
    ("other", "field"),
    [
        (dict(num_clients=6, num_seeds=16, seed=2), "num_seeds"),
        (dict(num_clients=6, num_seeds=32, seed=3), "seed"),
        (dict(num_clients=7, num_seeds=32, seed=2), "num_clients"),
        (dict(num_clients=6, num_seeds=32, seed=2, pro_clip=5.0), "pro_clip"),
    ],
)
def test_load_state_refuses_another_configuration_and_changes_nothing(other, field):
    source = KSeedServer(6, num_seeds=32, seed=2, clients_per_round=3, pro=True)
    _run_rounds(source, range(2))
    num_clients = other.pop("num_clients")
    target = KSeedServer(num_clients, clients_per_round=3, pro=True, **other)
    _run_rounds(target, range(1))
    before = snapshot(target)
    with pytest.raises(ValueError, match=f"`{field}`="):
        target.load_state_dict(source.state_dict())
    assert_same_snapshot(snapshot(target), before)


def test_load_state_refuses_a_malformed_state():
    server = two_client_server()
    state = server.state_dict()
    with pytest.raises(ValueError, match="lacks"):
        server.load_state_dict({key: value for key, value in state.items() if key != "pro_count"})
    with pytest.raises(ValueError, match="shape"):
        server.load_state_dict({**state, "accumulators": torch.zeros(5, dtype=torch.float64)})
    with pytest.raises(ValueError, match="non-finite"):
        server.load_state_dict({**state, "accumulators": torch.full((4,), math.nan, dtype=torch.float64)})


def test_the_global_rng_is_untouched():
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    server = KSeedServer(20, num_seeds=64, seed=0, clients_per_round=4, pro=True)
    _run_rounds(server, range(3))
    server.probabilities()
    server.delta_since(None)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state


# ---------------------------------------------------------------------- construction
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_clients=0, clients_per_round=1), "`num_clients`"),
        (dict(num_clients=2.0, clients_per_round=1), "`num_clients`"),
        (dict(num_clients=4, num_seeds=0, clients_per_round=1), "`num_seeds`"),
        (dict(num_clients=4, seed="0", clients_per_round=1), "`seed`"),
        (dict(num_clients=4), "exactly one of `clients_per_round`"),
        (dict(num_clients=4, clients_per_round=2, client_fraction=0.5), "exactly one of `clients_per_round`"),
        (dict(num_clients=4, clients_per_round=0), "`clients_per_round`"),
        (dict(num_clients=4, clients_per_round=5), "`clients_per_round`"),
        (dict(num_clients=4, clients_per_round=True), "`clients_per_round`"),
        (dict(num_clients=4, client_fraction=0.0), "`client_fraction`"),
        (dict(num_clients=4, client_fraction=1.5), "`client_fraction`"),
        (dict(num_clients=4, client_fraction=math.nan), "`client_fraction`"),
        (dict(num_clients=4, clients_per_round=1, aggregation="mean"), "`aggregation`"),
        (dict(num_clients=4, clients_per_round=1, pro=1), "`pro`"),
        (dict(num_clients=4, clients_per_round=1, pro_clip=0.0), "`pro_clip`"),
        (dict(num_clients=4, clients_per_round=1, pro_clip=math.nan), "`pro_clip`"),
        (dict(num_clients=4, clients_per_round=1, pro_grad_initial=math.inf), "`pro_grad_initial`"),
        (dict(num_clients=4, clients_per_round=1, max_abs_scalar=0.0), "`max_abs_scalar`"),
        (dict(num_clients=4, clients_per_round=1, max_abs_scalar=math.inf), "`max_abs_scalar`"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    num_clients = kwargs.pop("num_clients")
    with pytest.raises(ValueError, match=match):
        KSeedServer(num_clients, num_seeds=kwargs.pop("num_seeds", 4), **kwargs)
