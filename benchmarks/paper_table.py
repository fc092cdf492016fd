"""The paper's comparison in miniature: FedKSeed, FedKSeed-Pro, FedZO, FedIT and FedAvg from one pretrained base."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import cpu_name

# torch and transformers are imported only inside the child runs (and in --in-process mode): the parent spawns one
# fresh interpreter per run, so each run's `ru_maxrss` is its own peak, not the parent's (see zo_step.py).

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fedkseed", "fedkseed_pro", "fedzo", "fedit", "fedavg")
OPTIONAL_METHODS = ("fedit_4bit",)  # FedIT on a 4-bit NF4 base: run when bitsandbytes has a backend, else skipped
LABELS = {
    "fedkseed": "FedKSeed",
    "fedkseed_pro": "FedKSeed-Pro",
    "fedzo": "FedZO (fresh seeds)",
    "fedit": "FedIT (LoRA r=8)",
    "fedit_4bit": "FedIT, 4-bit base",
    "fedavg": "FedAvg (backprop)",
}
MIB = 1 << 20

# Sizes. `full`: the miniature table (about 40 minutes on 2 CPU cores); `medium`: a shorter check of the same
# table; `quick`: a smoke test of every code path.
PROFILES: dict[str, dict[str, Any]] = {
    "full": dict(rounds=6, local_steps=20, eval_samples=96, max_new_tokens=12, seeds=[0, 1, 2],
                 ablation_k=[16, 256, 1024, 4096], ablation_seeds=[0], pretrain_steps=400),
    "medium": dict(rounds=3, local_steps=10, eval_samples=24, max_new_tokens=8, seeds=[0, 1, 2],
                   ablation_k=[16, 1024, 4096], ablation_seeds=[0], pretrain_steps=400),
    "quick": dict(rounds=1, local_steps=2, eval_samples=4, max_new_tokens=4, seeds=[0],
                  ablation_k=[16], ablation_seeds=[0], pretrain_steps=4),
}  # fmt: skip

# Per-method recipe overrides on top of recipes/quickstart.yaml (one client per training task, 3 per round).
# ZO steps use the recipe's eps with a learning rate that the pretrained base tolerates; first-order methods clip
# gradients at 1.0 as FedAvg/FedIT implementations do; LoRA takes a larger rate than full fine-tuning.
ZO = ["--zo_eps", "1e-3", "--learning_rate", "1e-4"]
RECIPE_K = 1024  # recipes/quickstart.yaml's num_seeds: the ablation's K=1024 runs are the FedKSeed runs
METHOD_OVERRIDES = {
    "fedkseed": ["--method", "fedkseed", "--pro", "false", "--num_seeds", str(RECIPE_K), *ZO],
    "fedkseed_pro": ["--method", "fedkseed_pro", "--pro", "true", "--num_seeds", str(RECIPE_K), *ZO],
    "fedzo": ["--method", "fedzo", "--pro", "false", *ZO],
    "fedit": ["--method", "fedit", "--pro", "false", "--learning_rate", "3e-3", "--max_grad_norm", "1.0"],
    "fedit_4bit": [
        "--method", "fedit", "--pro", "false", "--learning_rate", "3e-3", "--max_grad_norm", "1.0",
        "--load_in_4bit", "true",
    ],
    "fedavg": ["--method", "fedavg", "--pro", "false", "--learning_rate", "1e-3", "--max_grad_norm", "1.0"],
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke test: every method, 1 round of 2 steps (~2 min)")
    size.add_argument("--medium", action="store_true", help="a shorter run of the same table (~12 min)")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: outputs/paper_table[_quick|_medium]")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml", help="the base recipe")
    parser.add_argument(
        "--base",
        default="pretrained",
        help="`pretrained`: pretrain (or reuse) the miniature base in OUTPUT/base; else a model path or Hub id "
        "(the full-size comparison: e.g. datajuicer/LLaMA-1B-dj-refine-150B with --recipe recipes/"
        "natural_instructions.yaml)",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer for --base other than `pretrained`")
    parser.add_argument("--methods", nargs="+", default=None, help=f"subset of {METHODS + OPTIONAL_METHODS}")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="training seeds (default 0 1 2)")
    parser.add_argument("--ablation-k", nargs="*", type=int, default=None, help="K values of the FedKSeed ablation")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--local-steps", type=int, default=None)
    parser.add_argument("--eval-samples", type=int, default=None)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="recipe overrides for every run")
    parser.add_argument("--in-process", action="store_true", help="run every job in this process (tests; no memory)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "medium" if args.medium else "full"]
    args.profile = "quick" if args.quick else "medium" if args.medium else "full"
    for key in ("rounds", "local_steps", "eval_samples", "seeds"):
        if getattr(args, key) is None:
            setattr(args, key, profile[key])
    args.max_new_tokens = profile["max_new_tokens"]
    args.pretrain_steps = profile["pretrain_steps"]
    args.ablation_seeds = profile["ablation_seeds"]
    if args.ablation_k is None:
        args.ablation_k = profile["ablation_k"]
    if args.methods is None:
        args.methods = list(METHODS) + list(OPTIONAL_METHODS)
    unknown = sorted(set(args.methods) - set(METHODS + OPTIONAL_METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {METHODS + OPTIONAL_METHODS}")
    if args.output_dir is None:
        suffix = "" if args.profile == "full" else f"_{args.profile}"
        args.output_dir = ROOT / "outputs" / f"paper_table{suffix}"
    return args


# ---------------------------------------------------------------------------------------------- one run (child)
def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run: parse the recipe with the spec's overrides, run it, add memory and time figures."""
    started = time.perf_counter()
    import torch

    from hf_fedkseed.configs import parse_recipe
    from hf_fedkseed.pipeline import run_training

    if "--load_in_4bit" in spec["overrides"]:
        from hf_fedkseed.baselines.fedit import quantization_unavailable

        reason = quantization_unavailable(4)
        if reason is not None:
            return {"skipped": reason}
    rss_after_imports = current_rss_bytes()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    parsed = parse_recipe(spec["recipe"], spec["overrides"])
    results = run_training(*parsed)
    if torch.cuda.is_available():
        results["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        results["memory_measure"] = "torch.cuda.max_memory_allocated"
    else:
        results["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results["memory_measure"] = "ru_maxrss (whole process)"
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    results["rss_after_imports_bytes"] = rss_after_imports
    results["wall_seconds"] = time.perf_counter() - started
    return results


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    result = run_job(spec)
    Path(spec["result_path"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------- orchestration
def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({k: spec[k] for k in ("recipe", "overrides")}).encode()).hexdigest()[:16]


def run_spec(spec: dict[str, Any], in_process: bool) -> dict[str, Any]:
    """Run one job (or reuse its result when the same spec already ran into the same directory)."""
    result_path = Path(spec["result_path"])
    marker = result_path.with_suffix(".spec")
    if result_path.is_file() and marker.is_file() and marker.read_text() == spec_hash(spec):
        return json.loads(result_path.read_text())
    result_path.parent.mkdir(parents=True, exist_ok=True)
    if in_process:
        result = run_job(spec)
        result_path.write_text(json.dumps(result, indent=2) + "\n")
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
        log_path = result_path.with_suffix(".log")
        with log_path.open("w") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False, cwd=ROOT)
        if done.returncode != 0:
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"run {spec['name']} failed (exit {done.returncode}); log {log_path}:\n{tail}")
        result = json.loads(result_path.read_text())
    marker.write_text(spec_hash(spec))
    return result


def pretrained_base(args: argparse.Namespace) -> str:
    """The miniature base: pretrained in a child interpreter (cached in OUTPUT/base by its settings hash)."""
    base_dir = args.output_dir / "base"
    command = ["-m", "hf_fedkseed.pretrain", str(base_dir), "--steps", str(args.pretrain_steps)]
    started = time.perf_counter()
    if args.in_process:
        from hf_fedkseed.pretrain import main as pretrain_main

        pretrain_main(command[2:])
    else:
        subprocess.run([sys.executable, *command], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"base model: {base_dir} ({time.perf_counter() - started:.0f}s)", flush=True)
    return str(base_dir)


def build_specs(args: argparse.Namespace, base: str) -> list[dict[str, Any]]:
    common = [
        "--model_name_or_path", base, "--from_scratch", "false",
        "--rounds", str(args.rounds), "--local_steps", str(args.local_steps),
        "--max_eval_samples", str(args.eval_samples), "--max_new_tokens", str(args.max_new_tokens),
        "--logging_steps", "100000", "--disable_tqdm", "true",
    ]  # fmt: skip
    if args.tokenizer:
        common += ["--tokenizer_name", args.tokenizer]
    specs = []

    def add(name: str, group: str, method: str, seed: int, extra: list[str]) -> None:
        if extra == ["--num_seeds", str(RECIPE_K)] and method == "fedkseed" and seed in args.seeds:
            name, extra = f"fedkseed_seed{seed}", []  # the same run as the method table's: reused, not rerun
        out = args.output_dir / "runs" / name
        overrides = [*common, *METHOD_OVERRIDES[method], *extra, "--seed", str(seed), "--output_dir", str(out)]
        specs.append(
            {
                "name": name,
                "group": group,
                "method": method,
                "seed": seed,
                "recipe": str(args.recipe),
                "overrides": [*overrides, *args.extra],
                "result_path": str(out / "paper_table_result.json"),
            }
        )

    for method in args.methods:
        for seed in args.seeds:
            add(f"{method}_seed{seed}", "methods", method, seed, [])
    for k in args.ablation_k:
        for seed in args.ablation_seeds:
            add(f"fedkseed_k{k}_seed{seed}", f"ablation_k{k}", "fedkseed", seed, ["--num_seeds", str(k)])
    return specs


# ---------------------------------------------------------------------------------------------- report
def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per group (method or ablation K): Rouge-L mean/std over seeds, bytes, memory and time."""
    groups: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for spec, result in results:
        key = spec["method"] if spec["group"] == "methods" else spec["group"]
        groups.setdefault(key, []).append((spec, result))
    summary = {}
    for key, runs in groups.items():
        done = [(spec, result) for spec, result in runs if "skipped" not in result]
        if not done:
            summary[key] = {"skipped": runs[0][1]["skipped"]}
            continue
        rouge = [result["rougeL_after"] for _, result in done]
        losses = [result["eval_loss_after"] for _, result in done]
        rouge_mean, rouge_std = mean_std(rouge)
        loss_mean, loss_std = mean_std(losses)
        # Paired with the base on the same rows (the evaluated rows depend on the seed when capped).
        delta_mean, delta_std = mean_std([result["eval_loss_after"] - result["eval_loss_before"] for _, result in done])
        summary[key] = {
            "method": done[0][0]["method"],
            "seeds": [spec["seed"] for spec, _ in done],
            "rougeL": rouge,
            "rougeL_mean": rouge_mean,
            "rougeL_std": rouge_std,
            "rougeL_before": statistics.fmean(result["rougeL_before"] for _, result in done),
            "eval_loss_mean": loss_mean,
            "eval_loss_std": loss_std,
            "eval_loss_before": statistics.fmean(result["eval_loss_before"] for _, result in done),
            "eval_loss_delta_mean": delta_mean,
            "eval_loss_delta_std": delta_std,
            "bytes_per_client_per_round": statistics.fmean(result["bytes_per_client_per_round"] for _, result in done),
            "total_bytes": statistics.fmean(result["total_bytes"] for _, result in done),
            "peak_memory_mib": max(result["peak_memory_bytes"] for _, result in done) / MIB,
            "rss_after_imports_mib": statistics.fmean(result["rss_after_imports_bytes"] for _, result in done) / MIB,
            "memory_measure": done[0][1]["memory_measure"],
            "train_seconds": statistics.fmean(result["train_seconds"] for _, result in done),
            "cpu_seconds": statistics.fmean(result.get("cpu_seconds", math.nan) for _, result in done),
            "wall_seconds": statistics.fmean(result["wall_seconds"] for _, result in done),
        }
    return summary


def human_bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value:,.0f} B"


def markdown(summary: dict[str, dict[str, Any]], methods: list[str], ablation: list[int], meta: dict) -> str:
    lines = [
        f"Miniature comparison ({meta['profile']} profile): {meta['rounds']} rounds x 3 of 6 clients (one per training "
        f"task family) x {meta['local_steps']} local steps, Rouge-L (%) on {meta['eval_samples']} held-out rows of "
        f"the 2 unseen task families, mean ± std over seeds {meta['seeds']}; {meta['cpu']}, "
        f"{meta['threads']} threads.",
        "",
        "| method | Rouge-L (%) | held-out loss | Δ loss vs base | bytes / client / round | total bytes | "
        "peak memory (MiB) | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    first = next((entry for entry in summary.values() if "rougeL_before" in entry), None)
    if first is not None:
        lines.append(
            f"| pretrained base (no tuning) | {100 * first['rougeL_before']:.2f} | {first['eval_loss_before']:.4f} "
            "| 0 | - | - | - | - |"
        )
    for method in methods:
        entry = summary.get(method)
        if entry is None:
            continue
        if "skipped" in entry:
            lines.append(f"| {LABELS[method]} | skipped: {entry['skipped']} | | | | | | |")
            continue
        lines.append(
            f"| {LABELS[method]} | {100 * entry['rougeL_mean']:.2f} ± {100 * entry['rougeL_std']:.2f} "
            f"| {entry['eval_loss_mean']:.4f} ± {entry['eval_loss_std']:.4f} "
            f"| {entry['eval_loss_delta_mean']:+.4f} ± {entry['eval_loss_delta_std']:.4f} "
            f"| {human_bytes(entry['bytes_per_client_per_round'])} | {human_bytes(entry['total_bytes'])} "
            f"| {entry['peak_memory_mib']:.0f} | {entry['train_seconds']:.0f} |"
        )
    if ablation:
        lines += [
            "",
            "FedKSeed ablation over K (the number of candidate seeds):",
            "",
            "| K | Rouge-L (%) | held-out loss | Δ loss vs base | bytes / client / round | seeds |",
            "|---|---|---|---|---|---|",
        ]
        for k in ablation:
            entry = summary.get(f"ablation_k{k}")
            if entry is None or "skipped" in entry:
                continue
            lines.append(
                f"| {k} | {100 * entry['rougeL_mean']:.2f} ± {100 * entry['rougeL_std']:.2f} "
                f"| {entry['eval_loss_mean']:.4f} ± {entry['eval_loss_std']:.4f} "
                f"| {entry['eval_loss_delta_mean']:+.4f} ± {entry['eval_loss_delta_std']:.4f} "
                f"| {human_bytes(entry['bytes_per_client_per_round'])} | {entry['seeds']} |"
            )
    measured = [entry for entry in summary.values() if "rss_after_imports_mib" in entry]
    if measured:
        imports = statistics.fmean(entry["rss_after_imports_mib"] for entry in measured)
        lines += [
            "",
            f"Peak memory: {measured[0]['memory_measure']} of a fresh interpreter per run (Python, torch and "
            f"transformers included: about {imports:.0f} MiB after imports).",
        ]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, Any]], methods: list[str], ablation: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    for method in methods:
        entry = summary.get(method)
        if entry is None or "skipped" in entry:
            continue
        left.errorbar(
            entry["total_bytes"],
            100 * entry["rougeL_mean"],
            yerr=100 * entry["rougeL_std"],
            fmt="o",
            capsize=4,
            label=LABELS[method],
        )
        middle.errorbar(
            entry["total_bytes"],
            entry["eval_loss_delta_mean"],
            yerr=entry["eval_loss_delta_std"],
            fmt="o",
            capsize=4,
            label=LABELS[method],
        )
    middle.axhline(0.0, color="gray", linestyle=":")
    middle.set_xscale("log")
    middle.set(
        xlabel="total bytes of the run (log scale)",
        ylabel="held-out loss change vs base (lower is better)",
        title="Methods: held-out loss",
    )
    base = next((entry["rougeL_before"] for entry in summary.values() if "rougeL_before" in entry), None)
    if base is not None:
        left.axhline(100 * base, color="gray", linestyle=":", label="pretrained base")
    left.set_xscale("log")
    left.set(xlabel="total bytes of the run (log scale)", ylabel="Rouge-L (%) on held-out tasks", title="Methods")
    left.legend(fontsize=8)
    points = [(k, summary[f"ablation_k{k}"]) for k in ablation if "rougeL_mean" in summary.get(f"ablation_k{k}", {})]
    if points:
        right.errorbar(
            [k for k, _ in points],
            [100 * e["rougeL_mean"] for _, e in points],
            yerr=[100 * e["rougeL_std"] for _, e in points],
            fmt="o-",
            capsize=4,
        )
        right.set_xscale("log", base=2)
    right.set(xlabel="K (candidate seeds, log scale)", ylabel="Rouge-L (%)", title="FedKSeed: ablation over K")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child_main(args.child)
    started = time.perf_counter()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    base = pretrained_base(args) if args.base == "pretrained" else args.base
    specs = build_specs(args, base)
    results = []
    for number, spec in enumerate(specs, 1):
        run_started = time.perf_counter()
        result = run_spec(spec, args.in_process)
        results.append((spec, result))
        status = (
            f"skipped: {result['skipped']}"
            if "skipped" in result
            else f"Rouge-L {100 * result['rougeL_after']:.2f}  loss {result['eval_loss_after']:.4f}  "
            f"{human_bytes(result['bytes_per_client_per_round'])}/client/round"
        )
        print(
            f"[{number}/{len(specs)}] {spec['name']}: {status}  ({time.perf_counter() - run_started:.0f}s, "
            f"{time.perf_counter() - started:.0f}s so far)",
            flush=True,
        )
    summary = summarise(results)
    meta = {
        "profile": args.profile,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "eval_samples": args.eval_samples,
        "seeds": args.seeds,
        "base": base,
        "recipe": str(args.recipe),
        "cpu": cpu_name(),
        "threads": os.cpu_count(),
        "in_process": args.in_process,
        "seconds": time.perf_counter() - started,
    }
    table = markdown(summary, args.methods, args.ablation_k, meta)
    report = {
        "meta": meta,
        "summary": summary,
        "runs": [{"spec": spec, "result": result} for spec, result in results],
    }
    (args.output_dir / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.output_dir / "table.md").write_text(table)
    plot(summary, args.methods, args.ablation_k, args.output_dir / "rougeL_vs_bytes.png")
    print(table)
    print(f"wrote {args.output_dir}/table.md, results.json, rougeL_vs_bytes.png in {meta['seconds']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
