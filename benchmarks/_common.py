"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`, so this folder is on sys.path)."""

from __future__ import annotations

import math
import platform
import statistics
import time


def cpu_name() -> str:
    """The CPU model for the report: /proc/cpuinfo's `model name`, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def seeded_llama(seed: int, **config):
    """A float32 Llama built from `LlamaConfig(**config)` with weights seeded by `seed`, the global RNG untouched.

    torch and transformers are imported here, not at module level: zo_step.py spawns its memory children before
    it imports torch.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):  # transformers initialises weights from the global RNG
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (std 0 for one value, NaN for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA), so that a timer measures it."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: str = "cpu") -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def round_robin(workloads: dict, rounds: int, warmup: int, device: str = "cpu") -> dict[str, list[float]]:
    """Seconds of each call of every workload, run in turn `rounds` times so that all of them see the same machine
    state; the first `warmup` rounds are not kept."""
    samples: dict[str, list[float]] = {name: [] for name in workloads}
    for round_index in range(rounds):
        for name, workload in workloads.items():
            synchronize(device)
            start = time.perf_counter()
            workload()
            synchronize(device)
            if round_index >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def replay_slice(model, budget: int) -> tuple[list, int]:
    """The catch-up benchmarks' slice of a model: whole parameters, in order, until `budget` elements (a contiguous
    slice of the first parameter if it alone is larger), as `(name, tensor)` pairs, and its element count."""
    named, total = [], 0
    for name, param in model.named_parameters():
        if total + param.numel() > budget and named:
            break
        named.append((name, param.detach()))
        total += param.numel()
    if total > budget:  # the first parameter alone is larger: take a contiguous slice of it
        named, total = [(named[0][0], named[0][1].view(-1)[:budget])], budget
    return named, total


def replay_pairs(count: int, seed: int) -> tuple[list[int], list[float]]:
    """`count` seeds in the official range and small coefficients, from a private generator."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    seeds = torch.randint(1, 100_000_000_000, (count,), generator=generator).tolist()
    return seeds, (torch.randn(count, generator=generator, dtype=torch.float64) * 1e-7).tolist()


def naive_replay_seconds_per_seed(named, seeds, coefficients, repeats: int, device: str = "cpu") -> float:
    """The official client's catch-up (`manual_seed`, `torch.normal` and an update per seed, via
    `hf_fedkseed.reference.ReferenceZO`) on a copy of `named`, timed over these seeds, per seed."""
    import torch

    from hf_fedkseed.reference import ReferenceZO

    class _Slice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for index, (_, tensor) in enumerate(named):
                self.register_parameter(f"p{index}", torch.nn.Parameter(tensor.clone(), requires_grad=True))

    reference = ReferenceZO(_Slice(), lr=1.0, eps=1e-3)
    rng_devices = list(range(torch.cuda.device_count())) if device == "cuda" else []

    def naive_replay() -> None:
        with torch.random.fork_rng(devices=rng_devices):
            for seed, coefficient in zip(seeds, coefficients, strict=True):
                reference._update(seed, coefficient, 1.0)

    return timed(naive_replay, repeats, device) / len(seeds)
