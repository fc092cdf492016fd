"""Counter-based z: element i of (seed, parameter) is a pure function of a hash of i, as torch ops under torch.compile.

z[i] = F(key, i), where `key` is two 32-bit words derived from (seed, parameter name) and i is the element's index
in the flattened parameter. Any slice of any parameter can therefore be generated on its own, in any order, by any
number of threads, and one compiled kernel serves every parameter (the length is a dynamic dimension).

The function, written with 32-bit integer operations (wrapping multiplication, so the uniforms are bit-exact on every
backend) and float32 adds, multiplies, one divide and one square root:

    a  = mix32((i_lo * 0x9E3779B9) ^ (k0 + i_hi * 0x85EBCA6B))       # i = i_hi * 2**32 + i_lo
    b  = mix32(a ^ k1)                                                 # mix32: Wellons' "lowbias32"
    u1 = ((a >>> 8) + 1) * 2**-24    in (0, 1]                          # 24-bit uniforms
    u2 =  (b >>> 8)      * 2**-24    in [0, 1)
    gaussian:   z = sqrt(-2 ln u1) * cos(2 pi u2)                       # Box-Muller, |z| <= 5.77
    rademacher: z = -1 if a < 0 else +1

The cyclic-shift engine (`gaussian-shift`, `hf_fedkseed.perturbation.shift`) evaluates the same Gaussian at a
shifted counter: with blocks of B = 2**16 elements, element i reads `(i - i mod B) + ((i + o) mod B)`, where the
block's offset o is the top 16 bits of `((i // B) * 0x9E3779B9 ^ s) * 0x7FEB352D` and the key word s comes from the
seed (k0, k1 then key the base sequence by the parameter alone; a mask word of 0 turns the shift off).

ln and cos are evaluated by short polynomials written as torch operations (ln: atanh series on the mantissa, error
< 1e-7; cos: Taylor series to degree 12 after reduction to [0, pi/2], error < 2e-7), not by the platform's libm, so
the values do not depend on the libm a backend links. The square root is the correctly rounded float32 root on every
CPU path (version 2 of the Gaussian engine): Inductor's compiled C++ `sqrt` rounds correctly, while eager PyTorch's
vectorised float32 `sqrt` is one unit in the last place off for about 17% of inputs (measured over 2**20 values, the
only operation where the two paths differed), so the eager path takes it in float64 and rounds once. On CPU the eager
and the compiled kernels therefore produce bit-identical z (tested): a party without a working compiler, or one whose
kernel is still compiling, computes the same model. Version 1 (`gaussian/v1`, the platform's float32 root eagerly)
stays available to replay old checkpoints and deltas; its compiled values equal version 2's. CUDA's values are
expected within 1e-5 of CPU's. Rademacher values are identical everywhere.
"""

from __future__ import annotations

import atexit
import logging
import math
import subprocess
import sys
import threading
import time
from typing import ClassVar

import torch

from .hashing import to_int32

logger = logging.getLogger(__name__)

__all__ = [
    "DISTRIBUTIONS",
    "HI_MULT",
    "KEY_WORDS",
    "SHIFT_BITS",
    "SHIFT_BLOCK",
    "SHIFT_MASK",
    "CounterKernels",
    "block_offsets",
    "gaussian_from_counter",
    "gaussian_shifted",
    "rademacher_from_counter",
    "shifted_counters",
]

DISTRIBUTIONS = ("gaussian", "rademacher")


HI_MULT = 0x85EBCA6B  # the multiplier of i_hi above: callers fold `i_hi * HI_MULT` into k0 (Python ints)
SHIFT_BITS = 16  # the cyclic-shift engine's blocks: 2**16 elements
SHIFT_BLOCK = 1 << SHIFT_BITS
SHIFT_MASK = SHIFT_BLOCK - 1
_GOLDEN = to_int32(0x9E3779B9)
_MIX_A = to_int32(0x7FEB352D)
_MIX_B = to_int32(0x846CA68B)
_LN2 = math.log(2.0)
_TWO_PI = 2.0 * math.pi


def _srl(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int32 values (torch's `>>` is arithmetic)."""
    return (x >> shift) & ((1 << (32 - shift)) - 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32: a bijective 32-bit hash with near-ideal avalanche (bias 0.17)."""
    x = x ^ _srl(x, 16)
    x = x * _MIX_A
    x = x ^ _srl(x, 15)
    x = x * _MIX_B
    return x ^ _srl(x, 16)


def _hash(index_lo: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = _mix32((index_lo * _GOLDEN) ^ k0)
    return a, _mix32(a ^ k1)


def _ln_unit(u: torch.Tensor) -> torch.Tensor:
    """ln(u) for float32 u in (0, 1]: exponent from the bits, atanh series on the mantissa reduced to [0.707, 1.414)."""
    bits = u.view(torch.int32)
    exponent = (bits >> 23) - 127
    mantissa = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)  # [1, 2)
    high = mantissa > 1.4142135
    mantissa = mantissa * (1.0 - 0.5 * high.to(torch.float32))  # halved when high: exact (a power of two)
    exponent = exponent + high.to(torch.int32)
    s = (mantissa - 1.0) / (mantissa + 1.0)  # |s| < 0.172, so the series below is exact to float32
    s2 = s * s
    series = 2.0 + s2 * (0.6666666666666666 + s2 * (0.4 + s2 * (0.2857142857142857 + s2 * 0.2222222222222222)))
    return exponent.to(torch.float32) * _LN2 + s * series


def _cos_two_pi(bits24: torch.Tensor) -> torch.Tensor:
    """cos(2 pi m / 2**24) for 24-bit integers m, by symmetry reduced to an angle in [0, pi/2] and a Taylor series."""
    t = bits24.to(torch.float32) * (2.0**-24) - 0.5  # cos(2 pi u) = -cos(2 pi t), t in [-0.5, 0.5) exactly
    t = torch.abs(t)
    far = t > 0.25
    x = (0.25 - torch.abs(t - 0.25)) * _TWO_PI  # t, or 0.5 - t when far: [0, pi/2] (exact: t is a multiple of 2**-24)
    x2 = x * x
    # Taylor coefficients 1/2!, 1/4!, ..., 1/12! (the next term is below 6e-10 on [0, pi/2])
    c = -2.755731922398589e-07 + x2 * 2.08767569878681e-09
    c = 2.48015873015873e-05 + x2 * c
    c = -1.388888888888889e-03 + x2 * c
    c = 4.1666666666666664e-02 + x2 * c
    c = 1.0 + x2 * (-0.5 + x2 * c)
    return c * (2.0 * far.to(torch.float32) - 1.0)  # -c, or +c when far (cos(pi - x) = -cos x, and the -0.5 shift)


def _radius(a: torch.Tensor) -> torch.Tensor:
    """-2 ln(u1) for the 24-bit uniform u1 in (0, 1] taken from the hash word `a` (Box-Muller's squared radius)."""
    u1 = (_srl(a, 8) + 1).to(torch.float32) * (2.0**-24)
    return -2.0 * _ln_unit(u1)


def gaussian_from_counter(index_lo: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 values for int32 counters `index_lo` under key (k0, k1) (tensors, broadcastable).

    The square root is the correctly rounded float32 one, taken in float64 and rounded once: eagerly, this is what
    Inductor's compiled `sqrt` (IEEE, in `_COMPILED`) gives on CPU, at no cost to the compiled kernel.
    """
    a, b = _hash(index_lo, k0, k1)
    radius = torch.sqrt(_radius(a).to(torch.float64)).to(torch.float32)
    return radius * _cos_two_pi(_srl(b, 8))


def gaussian_from_counter_v1(index_lo: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor) -> torch.Tensor:
    """Version 1 of `gaussian_from_counter`: the platform's float32 `sqrt` (eager CPU values may differ by 1 ulp).

    Compiled by Inductor for CPU, this is bit-identical to version 2 (its `sqrt` is correctly rounded), so it is
    the function both versions compile.
    """
    a, b = _hash(index_lo, k0, k1)
    return torch.sqrt(_radius(a)) * _cos_two_pi(_srl(b, 8))


def rademacher_from_counter(index_lo: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor) -> torch.Tensor:
    """+1/-1 float32 values for int32 counters `index_lo` under key (k0, k1): the sign bit of the first hash."""
    a = _mix32((index_lo * _GOLDEN) ^ k0)
    return torch.where(a < 0, -1.0, 1.0)


def block_offsets(block: torch.Tensor, s: torch.Tensor, mask: torch.Tensor | int) -> torch.Tensor:
    """The cyclic offsets in `[0, SHIFT_BLOCK)` of blocks `block` (int32) for the direction with offset word `s`:
    the top `SHIFT_BITS` bits of the multiplicative hash `((block * golden) ^ s) * 0x7FEB352D`, ANDed with `mask`
    (`SHIFT_MASK`, or 0 for no shift).

    `s` is a well-mixed word per (seed, parameter), so in any one block the offsets of different seeds are uniform
    and independent; a full `mix32` here measured 22% slower per pass against 8% for this hash."""
    return _srl(((block * _GOLDEN) ^ s) * _MIX_A, 32 - SHIFT_BITS) & mask


def shifted_counters(index_lo: torch.Tensor, s: torch.Tensor, mask: torch.Tensor | int) -> torch.Tensor:
    """The counter of u that element `index_lo` of a shifted direction reads: same block, position plus the block's
    offset, modulo `SHIFT_BLOCK` (a cyclic shift within each block)."""
    offset = block_offsets(_srl(index_lo, SHIFT_BITS), s, mask)
    return (index_lo & ~SHIFT_MASK) | ((index_lo + offset) & SHIFT_MASK)


def gaussian_shifted(index_lo, k0, k1, s, mask) -> torch.Tensor:
    """z of the cyclic-shift engine: the Gaussian of `u = gaussian_from_counter(., k0, k1)` at the shifted counter.

    (k0, k1) key u by the parameter alone; `s` keys the per-block offsets by the seed and the parameter; `mask` is
    `SHIFT_MASK` for a direction and 0 for u itself (what the FFT replay generates).
    """
    return gaussian_from_counter(shifted_counters(index_lo, s, mask), k0, k1)


def _gaussian_shifted_compiled(index_lo, k0, k1, s, mask) -> torch.Tensor:
    return gaussian_from_counter_v1(shifted_counters(index_lo, s, mask), k0, k1)  # see `_COMPILED`


_SAMPLERS = {
    "gaussian": gaussian_from_counter,
    "gaussian/v1": gaussian_from_counter_v1,
    "rademacher": rademacher_from_counter,
    "gaussian-shift": gaussian_shifted,
}
# What torch.compile traces: the float32 root, correctly rounded in compiled code (the float64 one costs ~15% there).
_COMPILED = {**_SAMPLERS, "gaussian": gaussian_from_counter_v1, "gaussian-shift": _gaussian_shifted_compiled}
# How many int32 key words each sampler takes after the counters (k0, k1, and for the shift engine s and mask).
KEY_WORDS = {sampler: 4 if sampler.startswith("gaussian-shift") else 2 for sampler in _SAMPLERS}


def _make_perturb(sample, words: int):
    def perturb_(flat: torch.Tensor, keys: torch.Tensor, scalars: torch.Tensor) -> None:
        """In place: `flat <- beta * flat + alpha * z` (scalars = [alpha, beta]; keys = [first counter, *words])."""
        counters = keys[0] + torch.arange(flat.shape[0], dtype=torch.int32, device=flat.device)
        z = sample(counters, *[keys[w] for w in range(1, words + 1)])
        flat.copy_(scalars[1] * flat.to(torch.float32) + scalars[0] * z)

    return perturb_


def _make_replay(sample, words: int):
    def replay_(flat: torch.Tensor, first: torch.Tensor, seed_keys: torch.Tensor, coefficients: torch.Tensor) -> None:
        """In place: `flat <- flat + sum_j coefficients[j] * z_j`, seed_keys[j] = key words, in one pass over `flat`."""
        counters = first + torch.arange(flat.shape[0], dtype=torch.int32, device=flat.device)
        z = sample(counters[None, :], *[seed_keys[:, w : w + 1] for w in range(words)])
        flat.copy_(flat.to(torch.float32) + (z * coefficients[:, None]).sum(0))

    return replay_


class CounterKernels:
    """The compiled (or eager) perturb and replay functions of one sampler, shared by every engine instance.

    Compilation happens on first use, per device type and dtype; `compile_seconds` records how long the first
    compiled call of each kernel took (with a cold Inductor cache, one to four minutes on 2 cores; from a warm cache,
    a few seconds). If compilation fails (no C++ compiler, an unsupported backend), a warning is logged and the eager
    functions are used from then on: on CPU they give bit-identical values (see the module docstring).

    `prewarm(...)` starts that compilation early, in a child process that fills Inductor's on-disk cache, so that it
    overlaps other work (the pipeline starts it when the model has loaded, before the base model's evaluation). The
    first call then waits for the child, if it is still running, and compiles from the warm cache.
    """

    _instances: ClassVar[dict[tuple[str, bool], CounterKernels]] = {}
    _lock = threading.Lock()

    def __init__(self, sampler: str, compile: bool):
        sample = _SAMPLERS[sampler]
        self.sample = sample  # (counters, k0, k1) -> z, broadcasting: the eager path calls it directly
        self.sampler = sampler
        self.distribution = sampler.split("/")[0]
        self.key_words = words = KEY_WORDS[sampler]
        self.eager_perturb = _make_perturb(sample, words)
        self.eager_replay = _make_replay(sample, words)
        self._to_compile = {
            "perturb": _make_perturb(_COMPILED[sampler], words),
            "replay": _make_replay(_COMPILED[sampler], words),
        }
        self.compile = compile
        self.compile_seconds: dict[str, float] = {}
        self.waited_for_prewarm_seconds: dict[str, float] = {}
        self._compiled: dict[str, object] = {}
        self._prewarming: dict[str, subprocess.Popen] = {}
        self._failed = False

    @classmethod
    def get(cls, sampler: str, compile: bool) -> CounterKernels:
        if sampler not in _SAMPLERS:
            raise ValueError(f"Unknown `distribution` {sampler!r}; choose one of {list(DISTRIBUTIONS)}.")
        with cls._lock:
            key = (sampler, compile)
            if key not in cls._instances:
                cls._instances[key] = cls(sampler, compile)
            return cls._instances[key]

    def _compiled_fn(self, kind: str):
        fn = self._compiled.get(kind)
        if fn is None:
            # Without the raised threshold Inductor would materialise the [seeds, elements] z of a replay in memory.
            fn = self._compiled[kind] = torch.compile(
                self._to_compile[kind], dynamic=True, fullgraph=True, options={"realize_opcount_threshold": 100_000}
            )
        return fn

    @staticmethod
    def _label(kind: str, device: torch.device | str, dtype: torch.dtype) -> str:
        return f"{kind}/{torch.device(device).type}/{dtype}".replace("torch.", "")

    def prewarm(self, dtype: torch.dtype, numel: int) -> bool:
        """Compile the CPU perturb kernel (what CPU steps and replays run) for `dtype` in a child process, now, into
        Inductor's on-disk cache.

        Args:
            dtype: the parameters' dtype.
            numel: the size of the first call this process will make (Inductor's generated code depends on it).

        Returns:
            True if a child was started; False if the kernel is compiled, being prewarmed, or compilation is off.
        """
        label = self._label("perturb", "cpu", dtype)
        if not self.compile or self._failed or label in self.compile_seconds or label in self._prewarming:
            return False
        command = [sys.executable, "-m", "hf_fedkseed.perturbation.warm", self.sampler, str(dtype), str(numel)]
        try:
            child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as error:  # no child process: the first call compiles, as without prewarming
            logger.info("Could not start the background compilation (%s); the first step compiles.", error)
            return False
        self._prewarming[label] = child
        atexit.register(_stop, child)  # a process that ends before its first step leaves no compiler running
        logger.info("Compiling the %s kernel in a background process.", label)
        return True

    def _wait_for_prewarm(self, label: str) -> None:
        child = self._prewarming.pop(label, None)
        if child is None:
            return
        started = time.perf_counter()
        if child.poll() is None:
            logger.info("Waiting for the background compilation of the %s kernel.", label)
        _, error = child.communicate()
        self.waited_for_prewarm_seconds[label] = time.perf_counter() - started
        if child.returncode != 0:
            message = error.decode(errors="replace")[-300:]
            logger.info("The background compilation failed; compiling here (%s).", message)

    def _run(self, kind: str, *args) -> None:
        eager = self.eager_perturb if kind == "perturb" else self.eager_replay
        if not self.compile or self._failed:
            eager(*args)
            return
        label = self._label(kind, args[0].device, args[0].dtype)
        first = label not in self.compile_seconds
        if first:
            self._wait_for_prewarm(label)
        started = time.perf_counter()
        # detach() drops the view's link to its base (same storage), so the guards do not depend on the base's shape
        # (a 1-D parameter's view, a slice of a matrix, a row of the FFT replay's buffer all reuse one compilation)
        args = (args[0].detach(), *args[1:])
        try:
            self._compiled_fn(kind)(*args)
        except Exception as error:  # compilation problems surface as many exception types
            self._failed = True
            logger.warning(
                "torch.compile of the counter-based perturbation kernels failed (%s: %s); using eager PyTorch "
                "(same values on CPU, slower). Install a C++ compiler (CPU) or Triton (GPU) to get the compiled "
                "kernels.",
                type(error).__name__,
                error,
            )
            eager(*args)
            return
        if first:
            self.compile_seconds[label] = time.perf_counter() - started
            waited = self.waited_for_prewarm_seconds.get(label)
            logger.info(
                "The %s kernel is ready: %.1f s to compile in this process%s.",
                label,
                self.compile_seconds[label],
                "" if waited is None else f", after waiting {waited:.1f} s for the background compilation",
            )

    def perturb_(self, flat: torch.Tensor, keys: torch.Tensor, scalars: torch.Tensor) -> None:
        self._run("perturb", flat, keys, scalars)

    def replay_(self, flat, first, seed_keys, coefficients) -> None:
        self._run("replay", flat, first, seed_keys, coefficients)


def _stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()


def warm(sampler: str, dtype: str, numel: str) -> None:
    """Compile the perturb kernel for a first call of `numel` elements: fills Inductor's on-disk cache (the child's
    job)."""
    kernels = CounterKernels(sampler, compile=True)
    flat = torch.zeros(int(numel), dtype=getattr(torch, dtype.replace("torch.", "")))
    kernels.perturb_(flat, torch.arange(1 + kernels.key_words, dtype=torch.int32), torch.tensor([0.0, 1.0]))
    if kernels._failed:
        raise SystemExit(1)
