"""Perturbation engines: determinism, name keying, the official stream, replay, bounded scratch, no global RNG use."""

from __future__ import annotations

import pytest
import torch

from hf_fedkseed.perturbation import (
    ENGINES,
    ChunkedGeneratorEngine,
    SequentialGeneratorEngine,
    canonical_name,
    get_engine,
)


def named(*shapes: tuple[int, ...], dtype=torch.float32) -> list[tuple[str, torch.Tensor]]:
    return [(f"layer{i}.weight", torch.zeros(shape, dtype=dtype)) for i, shape in enumerate(shapes)]


@pytest.mark.parametrize("engine_name", sorted(ENGINES))
def test_same_seed_same_z_and_different_seed_different_z(engine_name):
    engine = get_engine(engine_name)
    params = named((7, 5), (11,))
    first = engine.generate(params, seed=123)
    again = get_engine(engine_name).generate(params, seed=123)
    other = engine.generate(params, seed=124)
    for a, b, c in zip(first, again, other, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, c)


@pytest.mark.parametrize("engine_name", sorted(ENGINES))
def test_global_rng_is_neither_read_nor_written(engine_name):
    engine = get_engine(engine_name)
    params = named((64, 64))
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    z_a = engine.generate(params, seed=5)[0]
    assert torch.equal(torch.rand(3), expected_next)  # the global stream did not move
    torch.manual_seed(999)
    z_b = engine.generate(params, seed=5)[0]
    assert torch.equal(z_a, z_b)  # and it did not influence z


def test_chunked_z_is_keyed_by_name_not_position_or_neighbours():
    engine = ChunkedGeneratorEngine(chunk_size=16)
    a = torch.zeros(10, 10)
    b = torch.zeros(33)
    alone = engine.generate([("decoder.a", a)], seed=9)[0]
    with_neighbour = engine.generate([("decoder.b", b), ("decoder.a", a)], seed=9)[1]
    torch.testing.assert_close(alone, with_neighbour, rtol=0, atol=0)
    renamed = engine.generate([("decoder.c", a)], seed=9)[0]
    assert not torch.equal(alone, renamed)


def test_chunked_z_follows_wrapped_names():
    engine = ChunkedGeneratorEngine(chunk_size=8)
    a = torch.zeros(20)
    assert canonical_name("module._orig_mod.model.layers.0.weight") == "model.layers.0.weight"
    plain = engine.generate([("model.w", a)], seed=1)[0]
    wrapped = engine.generate([("module._orig_mod.model.w", a)], seed=1)[0]
    torch.testing.assert_close(plain, wrapped, rtol=0, atol=0)


def test_chunked_chunks_are_distinct_streams():
    engine = ChunkedGeneratorEngine(chunk_size=32)
    z = engine.generate([("w", torch.zeros(96))], seed=3)[0]
    assert not torch.equal(z[:32], z[32:64])
    assert not torch.equal(z[32:64], z[64:])


def test_sequential_engine_reproduces_the_official_global_seed_stream():
    params = named((6, 4), (4,), (3, 3, 2))
    z = SequentialGeneratorEngine().generate(params, seed=42)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(42)  # the official code: one global seed, then torch.normal per parameter in order
        official = [torch.normal(mean=0, std=1, size=p.size(), dtype=p.dtype) for _, p in params]
    for mine, theirs in zip(z, official, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("engine_name", sorted(ENGINES))
def test_add_noise_applies_beta_then_alpha(engine_name):
    engine = get_engine(engine_name)
    base = [("a.weight", torch.randn(8, 8, generator=torch.Generator().manual_seed(0))), ("a.bias", torch.ones(8))]
    z = engine.generate(base, seed=7)
    params = [(n, p.clone()) for n, p in base]
    engine.add_noise_(params, seed=7, alpha=[0.5, -2.0], beta=[0.9, 1.0])
    torch.testing.assert_close(params[0][1], 0.9 * base[0][1] + 0.5 * z[0])
    torch.testing.assert_close(params[1][1], base[1][1] - 2.0 * z[1])


@pytest.mark.parametrize("engine_name", sorted(ENGINES))
def test_perturb_and_undo_round_trip(engine_name):
    engine = get_engine(engine_name)
    start = torch.randn(50, 20, generator=torch.Generator().manual_seed(1))
    params = [("w", start.clone())]
    engine.add_noise_(params, seed=11, alpha=1e-3)
    assert not torch.equal(params[0][1], start)
    engine.add_noise_(params, seed=11, alpha=-1e-3)
    torch.testing.assert_close(params[0][1], start, rtol=0, atol=1e-6)


@pytest.mark.parametrize("engine_name", sorted(ENGINES))
def test_replay_is_the_sum_of_scaled_directions_and_skips_zeros(engine_name):
    engine = get_engine(engine_name)
    params = named((12, 5))
    seeds, coefficients = [3, 4, 5], [0.25, 0.0, -1.5]
    expected = 0.25 * engine.generate(params, 3)[0] - 1.5 * engine.generate(params, 5)[0]
    applied = engine.replay_(params, seeds, coefficients)
    assert applied == 2
    torch.testing.assert_close(params[0][1], expected)
    with pytest.raises(ValueError):
        engine.replay_(params, [1, 2], [0.5])


def test_chunked_gaussian_moments():
    z = ChunkedGeneratorEngine(chunk_size=1 << 16).generate([("w", torch.zeros(1 << 18))], seed=2024)[0]
    assert abs(z.mean().item()) < 0.01  # 4 standard errors at n = 262144
    assert abs(z.var().item() - 1.0) < 0.015


def test_low_precision_parameters_take_float32_noise():
    engine = ChunkedGeneratorEngine(chunk_size=64)
    params = [("w", torch.zeros(100, dtype=torch.bfloat16))]
    engine.add_noise_(params, seed=1, alpha=1.0)
    z32 = engine.generate([("w", torch.zeros(100))], seed=1)[0]
    assert params[0][1].dtype == torch.bfloat16
    torch.testing.assert_close(params[0][1].float(), z32, rtol=1e-2, atol=1e-2)


def test_scratch_memory_is_bounded_by_one_chunk():
    engine = ChunkedGeneratorEngine(chunk_size=1024)
    params = named((4096, 64), (10,))
    assert engine.scratch_bytes(params) == 4 * 1024
    engine.add_noise_(params, seed=0, alpha=1.0)
    (scratch,) = engine._scratch.values()
    assert scratch.numel() == 1024  # never a copy of a parameter, let alone of the model
    assert SequentialGeneratorEngine().scratch_bytes(params) == 4 * 4096 * 64


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="Unknown perturbation `engine` 'nope'"):
        get_engine("nope")
    with pytest.raises(ValueError, match="`chunk_size`"):
        ChunkedGeneratorEngine(chunk_size=0)
    with pytest.raises(ValueError, match="not contiguous"):
        ChunkedGeneratorEngine().add_noise_([("w", torch.zeros(4, 6).t())], seed=0, alpha=1.0)
    with pytest.raises(ValueError, match="`alpha` has 1 entries but there are 2 parameters"):
        ChunkedGeneratorEngine().add_noise_(named((2,), (3,)), seed=0, alpha=[1.0])
