"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`, so this folder is on sys.path)."""

from __future__ import annotations

import math
import platform
import statistics


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
