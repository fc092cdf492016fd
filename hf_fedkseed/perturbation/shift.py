"""The cyclic-shift engine (`counter-shift`): per-block cyclic shifts of one sequence, replayed by FFT whatever K is."""

from __future__ import annotations

import numpy as np
import torch

from .base import NamedTensors
from .counter import CounterEngine
from .counter_rng import HI_MULT, SHIFT_BITS, SHIFT_BLOCK, SHIFT_MASK, block_offsets
from .hashing import MASK64, name_key, splitmix64, splitmix64_array, to_int32

__all__ = ["ShiftCounterEngine"]

_BASE_SALT = 0x51F7_5EED_0F_B10C5  # keys u, the sequence every direction of a parameter shifts


class ShiftCounterEngine(CounterEngine):
    """Directions that are cyclic shifts of one counter-generated Gaussian sequence per block of `2**16` elements.

    Each parameter, flattened, is cut into blocks of B = `SHIFT_BLOCK` = 65,536 elements. Block b has a fixed
    sequence `u_b(t) = gaussian_from_counter(b * B + t, key(name))`, t in [0, B), that depends on the parameter alone;
    direction `seed` reads it at a per-block offset:

        z_seed(b * B + t) = u_b((t + o_seed(b)) mod B),   o_seed(b) = top 16 bits of ((b * golden) ^ s(seed, name)) * m

    (`counter_rng.shifted_counters`). So:

    - every z is exactly N(0, I): a cyclic shift of i.i.d. normals is i.i.d. normals; two directions are
      uncorrelated except in a block where their offsets coincide (probability 1/B), and their inner product per
      block is u's autocorrelation at the lag `o_j(b) - o_k(b)`, a fresh lag in every block (see "Offsets");
    - a step costs what a `counter` step costs: the same hash and Box-Muller at a shifted counter, plus one 32-bit
      multiply for the block's offset, in the same fused kernel (`add_noise_` is `CounterEngine`'s);
    - a replay of many seeds, `sum_j c_j z_j`, is in each block the cross-correlation of u_b with the K-sparse filter
      `f_b(o) = sum_{j: o_j(b) = o} c_j`, computed as the circular convolution with `f_b(-o)`:
      `irfft(rfft(u_b) * rfft(f_b(-o)))`, one generation of u and three FFTs of size B per block, O(d log B) whatever
      the number of seeds (`replay_` with at least `fft_min_seeds` seeds; fewer take one fused pass per seed, as
      `counter` does).

    Offsets. They are hashed per block rather than fixed per seed: a fixed offset per seed would make two seeds
    shifts of each other by the same lag in every block, so a gradient correlated at that lag (neighbouring weights
    of a row, rows one stride apart) would correlate their estimates everywhere. With per-block offsets, two seeds
    share an offset in a given block with probability 1/B (1.5e-5) and a lag below 4 with probability 7/B, so the
    overlap of two directions is about 1/B of their length, below the 1/sqrt(d) sample correlation of independent
    Gaussians for any d under 4e9, and no lag repeats systematically. Offsets need not be distinct within a block:
    with K = 4096 seeds about 128 of the 8.4 million pairs share a block's offset.

    Block size. B = 2**16 makes the filter's collisions rare for K up to a few thousand (K**2 / 2B pairs per block),
    keeps an FFT's batch of 16 blocks in 20 MB of scratch, and divides every kernel span, so a block never crosses a
    call; FFT cost grows with log B only. A parameter smaller than B uses the first elements of its single block.

    Values. `add_noise_` is bit-identical between the eager and the compiled CPU kernels (the `counter` v2 rule).
    The FFT replay differs from the per-seed sum by float32 rounding (about 1e-7 of the replayed values); every party
    replays through this same function, so agreement on one device stays bit for bit.

    Args:
        fft_min_seeds: the fewest seeds replayed by FFT; fewer take one fused pass per seed (cheaper below ~5).
        fft_blocks: how many blocks one FFT batch transforms (bounds the scratch memory: about 20 bytes per element).
        **kwargs: as `CounterEngine` (chunk_size, compile, compile_threshold, version).
    """

    name = "counter-shift"
    VERSIONS = (1,)
    version = 1
    distribution = "gaussian-shift"
    block_size = SHIFT_BLOCK

    def __init__(self, fft_min_seeds: int = 8, fft_blocks: int = 16, **kwargs):
        super().__init__(**kwargs)
        if self.chunk_size % SHIFT_BLOCK:
            raise ValueError(f"`chunk_size` must be a multiple of {SHIFT_BLOCK} (the block) for {self.name!r}.")
        if fft_min_seeds < 1 or fft_blocks < 1:
            raise ValueError("`fft_min_seeds` and `fft_blocks` must be positive.")
        self.fft_min_seeds = fft_min_seeds
        self.fft_blocks = fft_blocks

    @staticmethod
    def base_key(name: str) -> tuple[int, int]:
        """The two 32-bit words that key u, the parameter's base sequence (no seed in it)."""
        mixed = splitmix64(splitmix64(_BASE_SALT ^ name_key(name)))
        return mixed & 0xFFFFFFFF, mixed >> 32

    def words(self, seed: int, name: str, high: int) -> tuple[int, ...]:
        """`(k0, k1, s, SHIFT_MASK)`: u's key (with the index's high word folded in, as `counter` does), the seed's
        offset word `s` (the low word of `counter`'s key for this seed and name, the high word folded in too)."""
        k0, k1 = self.base_key(name)
        s = self.key(seed, name)[0]
        return to_int32(k0 + high * HI_MULT), to_int32(k1), to_int32(s + high * HI_MULT), SHIFT_MASK

    @staticmethod
    def offset_words(seeds: np.ndarray, name: str) -> np.ndarray:
        """`s` (as uint32 in int64) of many seeds at once: `words(seed, name, 0)[2]`, vectorised."""
        mixed = splitmix64_array(splitmix64_array(seeds ^ np.uint64(name_key(name))))
        return (mixed & np.uint64(0xFFFFFFFF)).astype(np.int64)

    def scratch_bytes(self, params: NamedTensors) -> int:
        # u, its spectrum, the filter and its spectrum, the result: about 20 bytes per element of one FFT batch
        return 20 * self.fft_blocks * SHIFT_BLOCK

    @torch.no_grad()
    def replay_(self, params, seeds, coefficients):
        """Add `sum_j coefficients[j] * z(seeds[j])` to `params` in place: by FFT with at least `fft_min_seeds`
        seeds (non-zero coefficients), else one fused pass per seed.

        Returns:
            The number of seeds actually applied.
        """
        pairs = [(int(s), float(c)) for s, c in zip(seeds, coefficients, strict=True) if float(c) != 0.0]
        if len(pairs) < self.fft_min_seeds:
            return super().replay_(params, [s for s, _ in pairs], [c for _, c in pairs])
        seed_array = np.array([s & MASK64 for s, _ in pairs], dtype=np.uint64)
        words_by_name = {name: self.offset_words(seed_array, name) for name, _ in params}
        rows = self._rows(params)
        device = rows[0][1].device if rows else torch.device("cpu")
        scratch = torch.empty(2, min(len(rows), self.fft_blocks), SHIFT_BLOCK, device=device)  # u and the filters
        coefs = torch.tensor([c for _, c in pairs], dtype=torch.float32, device=device)
        kernels = self.kernels_for(params)
        for first in range(0, len(rows), self.fft_blocks):
            batch = rows[first : first + self.fft_blocks]
            self._replay_rows(kernels, batch, words_by_name, coefs, scratch[:, : len(batch)])
        return len(pairs)

    def _rows(self, params) -> list[tuple]:
        """One row per block of every parameter: (name, flat slice, first counter (low word), high word)."""
        rows = []
        for name, param in params:
            flat = self._flat(name, param)
            for start in range(0, flat.numel(), SHIFT_BLOCK):
                piece = flat[start : start + SHIFT_BLOCK]
                rows.append((name, piece, start & 0xFFFFFFFF, start >> 32))
        return rows

    def _replay_rows(self, kernels, rows, words_by_name: dict, coefs: torch.Tensor, scratch: torch.Tensor) -> None:
        """The FFT replay of a batch of block rows: u by the kernel (mask 0), the filters by scatter, three FFTs.

        The filter is scattered at `-o mod B`, which turns the cross-correlation `sum_o f(o) u(t + o)` into a
        circular convolution: `irfft(rfft(u) * rfft(reversed f))`.
        """
        u, filters = scratch[0], scratch[1]
        u.zero_()
        filters.zero_()
        device = u.device
        unit = torch.tensor([1.0, 0.0], dtype=torch.float32, device=device)  # u <- 0 * u + 1 * z
        run = 0
        for row in range(1, len(rows) + 1):  # one kernel call per run of consecutive blocks of one parameter
            name, _, start, high = rows[run]
            if row < len(rows) and (rows[row][0], *rows[row][2:]) == (name, start + (row - run) * SHIFT_BLOCK, high):
                continue
            k0, k1 = self.base_key(name)
            keys = torch.tensor([to_int32(start), to_int32(k0 + high * HI_MULT), to_int32(k1), 0, 0], dtype=torch.int32)
            kernels.perturb_(u[run:row].view(-1), keys.to(device), unit)
            run = row
        words = np.stack([(words_by_name[name] + high * HI_MULT) & 0xFFFFFFFF for name, _, _, high in rows], axis=1)
        s = torch.from_numpy(words.astype(np.uint32).view(np.int32)).to(device)  # [seeds, rows]
        block = torch.tensor([start >> SHIFT_BITS for _, _, start, _ in rows], dtype=torch.int32, device=device)
        reversed_offsets = (-block_offsets(block[None, :], s, SHIFT_MASK)) & SHIFT_MASK
        filters.scatter_add_(1, reversed_offsets.T.to(torch.int64), coefs[None, :].expand(len(rows), -1))
        spectrum = torch.fft.rfft(u, dim=1)
        spectrum.mul_(torch.fft.rfft(filters, dim=1))
        delta = torch.fft.irfft(spectrum, n=SHIFT_BLOCK, dim=1)
        for row, (_, piece, _, _) in enumerate(rows):
            if piece.dtype == torch.float32:
                piece.add_(delta[row, : piece.numel()])
            else:
                piece.copy_(piece.to(torch.float32) + delta[row, : piece.numel()])
