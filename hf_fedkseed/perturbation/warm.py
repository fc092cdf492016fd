"""`python -m hf_fedkseed.perturbation.warm SAMPLER DTYPE NUMEL`: compile the perturb kernel into the cache.

Started by `CounterKernels.prewarm` in a child process, so that a cold Inductor compilation overlaps other work (the
base model's evaluation) instead of delaying the first ZO step; see `hf_fedkseed.perturbation.counter_rng`.
"""

from __future__ import annotations

import sys

from .counter_rng import warm

__all__: list[str] = []  # run as `python -m`: nothing to import

if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit("usage: python -m hf_fedkseed.perturbation.warm SAMPLER DTYPE NUMEL")
    warm(*sys.argv[1:])
