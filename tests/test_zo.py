"""Seed pool and seed sampler: determinism, distinctness, distributions, state round trip, validation."""

from __future__ import annotations

import pytest
import torch

from hf_fedkseed.zo import SEED_POOL_HIGH, SeedSampler, make_seed_pool, projected_grad, validate_probabilities


def test_seed_pool_is_deterministic_distinct_and_in_range():
    pool = make_seed_pool(4096, seed=7)
    assert torch.equal(pool, make_seed_pool(4096, seed=7))
    assert not torch.equal(pool, make_seed_pool(4096, seed=8))
    assert pool.unique().numel() == 4096
    assert pool.min().item() >= 1 and pool.max().item() < SEED_POOL_HIGH


def test_uniform_sampler_covers_the_pool_evenly():
    sampler = SeedSampler(8, seed=0)
    counts = torch.bincount(torch.tensor([sampler.sample() for _ in range(8000)]), minlength=8)
    assert counts.min().item() > 850 and counts.max().item() < 1150  # each ~1000, 5 sigma band


def test_sampler_follows_given_probabilities():
    probabilities = torch.tensor([0.0, 0.7, 0.1, 0.2])
    sampler = SeedSampler(4, seed=1, probabilities=probabilities)
    counts = torch.bincount(torch.tensor([sampler.sample() for _ in range(5000)]), minlength=4)
    assert counts[0].item() == 0
    assert abs(counts[1].item() / 5000 - 0.7) < 0.03


def test_sampler_state_round_trip_continues_the_same_sequence():
    sampler = SeedSampler(100, seed=3)
    [sampler.sample() for _ in range(5)]
    state = sampler.state_dict()
    expected = [sampler.sample() for _ in range(20)]
    restored = SeedSampler(100, seed=999)
    restored.load_state_dict(state)
    assert [restored.sample() for _ in range(20)] == expected


def test_sampler_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    sampler = SeedSampler(10, seed=0)
    [sampler.sample() for _ in range(10)]
    assert torch.equal(torch.rand(2), expected)


def test_validation_errors():
    with pytest.raises(ValueError, match="`num_seeds`"):
        make_seed_pool(0, seed=0)
    with pytest.raises(ValueError, match="one per seed"):
        validate_probabilities([0.5, 0.5], 3)
    with pytest.raises(ValueError, match="non-negative"):
        validate_probabilities([0.5, -0.1, 0.6], 3)
    with pytest.raises(ValueError, match="sums to zero"):
        validate_probabilities([0.0, 0.0], 2)
    assert validate_probabilities([1.0, 3.0], 2).tolist() == [0.25, 0.75]


def test_projected_grad_is_the_central_difference():
    assert projected_grad(0.02, eps=1e-3) == pytest.approx(10.0)
