"""The cyclic-shift engine (`counter-shift`): directions are per-block shifts of one sequence, and the FFT replay of
many seeds equals the per-seed sum; it trains, catches up bit for bit, and round-trips through a KSeed delta."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import max_abs_diff, tiny_llama, token_batch

from hf_fedkseed import KSeedZOOptimizer, apply_kseed, base_weights_sha256, save_kseed_delta
from hf_fedkseed.federated import KSeedClient, SyncMessage
from hf_fedkseed.perturbation import CounterEngine, ShiftCounterEngine, get_engine
from hf_fedkseed.perturbation.counter_rng import SHIFT_BLOCK, SHIFT_MASK, block_offsets, gaussian_from_counter
from hf_fedkseed.perturbation.hashing import to_int32

B = SHIFT_BLOCK


def base_sequence(engine: ShiftCounterEngine, name: str, blocks: int) -> torch.Tensor:
    """u for `blocks` whole blocks, straight from the counter function (not through the engine's kernels)."""
    k0, k1 = engine.base_key(name)
    counters = torch.arange(blocks * B, dtype=torch.int32)
    return gaussian_from_counter(counters, torch.tensor(to_int32(k0)), torch.tensor(to_int32(k1)))


def offsets(engine: ShiftCounterEngine, seed: int, name: str, blocks: int) -> list[int]:
    s = torch.tensor(engine.words(seed, name, 0)[2], dtype=torch.int32)
    return block_offsets(torch.arange(blocks, dtype=torch.int32), s, SHIFT_MASK).tolist()


def test_each_direction_is_a_cyclic_shift_of_the_base_sequence_in_every_block():
    engine = ShiftCounterEngine(compile=False)
    name = "model.layers.0.mlp.up_proj.weight"
    params = [(name, torch.zeros(2 * B + 1000))]  # two whole blocks and the head of a third
    u = base_sequence(engine, name, 3).view(3, B)
    for seed in (7, 8):
        z = engine.generate(params, seed)[0]
        for block, offset in enumerate(offsets(engine, seed, name, 3)):
            expected = torch.roll(u[block], -offset)  # z(t) = u((t + o) mod B)
            got = z[block * B : (block + 1) * B]
            assert torch.equal(got, expected[: got.numel()])
    first, second = (engine.generate(params, seed)[0][:B] for seed in (7, 8))
    lag = (offsets(engine, 8, name, 1)[0] - offsets(engine, 7, name, 1)[0]) % B
    assert torch.equal(torch.roll(first, -lag), second)  # two seeds: the same block at another lag
    # the vectorised offset words are the per-seed ones
    seeds = np.array([0, 7, 2**63 + 5, 2**64 - 1], dtype=np.uint64)
    words = engine.offset_words(seeds, name)
    assert words.tolist() == [engine.words(int(s), name, 0)[2] & 0xFFFFFFFF for s in seeds]


def test_directions_are_standard_normal_and_uncorrelated():
    engine = ShiftCounterEngine(compile=False)
    n = 1 << 20  # 16 blocks
    params = [("w", torch.zeros(n))]
    z = engine.generate(params, seed=2024)[0].double()
    tolerance = 5 / math.sqrt(n)
    assert abs(z.mean().item()) < tolerance and abs(z.var().item() - 1.0) < 5 * math.sqrt(2 / n)
    for x in (-2.0, -0.5, 1.0):
        assert abs((z < x).double().mean().item() - 0.5 * (1 + math.erf(x / math.sqrt(2)))) < 0.002
    # other seeds (other lags of the same blocks), other names, and neighbouring elements are uncorrelated
    for other in (
        engine.generate(params, seed=2025)[0].double(),
        engine.generate([("v", torch.zeros(n))], seed=2024)[0].double(),
        torch.roll(z, 1),
    ):
        assert abs(torch.corrcoef(torch.stack([z, other]))[0, 1].item()) < tolerance


def mixed_params() -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(300, 500, generator=generator)),  # 2.3 blocks
        ("a.bias", torch.randn(13, generator=generator)),  # a sliver of one block
        ("b.weight", torch.randn(B, generator=generator).to(torch.bfloat16)),  # one whole block, low precision
    ]


def test_fft_replay_equals_the_per_seed_sum_and_skips_zeros():
    seeds = list(range(100, 160))
    coefficients = torch.randn(60, generator=torch.Generator().manual_seed(1)).mul(1e-2).tolist()
    coefficients[5] = 0.0
    by_fft, by_seed = ShiftCounterEngine(compile=False), ShiftCounterEngine(compile=False, fft_min_seeds=10**6)
    fast = [(n, p.clone()) for n, p in mixed_params()]
    slow = [(n, p.clone()) for n, p in mixed_params()]
    assert by_fft.replay_(fast, seeds, coefficients) == 59
    assert by_seed.replay_(slow, seeds, coefficients) == 59
    exact = [(n, p.double()) for n, p in mixed_params()]  # the sum in float64, from float64 directions
    for seed, coefficient in zip(seeds, coefficients, strict=True):
        for (_, target), z in zip(exact, by_seed.generate(mixed_params(), seed), strict=True):
            target.add_(z.double(), alpha=coefficient)
    for (name, got), (_, other), (_, want) in zip(fast, slow, exact, strict=True):
        assert got.dtype == other.dtype
        if got.dtype == torch.float32:  # float32 rounding only: the FFT is as close to the exact sum as 59 passes
            assert (got.double() - want).abs().max() < 2e-6, name
            assert (other.double() - want).abs().max() < 2e-6, name
        else:
            torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)
    # the same inputs give the same bits: every party replays through this one function
    again = [(n, p.clone()) for n, p in mixed_params()]
    by_fft.replay_(again, seeds, coefficients)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(fast, again, strict=True))


def test_few_seeds_take_the_counter_engines_replay():
    engine = ShiftCounterEngine(compile=False, fft_min_seeds=8)
    seeds, coefficients = [3, 4, 5], [0.25, -1.5, 1e-3]
    replayed = [(n, p.clone()) for n, p in mixed_params()]
    direct = [(n, p.clone()) for n, p in mixed_params()]
    stepped = [(n, p.clone()) for n, p in mixed_params()]
    assert engine.replay_(replayed, seeds, coefficients) == 3
    CounterEngine.replay_(engine, direct, seeds, coefficients)  # the shifted directions, without the FFT
    for seed, coefficient in zip(seeds, coefficients, strict=True):
        engine.add_noise_(stepped, seed, coefficient)
    for (_, x), (_, y), (_, w) in zip(replayed, direct, stepped, strict=True):
        assert torch.equal(x, y)
        low = x.dtype == torch.bfloat16  # three roundings to bfloat16 against one
        torch.testing.assert_close(x, w, rtol=1e-2 if low else 0, atol=1e-2 if low else 1e-6)


def test_fft_scratch_is_bounded_and_arguments_are_checked():
    engine = ShiftCounterEngine(compile=False, fft_blocks=4)
    assert engine.scratch_bytes(mixed_params()) == 20 * 4 * B
    with pytest.raises(ValueError, match="multiple of 65536"):
        ShiftCounterEngine(chunk_size=1000)
    with pytest.raises(ValueError, match="positive"):
        ShiftCounterEngine(fft_min_seeds=0)
    assert get_engine("counter-shift@tensors=0.5").name == "counter-shift@tensors=0.5"
    assert (get_engine("counter-shift", version=1).name, ShiftCounterEngine.version) == ("counter-shift", 1)
    with pytest.raises(ValueError, match="no version 2"):
        get_engine("counter-shift", version=2)


def test_it_trains_catches_up_bit_for_bit_and_round_trips_through_a_delta(tmp_path):
    model = tiny_llama()
    base = copy.deepcopy(model)
    base_hash = base_weights_sha256(model)
    optimizer = KSeedZOOptimizer(model, lr=1e-2, eps=1e-3, num_seeds=64, seed=3, engine="counter-shift")
    batch = token_batch()
    loss = lambda: model(input_ids=batch, labels=batch).loss  # noqa: E731
    with torch.no_grad():
        before = loss().item()
    for _ in range(30):
        optimizer.step(loss)
    with torch.no_grad():
        assert loss().item() < before  # it descends
    assert int((optimizer.accumulators != 0).sum()) >= 8  # enough seeds for the FFT path below

    # a fresh client catching up to the accumulators gets the server's reconstruction bit for bit
    client_model, server_model = tiny_llama(), tiny_llama()
    client = KSeedClient(list(client_model.named_parameters()), engine=optimizer.engine, seed_pool=optimizer.seed_pool)
    client.catch_up(SyncMessage.build(server_round=1, accumulators=optimizer.accumulators.double()))
    get_engine("counter-shift").replay_(
        list(server_model.named_parameters()), optimizer.seed_pool.tolist(), (-optimizer.accumulators).tolist()
    )
    assert max_abs_diff(client_model, server_model) == 0.0
    assert max_abs_diff(client_model, model) < 1e-5  # the trained weights, up to float32 rounding of the steps

    config = save_kseed_delta(optimizer, tmp_path, base_weights_sha256=base_hash, base_model="tiny")
    assert (config["engine"], config["engine_version"]) == ("counter-shift", 1)
    rebuilt = apply_kseed(base, tmp_path)
    assert max_abs_diff(rebuilt, server_model) == 0.0


@pytest.mark.slow
def test_compiled_kernels_agree_with_eager():
    """The step kernel and the FFT replay's u, compiled: the same bits as eager (tens of s to compile)."""
    params = [("layers.0.weight", torch.zeros(B + 70_001)), ("layers.0.bias", torch.zeros(33))]
    compiled, eager = ShiftCounterEngine(compile=True), ShiftCounterEngine(compile=False)
    for got, want in zip(compiled.generate(params, seed=5), eager.generate(params, seed=5), strict=True):
        assert torch.equal(got, want)
    seeds, coefficients = list(range(20)), [0.01 * (j - 10) for j in range(20)]
    a = [(n, p.clone()) for n, p in params]
    b = [(n, p.clone()) for n, p in params]
    compiled.replay_(a, seeds, coefficients)
    eager.replay_(b, seeds, coefficients)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True))
    assert set(compiled.compile_seconds) == {"perturb/cpu/float32"}  # one kernel: steps and the replay's u
