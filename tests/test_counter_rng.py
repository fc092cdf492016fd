"""The counter-based engine: z is a function of (seed, name, index); statistics; compiled == eager; fused replay."""

from __future__ import annotations

import math

import pytest
import torch

from hf_fedkseed.perturbation import DEFAULT_ENGINE, CounterEngine, RademacherCounterEngine, get_engine
from hf_fedkseed.perturbation.counter_rng import gaussian_from_counter


def test_counter_is_the_default_engine():
    assert DEFAULT_ENGINE == "counter"
    assert isinstance(get_engine(), CounterEngine)


@pytest.mark.parametrize("engine_cls", [CounterEngine, RademacherCounterEngine])
def test_same_z_for_any_chunking_and_any_slice(engine_cls):
    params = [("model.layers.0.mlp.up_proj.weight", torch.zeros(10_007))]
    whole = engine_cls(compile=False).generate(params, seed=77)[0]
    for chunk_size in (1, 64, 1000, 4096):
        assert torch.equal(engine_cls(chunk_size=chunk_size, compile=False).generate(params, seed=77)[0], whole)
    # any slice on its own: element i depends only on (seed, name, i)
    engine = engine_cls(compile=False)
    k0, k1 = engine.key(77, params[0][0])
    to32 = lambda v: v - (1 << 32) if v >= (1 << 31) else v  # noqa: E731
    counters = torch.arange(5000, 5100, dtype=torch.int32)
    piece = (
        gaussian_from_counter(counters, torch.tensor(to32(k0)), torch.tensor(to32(k1)))
        if engine_cls is CounterEngine
        else None
    )
    if piece is not None:
        assert torch.equal(piece, whole[5000:5100])


def test_gaussian_moments_and_independence():
    engine = CounterEngine(compile=False)
    n = 1 << 20
    z = engine.generate([("w", torch.zeros(n))], seed=2024)[0].double()
    tolerance = 5 / math.sqrt(n)  # five standard errors
    assert abs(z.mean().item()) < tolerance
    assert abs(z.var().item() - 1.0) < 5 * math.sqrt(2 / n)
    assert abs(((z - z.mean()) ** 4).mean().item() / z.var().item() ** 2 - 3.0) < 0.05
    assert z.abs().max().item() < 5.8  # 24-bit uniforms bound |z| by sqrt(-2 ln 2**-24) = 5.77
    # normal CDF at a few points
    for x in (-2.0, -1.0, 0.0, 0.5, 1.5):
        expected = 0.5 * (1 + math.erf(x / math.sqrt(2)))
        assert abs((z < x).double().mean().item() - expected) < 0.002
    # different seeds, names and neighbouring elements are uncorrelated
    other_seed = engine.generate([("w", torch.zeros(n))], seed=2025)[0].double()
    other_name = engine.generate([("v", torch.zeros(n))], seed=2024)[0].double()
    for other in (other_seed, other_name, torch.roll(z, 1)):
        assert abs(torch.corrcoef(torch.stack([z, other]))[0, 1].item()) < tolerance


def test_rademacher_is_balanced_signs():
    z = RademacherCounterEngine(compile=False).generate([("w", torch.zeros(1 << 18))], seed=3)[0]
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 5 / math.sqrt(1 << 18)


def test_fused_replay_equals_one_seed_at_a_time_and_skips_zero_coefficients():
    engine = CounterEngine(compile=False)
    params = [("a.weight", torch.randn(300, generator=torch.Generator().manual_seed(0))), ("b.bias", torch.zeros(7))]
    seeds = [11, 12, 13, 14]
    coefficients = [0.5, 0.0, -1.25, 2e-3]
    expected = [p.clone() for _, p in params]
    for seed, coefficient in zip(seeds, coefficients, strict=True):
        for target, z in zip(expected, engine.generate(params, seed), strict=True):
            target.add_(z, alpha=coefficient)
    replayed = [(name, p.clone()) for name, p in params]
    assert engine.replay_(replayed, seeds, coefficients) == 3
    for (_, got), want in zip(replayed, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_weight_decay_and_dtypes():
    engine = CounterEngine(compile=False)
    w = torch.full((64,), 2.0)
    z = engine.generate([("w", torch.zeros(64))], seed=9)[0]
    engine.add_noise_([("w", w)], seed=9, alpha=0.5, beta=0.9)
    torch.testing.assert_close(w, 1.8 + 0.5 * z)
    half = torch.zeros(64, dtype=torch.bfloat16)
    engine.add_noise_([("w", half)], seed=9, alpha=1.0)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), z, rtol=1e-2, atol=1e-2)


def test_auto_compile_policy_and_environment(monkeypatch):
    small = [("w", torch.zeros(16))]
    engine = CounterEngine(compile_threshold=1000)
    assert engine.compile is None and not engine.kernels_for(small).compile
    assert engine.kernels_for([("w", torch.zeros(1000))]).compile
    monkeypatch.setenv("HF_FEDKSEED_COMPILE", "0")
    assert CounterEngine().compile is False
    monkeypatch.setenv("HF_FEDKSEED_COMPILE", "maybe")
    with pytest.raises(ValueError, match="HF_FEDKSEED_COMPILE"):
        CounterEngine()


@pytest.mark.slow
@pytest.mark.parametrize("engine_cls", [CounterEngine, RademacherCounterEngine])
def test_compiled_kernels_agree_with_eager(engine_cls):
    """One torch.compile per kernel serves every shape; compiled z matches the eager function (tens of s to compile)."""
    params = [("layers.0.weight", torch.zeros(70_001)), ("layers.0.bias", torch.zeros(33))]
    compiled, eager = engine_cls(compile=True), engine_cls(compile=False)
    # bit-identical on CPU: the only operation that differed, the square root, is correctly rounded on both paths
    for got, want in zip(compiled.generate(params, seed=5), eager.generate(params, seed=5), strict=True):
        assert torch.equal(got, want)
    seeds, coefficients = [1, 2, 3], [0.25, -0.5, 1.0]
    a = [(n, p.clone()) for n, p in params]
    b = [(n, p.clone()) for n, p in params]
    c = [(n, p.clone()) for n, p in params]
    compiled.replay_(a, seeds, coefficients)
    eager.replay_(b, seeds, coefficients)  # eager sums the seeds first: another rounding order
    for seed, coefficient in zip(seeds, coefficients, strict=True):  # the compiled CPU replay's order
        eager.add_noise_(c, seed, coefficient)
    for (_, x), (_, y), (_, w) in zip(a, b, c, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=4e-7)
        assert torch.equal(x, w)
    # one compiled kernel serves both shapes and, on CPU, the replay too
    assert set(compiled.compile_seconds) == {"perturb/cpu/float32"}


def test_version_1_stays_available_and_differs_from_2_only_in_the_eager_square_root():
    params = [("layers.0.weight", torch.zeros(200_003))]
    v1, v2 = CounterEngine(compile=False, version=1), CounterEngine(compile=False)
    assert (v1.version, v2.version) == (1, 2) and get_engine("counter", version=1).version == 1
    z1, z2 = v1.generate(params, seed=5)[0], v2.generate(params, seed=5)[0]
    differ = z1 != z2
    assert 0 < differ.float().mean() < 0.5  # eager float32 sqrt is 1 ulp off in places
    torch.testing.assert_close(z1, z2, rtol=0, atol=1e-6)
    subset = get_engine("counter@tensors=0.5", version=1)
    assert subset.version == 1 and subset.inner.version == 1
    with pytest.raises(ValueError, match="has no version 7; this hf_fedkseed knows \\[1, 2\\]"):
        get_engine("counter", version=7)
    with pytest.raises(ValueError, match="no version 2"):
        get_engine("counter-rademacher", version=2)


def test_a_version_1_checkpoint_resumes_with_version_1():
    from hf_fedkseed import KSeedZOOptimizer

    model = torch.nn.Linear(8, 4)
    old = KSeedZOOptimizer(model.named_parameters(), lr=1e-3, num_seeds=16, engine=CounterEngine(version=1))
    state = old.state_dict()
    assert state["kseed"]["engine_version"] == 1
    new = KSeedZOOptimizer(torch.nn.Linear(8, 4).named_parameters(), lr=1e-3, num_seeds=16)
    assert new.engine.version == 2
    new.load_state_dict(state)
    assert (new.engine.name, new.engine.version) == ("counter", 1)
    other = KSeedZOOptimizer(torch.nn.Linear(8, 4).named_parameters(), lr=1e-3, num_seeds=16, engine="torch-chunked")
    with pytest.raises(ValueError, match="saved with engine 'counter' v1"):
        other.load_state_dict(state)


@pytest.mark.slow
def test_prewarm_compiles_in_a_child_process_and_changes_no_value():
    """The child fills the on-disk cache; the first call waits for it and compiles from the cache."""
    params = [("layers.0.weight", torch.zeros(70_001))]
    engine = CounterEngine(compile=True)
    kernels = engine.kernels_for(params)
    kernels.compile_seconds.pop("perturb/cpu/float32", None)  # as in a fresh process
    kernels._compiled.clear()
    assert engine.prewarm(params) is True
    assert engine.prewarm(params) is False  # already under way
    assert engine.prewarm([("w", torch.zeros(8))]) is False  # one child per kernel, whatever the size
    got = engine.generate(params, seed=11)[0]
    assert "perturb/cpu/float32" in kernels.waited_for_prewarm_seconds
    assert "perturb/cpu/float32" in kernels.compile_seconds
    assert torch.equal(got, CounterEngine(compile=False).generate(params, seed=11)[0])
    assert engine.prewarm(params) is False  # compiled now
    assert CounterEngine(compile=False).prewarm(params) is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("engine_cls", [CounterEngine, RademacherCounterEngine])
def test_cuda_matches_cpu(engine_cls):
    params_cpu = [("w", torch.zeros(100_003))]
    params_gpu = [("w", torch.zeros(100_003, device="cuda"))]
    cpu = engine_cls(compile=False).generate(params_cpu, seed=1)[0]
    gpu = engine_cls(compile=True).generate(params_gpu, seed=1)[0].cpu()
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=0 if engine_cls is RademacherCounterEngine else 1e-5)
