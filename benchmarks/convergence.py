"""Convergence per forward pass: FedKSeed's two-point steps against tensor-subset directions and FZOO, same bytes.

Every method runs the quickstart's federation (SmolLM2-135M-Instruct, the shipped tasks and partition, 3 of 6
clients per round, FedKSeed-Pro seed sampling, chat prompts) with the **same number of forward passes per client and
round**, and is scored on the quickstart's held-out task families after every round (Rouge-L and loss, 48 rows), over
3 seeds. A method's local steps are `forward budget // forwards per step` (2 for a two-point step, N + 1 for FZOO).

    python benchmarks/convergence.py --parallel 2 --json benchmarks/results/convergence.json   # full (~45 min)
    python benchmarks/convergence.py --quick                                           # tiny random model, ~1 min

Methods. Learning rates were chosen with `--validation` (the same runs, seed 42, scored on 8 validation rows of each
training family, never on the reported families; benchmarks/results/convergence_validation_{a,b,c}.json), by final
validation Rouge-L and loss:

* `fedkseed`: the paper's step, two-point, every tensor, lr 1e-5 (the quickstart's, chosen the same way).
* `tensor_subset`: two-point along directions that perturb a seed-chosen quarter of the tensors
  (`zo_tensor_fraction: 0.25`, LeZO / ZO-Bench block-wise), lr 6e-5 (validation: 3e-5 39.5 / loss 3.86, 6e-5
  40.5 / 3.17).
* `fzoo`: FZOO's batch of N = 4 one-sided estimates with the step normalised by their spread, lr 6e-3 (validation:
  3e-3 36.7 / 3.50, 6e-3 47.3 / 2.93, 1.2e-2 7.6 / 4.22: it diverges).
* `fzoo_subset` (only when named, not tuned): both, lr 1e-2.
* `shift` (only when named): FedKSeed's step and learning rate along the `counter-shift` engine's directions
  (cyclic shifts of one Gaussian sequence per block; the catch-up costs a few FFTs whatever K is). The same
  estimator with other N(0, I) directions, so it keeps FedKSeed's lr: nothing was tuned for it.
* `rademacher` (only when named): FedKSeed's step and learning rate along the `counter-rademacher` engine's +1/-1
  directions (mean 0, identity covariance, so the same estimator in expectation and the same lr; nothing tuned).
  Its steps cost about half as much on a CPU (`engine_step.py`), so the report's wall seconds matter here.

FedKSeed on the same validation runs: 38.3 / 3.46.

Outputs: JSON (per method: final Rouge-L and loss mean +- std, the mean curves against forward passes, wall seconds
and cumulative bytes per client, forward passes to reach FedKSeed's final Rouge-L, bytes per client per round, peak
RSS) and a plot next to it. Each run is a fresh process, so its `ru_maxrss` is its own peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import cpu_name, mean_std

ROOT = Path(__file__).resolve().parents[1]
LABELS = {
    "fedkseed": "FedKSeed (two-point, all tensors)",
    "tensor_subset": "tensor subset 0.25 (two-point)",
    "fzoo": "FZOO (N=4 one-sided, normalised)",
    "fzoo_subset": "FZOO + tensor subset 0.25",
    "shift": "FedKSeed, counter-shift engine",
    "rademacher": "FedKSeed, counter-rademacher engine",
}
PAPER_STEP = ["--zo_estimator", "two_point", "--zo_directions", "1", "--zo_tensor_fraction", "1.0"]
FZOO_STEP = ["--zo_estimator", "fzoo", "--zo_directions", "4"]
# every method names its whole estimator, whatever the recipe sets
METHODS = {
    "fedkseed": dict(points=2, overrides=[*PAPER_STEP, "--learning_rate", "1e-5"]),
    "tensor_subset": dict(
        points=2, overrides=[*PAPER_STEP[:4], "--zo_tensor_fraction", "0.25", "--learning_rate", "6e-5"]
    ),
    "fzoo": dict(points=5, overrides=[*FZOO_STEP, "--zo_tensor_fraction", "1.0", "--learning_rate", "6e-3"]),
    "fzoo_subset": dict(points=5, overrides=[*FZOO_STEP, "--zo_tensor_fraction", "0.25", "--learning_rate", "1e-2"]),
    "shift": dict(points=2, overrides=[*PAPER_STEP, "--engine", "counter-shift", "--learning_rate", "1e-5"]),
    "rademacher": dict(points=2, overrides=[*PAPER_STEP, "--engine", "counter-rademacher", "--learning_rate", "1e-5"]),
}
DEFAULT_METHODS = ("fedkseed", "tensor_subset", "fzoo")
BASELINE = "fedkseed"
PROFILES = {
    # 8 rounds x 3 clients x 20 forward passes each (two-point: 10 steps; FZOO N=4: 4 steps), 3 seeds
    "full": dict(recipe="recipes/quickstart.yaml", rounds=8, forwards=20, seeds=(42, 43, 44), extra=[]),
    # the tiny random model of recipes/smoke.yaml: checks the machinery, says nothing about learning
    "quick": dict(
        recipe="recipes/smoke.yaml",
        rounds=2,
        forwards=10,
        seeds=(42,),
        extra=["--max_eval_samples", "8", "--max_new_tokens", "4", "--learning_rate", "1e-3"],
    ),
}


def run_args(method: str, profile: dict, seed: int, output: Path) -> list[str]:
    """The recipe overrides of one run."""
    spec = METHODS[method]
    local_steps = profile["forwards"] // spec["points"]
    overrides = list(spec["overrides"])
    if profile["recipe"].endswith("smoke.yaml"):  # the tiny model keeps the profile's one learning rate
        at = overrides.index("--learning_rate")
        del overrides[at : at + 2]
    overrides += profile["extra"]
    return [
        *overrides,
        "--rounds",
        str(profile["rounds"]),
        "--local_steps",
        str(local_steps),
        "--eval_every_rounds",
        "1",
        "--seed",
        str(seed),
        "--output_dir",
        str(output),
        "--save_strategy",
        "no",
    ]


def child(spec: dict) -> None:
    """One run in this fresh process: train, then write the curve and the peak RSS."""
    from hf_fedkseed.configs import parse_recipe
    from hf_fedkseed.pipeline import run_training

    started = time.perf_counter()
    parsed = parse_recipe(ROOT / spec["recipe"], spec["args"])
    federated = parsed[3]
    results = run_training(*parsed)
    output = Path(spec["output"])
    evaluations = json.loads((output / "eval_results.json").read_text())["evaluations"]
    rounds = [json.loads(line) for line in (output / "rounds.jsonl").read_text().splitlines()]
    per_round_forwards = federated.clients_per_round * federated.local_steps * spec["points"]
    elapsed = [0.0]
    for record in rounds:
        elapsed.append(elapsed[-1] + record["seconds"])
    curve = [
        {
            "round": e["round"],
            "forward_passes": e["round"] * per_round_forwards,
            "train_seconds": elapsed[e["round"]],
            "bytes_per_client": e["bytes_per_client"],
            "rougeL": e["rougeL"],
            "eval_loss": e["eval_loss"],
        }
        for e in evaluations
    ]
    row = {
        "method": spec["method"],
        "seed": spec["seed"],
        "local_steps": federated.local_steps,
        "forwards_per_step": spec["points"],
        "curve": curve,
        "bytes_per_client_per_round": results["bytes_per_client_per_round"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds": time.perf_counter() - started,
    }
    (output / "convergence_run.json").write_text(json.dumps(row))


def summarize(runs: list[dict]) -> dict:
    """Per method: final scores over seeds, mean curves, forward passes to FedKSeed's final Rouge-L."""
    methods: dict[str, dict] = {}
    for method in dict.fromkeys(run["method"] for run in runs):
        mine = [run for run in runs if run["method"] == method]
        points = []
        for index, point in enumerate(mine[0]["curve"]):
            at = [run["curve"][index] for run in mine]
            points.append(
                {
                    "round": point["round"],
                    "forward_passes": point["forward_passes"],
                    "train_seconds": statistics.fmean(p["train_seconds"] for p in at),
                    "bytes_per_client": point["bytes_per_client"],
                    "rougeL": statistics.fmean(p["rougeL"] for p in at),
                    "rougeL_std": mean_std([p["rougeL"] for p in at])[1],
                    "eval_loss": statistics.fmean(p["eval_loss"] for p in at),
                }
            )
        final_rouge = mean_std([run["curve"][-1]["rougeL"] for run in mine])
        final_loss = mean_std([run["curve"][-1]["eval_loss"] for run in mine])
        methods[method] = {
            "label": LABELS[method],
            "seeds": [run["seed"] for run in mine],
            "local_steps": mine[0]["local_steps"],
            "forwards_per_step": mine[0]["forwards_per_step"],
            "final_rougeL_mean": final_rouge[0],
            "final_rougeL_std": final_rouge[1],
            "final_eval_loss_mean": final_loss[0],
            "final_eval_loss_std": final_loss[1],
            "rougeL_before": points[0]["rougeL"],
            "eval_loss_before": points[0]["eval_loss"],
            "total_forward_passes": points[-1]["forward_passes"],
            "bytes_per_client_per_round": statistics.fmean(run["bytes_per_client_per_round"] for run in mine),
            "peak_rss_mib": max(run["peak_rss_bytes"] for run in mine) / (1 << 20),
            "curve": points,
        }
    base = methods.get(BASELINE)
    if base is None:
        return {"methods": methods}
    target = base["final_rougeL_mean"]
    for entry in methods.values():
        reached = next((p for p in entry["curve"] if p["round"] > 0 and p["rougeL"] >= target), None)
        entry["forward_passes_to_target"] = None if reached is None else reached["forward_passes"]
        entry["forward_passes_to_target_ratio"] = (
            None if reached is None else reached["forward_passes"] / base["total_forward_passes"]
        )
        entry["bytes_ratio_vs_fedkseed"] = entry["bytes_per_client_per_round"] / base["bytes_per_client_per_round"]
        entry["peak_rss_ratio_vs_fedkseed"] = entry["peak_rss_mib"] / base["peak_rss_mib"]
        margin = entry["final_rougeL_mean"] - target
        entry["final_above_fedkseed_by_more_than_std"] = margin > max(
            entry["final_rougeL_std"], base["final_rougeL_std"]
        )
    new = {name: entry for name, entry in methods.items() if name != BASELINE}
    reaching = {n: e for n, e in new.items() if e["forward_passes_to_target_ratio"] is not None}
    best = (
        min(reaching, key=lambda n: (reaching[n]["forward_passes_to_target_ratio"], -reaching[n]["final_rougeL_mean"]))
        if reaching
        else max(new, key=lambda n: new[n]["final_rougeL_mean"], default=None)
    )
    return {
        "target_rougeL": target,
        "best_new_method": best,
        "forward_passes_to_target_ratio_vs_fedkseed": None
        if best is None
        else methods[best]["forward_passes_to_target_ratio"],
        "methods": methods,
    }


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_spec = [
        ("forward_passes", "forward passes (all clients)"),
        ("train_seconds", "train seconds"),
        ("bytes_per_client", "cumulative bytes per client"),
    ]
    figure, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    for entry in summary["methods"].values():
        curve = entry["curve"]
        for axis, (key, label) in zip(axes, axes_spec, strict=False):
            axis.errorbar(
                [p[key] for p in curve],
                [100 * p["rougeL"] for p in curve],
                yerr=[100 * p["rougeL_std"] for p in curve],
                label=entry["label"],
                marker="o",
                capsize=2,
            )
            axis.set_xlabel(label)
            axis.set_ylabel("held-out Rouge-L")
        axes[3].plot(
            [p["forward_passes"] for p in curve], [p["eval_loss"] for p in curve], marker="o", label=entry["label"]
        )
    axes[3].set_xlabel("forward passes (all clients)")
    axes[3].set_ylabel("held-out loss")
    if "target_rougeL" in summary:
        for axis in axes[:3]:
            axis.axhline(100 * summary["target_rougeL"], color="grey", linestyle=":", linewidth=1)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def table(report: dict) -> str:
    """The summary as a Markdown table (written beside the JSON)."""
    lines = [
        f"Held-out Rouge-L and loss after {report['rounds']} rounds x 3 clients x "
        f"{report['forward_passes_per_client_round']} forward passes per client-round, seeds {report['seeds']}, "
        f"{report['machine']} ({report['cpu_count']} cores, {report['parallel_runs']} run(s) side by side). "
        f"Target: FedKSeed's final Rouge-L, {100 * report['target_rougeL']:.2f}.",
        "",
        "| method | steps x forwards per client-round | final Rouge-L | final loss | forward passes to target (ratio) "
        "| bytes per client-round | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in report["methods"].values():
        to_target = entry.get("forward_passes_to_target")
        reached = "not reached" if to_target is None else f"{to_target} ({entry['forward_passes_to_target_ratio']:.2f})"
        lines.append(
            f"| {entry['label']} | {entry['local_steps']} x {entry['forwards_per_step']} "
            f"| {100 * entry['final_rougeL_mean']:.2f} ± {100 * entry['final_rougeL_std']:.2f} "
            f"| {entry['final_eval_loss_mean']:.3f} ± {entry['final_eval_loss_std']:.3f} | {reached} "
            f"| {entry['bytes_per_client_per_round']:,.0f} ({entry['bytes_ratio_vs_fedkseed']:.2f}x) "
            f"| {entry['peak_rss_mib']:,.0f} MiB ({entry['peak_rss_ratio_vs_fedkseed']:.3f}x) |"
        )
    lines.append("")
    lines.append(f"Untuned base: Rouge-L {100 * next(iter(report['methods'].values()))['rougeL_before']:.2f}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny random model, 2 rounds, 1 seed")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="override the profile's seeds")
    parser.add_argument(
        "--validation",
        action="store_true",
        help="score validation rows of the six training families instead of the held-out families (for choosing "
        "settings; see quickstart_validation.py)",
    )
    parser.add_argument(
        "--lr", nargs="+", default=[], metavar="METHOD=LR", help="override a method's learning rate (e.g. fzoo=1e-2)"
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="a previous report (same profile): its runs of the methods and seeds asked for are taken as they are, "
        "not run again (e.g. the baseline, to add a method); the report names them under `reused`",
    )
    parser.add_argument("--output-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the summary here (and the plot beside it)")
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="runs side by side, each on one thread (OMP_NUM_THREADS=1); 2 on a 2-core machine",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if BASELINE not in args.methods and not args.validation:
        parser.error(f"--methods must include the baseline `{BASELINE}`: the targets are measured against it.")
    name = "quick" if args.quick else "full"
    profile = PROFILES[name]
    seeds = tuple(args.seeds) if args.seeds else profile["seeds"]
    output_dir = args.output_dir or ROOT / "outputs" / f"convergence_{name}{'_validation' if args.validation else ''}"
    extra = []
    if args.validation:
        from quickstart_validation import validation_dataset

        extra = ["--dataset_name", str(validation_dataset(output_dir / "data"))]
    learning_rates = dict(item.split("=", 1) for item in args.lr)
    reused, previous = [], {}
    if args.reuse is not None:
        old = json.loads(args.reuse.read_text())
        if old.get("profile") != name or old.get("scored_rows") != (
            "validation rows of the training families" if args.validation else "held-out task families"
        ):
            parser.error(f"--reuse {args.reuse} is another profile or scores other rows; run every method instead.")
        previous = {(run["method"], run["seed"]): run for run in old["runs"] if run["method"] not in learning_rates}
    started = time.perf_counter()
    jobs, runs = [], []
    for seed in seeds:
        for method in args.methods:
            if (method, seed) in previous:
                runs.append(previous[(method, seed)])
                reused.append([method, seed])
                continue
            output = output_dir / method / f"seed{seed}"
            overrides = [*run_args(method, profile, seed, output), *extra]
            if method in learning_rates:
                overrides += ["--learning_rate", learning_rates[method]]
            spec = dict(
                method=method,
                seed=seed,
                recipe=profile["recipe"],
                points=METHODS[method]["points"],
                args=overrides,
                output=str(output),
            )
            jobs.append(spec)
    env = dict(os.environ, OMP_NUM_THREADS="1") if args.parallel > 1 else dict(os.environ)
    running = []

    def finish(process, spec) -> None:
        if process.wait() != 0:
            log = Path(spec["output"]) / "run.log"
            sys.stderr.write(log.read_text(errors="replace")[-8000:])
            raise SystemExit(
                f"the {spec['method']} run (seed {spec['seed']}) failed; its output is in {spec['output']}"
            )
        runs.append(json.loads((Path(spec["output"]) / "convergence_run.json").read_text()))
        last = runs[-1]["curve"][-1]
        print(
            f"{spec['method']} seed {spec['seed']}: Rouge-L {100 * last['rougeL']:.2f}, loss {last['eval_loss']:.3f}, "
            f"{runs[-1]['seconds']:.0f} s",
            flush=True,
        )

    for spec in jobs:
        if len(running) >= args.parallel:
            finish(*running.pop(0))
        command = [sys.executable, __file__, "--child", json.dumps(spec)]
        Path(spec["output"]).mkdir(parents=True, exist_ok=True)
        with open(Path(spec["output"]) / "run.log", "w") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        running.append((process, spec))
    while running:
        finish(*running.pop(0))
    order = {(method, seed): i for i, (seed, method) in enumerate((s, m) for s in seeds for m in args.methods)}
    runs.sort(key=lambda run: order[(run["method"], run["seed"])])
    summary = summarize(runs)
    report = {
        "profile": name,
        "scored_rows": "validation rows of the training families" if args.validation else "held-out task families",
        "learning_rate_overrides": learning_rates,
        "machine": cpu_name(),
        "cpu_count": os.cpu_count(),
        "recipe": profile["recipe"],
        "rounds": profile["rounds"],
        "forward_passes_per_client_round": profile["forwards"],
        "seeds": list(seeds),
        "parallel_runs": args.parallel,
        "threads_per_run": 1 if args.parallel > 1 else os.cpu_count(),
        "seconds": time.perf_counter() - started,
        "reused": {"from": str(args.reuse), "machine": old.get("machine"), "runs": reused} if reused else None,
        **summary,
        "runs": runs,
    }
    for method, entry in summary["methods"].items():
        ratio = entry.get("forward_passes_to_target_ratio")
        print(
            f"{method:14s} final Rouge-L {100 * entry['final_rougeL_mean']:.2f}"
            f" +- {100 * entry['final_rougeL_std']:.2f}"
            f"  loss {entry['final_eval_loss_mean']:.3f}  to target: {ratio if ratio is None else round(ratio, 3)}"
            f"  bytes/client/round {entry['bytes_per_client_per_round']:.0f}"
        )
    json_path = args.json or output_dir / "convergence.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(summary, json_path.with_suffix(".png"))
    if "target_rougeL" in summary:
        json_path.with_suffix(".md").write_text(table(report))
    print(f"wrote {json_path} and {json_path.with_suffix('.png')} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
