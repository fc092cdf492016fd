"""Benchmark a FedKSeed round through the stock Trainer against the sum of its clients' plain local ZO steps."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from _common import cpu_name, seeded_llama
from bytes_report import message_bytes_report
from datasets import Dataset
from transformers import LlamaForCausalLM, Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from hf_fedkseed import FederatedCallback, FederatedConfig, KSeedZOOptimizer

VOCAB = 8_000
HIDDEN = 384
INTERMEDIATE = 1_024
LAYERS = 6
HEADS = 6
NUM_TASKS = 4
ROWS_PER_TASK = 16
LR = 1e-6
EPS = 1e-3
NUM_SEEDS = 4096
REPORT_TAU = 200  # the paper's local steps, for the wire-size figures
MODEL_INIT_SEED = 0
DATA_SEED = 1234
NOISE_SEED = 4321
UNDO_MODES = ("snapshot", "replay")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tau 8, 2 rounds per run (default tau 16, 3 rounds)")
    parser.add_argument("--json", default=None, help="also write the JSON result to this path")
    parser.add_argument("--tau", type=int, default=None, help="local steps per client and round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per federated run")
    parser.add_argument("--clients-per-round", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="federated runs per undo mode (quick 1, else 2)")
    parser.add_argument("--warmup", type=int, default=3, help="plain warm-up steps (plus one small federated run)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.tau is None:
        args.tau = 8 if args.quick else 16
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    for name in ("tau", "rounds", "clients_per_round", "repeats", "seq_len", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.clients_per_round > NUM_TASKS:
        parser.error(f"--clients-per-round must be at most {NUM_TASKS} (one client per task)")
    return args


# ---------------------------------------------------------------------------------------------- model and data
def build_model(seq_len: int) -> LlamaForCausalLM:
    """A ~16.8M-parameter float32 Llama (untied embeddings), initialised from its own seed."""
    return seeded_llama(
        MODEL_INIT_SEED,
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=max(2048, seq_len),
        tie_word_embeddings=False,
    )


def build_dataset(seq_len: int) -> Dataset:
    """NUM_TASKS tasks of ROWS_PER_TASK random token rows (input_ids == labels); `task` drives the natural split."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    tokens = torch.randint(VOCAB, (NUM_TASKS * ROWS_PER_TASK, seq_len), generator=generator).tolist()
    tasks = [f"task{row // ROWS_PER_TASK}" for row in range(len(tokens))]
    return Dataset.from_dict({"task": tasks, "input_ids": tokens, "labels": tokens})


def plain_batches(dataset: Dataset) -> list[dict[str, torch.Tensor]]:
    """The same rows as single-row tensor batches, built up front (the Trainer's collation counts as overhead)."""
    batches = []
    for row in dataset:
        input_ids = torch.tensor([row["input_ids"]])
        batches.append({"input_ids": input_ids, "labels": input_ids.clone()})
    return batches


# ---------------------------------------------------------------------------------------------- plain loop
class PlainLoop:
    """The naive reference: plain hooked ZO steps with its own optimizer, no Trainer and no federation."""

    def __init__(self, model: LlamaForCausalLM, batches: list[dict[str, torch.Tensor]]):
        self.model = model
        self.batches = batches
        self.optimizer = KSeedZOOptimizer(model, lr=LR, eps=EPS, num_seeds=NUM_SEEDS)
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.cursor = 0

    def block(self, steps: int, record: bool = True) -> float:
        """`steps` plain steps and two bare z passes; returns the block's median step seconds."""
        model, optimizer = self.model, self.optimizer
        block: list[float] = []
        for _ in range(steps):
            batch = self.batches[self.cursor % len(self.batches)]
            self.cursor += 1
            start = time.perf_counter()
            # What Trainer.training_step does around the ZO step, without the Trainer.
            model.train()
            optimizer.train()
            model(**batch).loss.backward()  # the hooks ran both ZO forwards; the backward is free
            optimizer.step()
            optimizer.zero_grad()
            block.append(time.perf_counter() - start)
        for _ in range(2):
            # One "generate z for every parameter and add it" pass (alpha 0): the unit of catch-up and replay undo.
            start = time.perf_counter()
            optimizer.engine.add_noise_(optimizer.named_params, NOISE_SEED + self.cursor, 0.0)
            self.cursor += 1
            if record:
                self.samples["noise_pass"].append(time.perf_counter() - start)
        optimizer.remove_hooks()  # a federated run's optimizer hooks the same model next
        if record:
            self.samples["plain_step"] += block
        return statistics.median(block) if block else float("nan")


# ---------------------------------------------------------------------------------------------- phase timing
class TimedFederatedCallback(FederatedCallback):
    """FederatedCallback that also times its phases, the client/server calls inside them and the Trainer's steps.

    Times are kept per round under nested keys ("end_round/catch_up" is the catch-up inside `end_round`); the
    perf_counter calls add microseconds to a round of seconds. `before_round`, if set, runs before each round
    starts (outside its time) and returns the plain step seconds measured there, paired with that round.
    """

    def __init__(self, *args: Any, before_round: Callable[[], float] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.before_round = before_round
        self.round_phases: list[dict[str, float]] = []
        self.round_plain_step: list[float] = []
        self.step_seconds: list[float] = []  # on_step_begin to on_step_end of every Trainer step
        self._stack: list[str] = []
        self._step_start: float | None = None
        self._last_step_end: float | None = None

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        self._stack.append(name)
        key = "/".join(self._stack)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.round_phases[-1][key] += time.perf_counter() - start
            self._stack.pop()

    def _wrap(self, owner: Any, method: str) -> None:
        original = getattr(owner, method)

        def timed_method(*args: Any, **kwargs: Any) -> Any:
            with self.timed(method):
                return original(*args, **kwargs)

        setattr(owner, method, timed_method)  # instance attribute: the class is untouched

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        for method in ("catch_up", "begin_local", "end_local", "build_update"):
            self._wrap(self.client, method)
        self._wrap(self.server, "aggregate")

    def on_step_begin(self, args, state, control, **kwargs):
        _, slot, local_step = self.where(state.global_step)
        if slot == 0 and local_step == 0:
            if self.before_round is not None:
                # Plain steps between two rounds (weights at w(synced), so nothing is mid-client): each round
                # gets a reference measured right before it, which cancels slow drifts of the machine's speed.
                self.round_plain_step.append(self.before_round())
            self.round_phases.append(defaultdict(float))
        elif self._last_step_end is not None:  # dataloader fetch and Trainer bookkeeping between two steps
            self.round_phases[-1]["trainer_between_steps"] += time.perf_counter() - self._last_step_end
        super().on_step_begin(args, state, control, **kwargs)
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self._step_start
        self.round_phases[-1]["trainer_step"] += seconds
        self.step_seconds.append(seconds)
        super().on_step_end(args, state, control, **kwargs)
        self._last_step_end = time.perf_counter()

    def begin_round(self, round_index: int) -> None:
        with self.timed("begin_round"):
            super().begin_round(round_index)

    def begin_client(self, slot: int, optimizer) -> None:
        with self.timed("begin_client"):
            super().begin_client(slot, optimizer)

    def end_client(self, slot: int) -> None:
        with self.timed("end_client"):
            super().end_client(slot)

    def end_round(self, round_index: int) -> dict:
        with self.timed("end_round"):
            return super().end_round(round_index)


# ---------------------------------------------------------------------------------------------- federated run
def federated_run(
    model: LlamaForCausalLM,
    dataset: Dataset,
    args: argparse.Namespace,
    *,
    undo: str,
    rounds: int,
    tau: int,
    before_round: Callable[[], float] | None = None,
) -> TimedFederatedCallback:
    """One FedKSeed run through the stock Trainer (natural partition by task, K = NUM_SEEDS)."""
    config = FederatedConfig(
        rounds=rounds,
        local_steps=tau,
        clients_per_round=args.clients_per_round,
        partition="natural",
        partition_column="task",
        undo=undo,
    )
    federated = TimedFederatedCallback(config, dataset, before_round=before_round)
    optimizer = KSeedZOOptimizer(model, lr=LR, eps=EPS, num_seeds=NUM_SEEDS)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=1,
            max_steps=federated.total_steps,
            learning_rate=LR,
            lr_scheduler_type="constant",
            logging_steps=1_000_000,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            max_grad_norm=0.0,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=federated.train_dataset,
            optimizers=(optimizer, None),
            callbacks=[federated],
        )
        trainer.remove_callback(PrinterCallback)  # it prints the round logs to stdout, which carries the JSON
        trainer.train()
    optimizer.remove_hooks()  # the plain loop's optimizer hooks the same model next
    return federated


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then run the federated runs (snapshot, replay, repeated) with a plain block before every round.

    One model serves every workload; lr 1e-6 keeps every update negligible, so weights, allocator and caches stay
    the same for all of them.
    """
    torch.set_num_threads(args.threads)
    model = build_model(args.seq_len)
    dataset = build_dataset(args.seq_len)
    plain = PlainLoop(model, plain_batches(dataset))
    runs: dict[str, list[TimedFederatedCallback]] = {undo: [] for undo in UNDO_MODES}

    plain.block(args.warmup, record=False)
    federated_run(model, dataset, args, undo="snapshot", rounds=1, tau=2)  # warms the Trainer and callback paths
    for _ in range(args.repeats):
        for undo in UNDO_MODES:
            run = federated_run(
                model,
                dataset,
                args,
                undo=undo,
                rounds=args.rounds,
                tau=args.tau,
                before_round=lambda: plain.block(args.tau),
            )
            runs[undo].append(run)
    plain.block(args.tau)  # the last round gets a plain block after it too
    return {"model": model, "samples": dict(plain.samples), "runs": runs}


# ---------------------------------------------------------------------------------------------- report
def as_int(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def undo_summary(runs: list[TimedFederatedCallback], plain_step: float, tau: int, clients: int) -> dict[str, Any]:
    """Median round seconds, the ratio and the median per-round time of every phase (nested keys)."""
    records = [entry for run in runs for entry in run.history]
    phases = [phase for run in runs for phase in run.round_phases]
    round_seconds = [entry["seconds"] for entry in records]
    median_round = statistics.median(round_seconds)
    keys = sorted({key for phase in phases for key in phase})
    phase_medians = {key: round(statistics.median(phase.get(key, 0.0) for phase in phases), 4) for key in keys}
    steps = tau * clients
    # Where each round's time beyond the plain steps goes: Trainer-step excess over `steps` plain steps, the
    # top-level callback phases, and what no timer covers (Trainer callbacks/logging around the phases).
    overhead: dict[str, list[float]] = defaultdict(list)
    for entry, phase in zip(records, phases, strict=True):
        top = {key: value for key, value in phase.items() if "/" not in key}
        overhead["trainer_step_excess"].append(top.pop("trainer_step") - steps * plain_step)
        for key, value in top.items():
            overhead[key].append(value)
        overhead["untimed"].append(entry["seconds"] - sum(top.values()) - phase["trainer_step"])
    # Each round against the plain block run right before it: robust to slow drifts of the machine's speed.
    paired = [
        entry["seconds"] / (steps * plain)
        for run in runs
        for entry, plain in zip(run.history, run.round_plain_step, strict=True)
    ]
    return {
        "ratio": round(median_round / (steps * plain_step), 4),
        "paired_ratio_median": round(statistics.median(paired), 4),
        "paired_ratio_samples": [round(value, 4) for value in paired],
        "median_round_seconds": round(median_round, 4),
        "extra_seconds_per_round": round(median_round - steps * plain_step, 4),
        "trainer_step_median_seconds": round(statistics.median(s for run in runs for s in run.step_seconds), 4),
        "overhead_seconds_per_round_median": {key: round(statistics.median(v), 4) for key, v in overhead.items()},
        "phase_seconds_per_round_median": phase_medians,
        "seeds_touched": [entry["seeds_touched"] for entry in records],
        "round_seconds_samples": [round(value, 4) for value in round_seconds],
        # Every round sends the same message sizes, so each set holds one value when the accounting is consistent.
        "bytes_per_client": sorted({as_int(entry["bytes_per_client"]) for entry in records}),
        "bytes_down_per_client": sorted({as_int(entry["bytes_down"] / len(entry["clients"])) for entry in records}),
        "bytes_up_per_client": sorted({as_int(entry["bytes_up"] / len(entry["clients"])) for entry in records}),
    }


def build_report(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    samples, model = result["samples"], result["model"]
    plain_step = statistics.median(samples["plain_step"])
    noise_pass = statistics.median(samples["noise_pass"])
    summaries = {
        undo: undo_summary(runs, plain_step, args.tau, args.clients_per_round) for undo, runs in result["runs"].items()
    }
    snapshot, replay = summaries["snapshot"], summaries["replay"]
    expected = message_bytes_report(NUM_SEEDS, args.tau)
    measured = snapshot["bytes_per_client"] + replay["bytes_per_client"]
    bytes_match = set(measured) == {expected["total"]}
    return {
        "round_overhead_ratio": snapshot["ratio"],
        "round_overhead_ratio_replay": replay["ratio"],
        "targets_met": {
            "round_overhead_ratio<=1.15": snapshot["ratio"] <= 1.15,
            "round_overhead_ratio_replay<=1.15": replay["ratio"] <= 1.15,
        },
        "plain_step_seconds": round(plain_step, 4),
        "noise_pass_seconds": round(noise_pass, 4),
        "plain_seconds_per_round": round(args.tau * args.clients_per_round * plain_step, 4),
        "undo": summaries,
        "bytes_per_client_per_round": {
            "num_seeds": NUM_SEEDS,
            "tau": REPORT_TAU,
            "fedkseed": message_bytes_report(NUM_SEEDS, REPORT_TAU),
            "fedkseed_pro": message_bytes_report(NUM_SEEDS, REPORT_TAU, pro=True),
        },
        "bytes_per_client_measured": {
            "tau": args.tau,
            "total": measured[0],
            "down": snapshot["bytes_down_per_client"][0],
            "up": snapshot["bytes_up_per_client"][0],
            "message_bytes_report": expected,
        },
        "bytes_match_report": bytes_match,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "model": f"Llama vocab {VOCAB}, hidden {HIDDEN}, intermediate {INTERMEDIATE}, {LAYERS} layers, {HEADS} heads",
        "seq_len": args.seq_len,
        "batch_size": 1,
        "tau": args.tau,
        "clients_per_round": args.clients_per_round,
        "num_clients": NUM_TASKS,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "num_seeds": NUM_SEEDS,
        "lr": LR,
        "eps": EPS,
        "threads": args.threads,
        "engine": f"{result['runs']['snapshot'][0].optimizer.engine.name}",
        "attn_implementation": model.config._attn_implementation,
        "quick": args.quick,
        "samples_seconds": {name: [round(v, 4) for v in values] for name, values in samples.items()},
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "cpu": cpu_name(),
    }


def print_table(report: dict[str, Any]) -> None:
    r = report
    rows = [
        ("params", f"{r['num_parameters'] / 1e6:.1f} M, batch 1 x {r['seq_len']}, {r['threads']} threads"),
        ("round", f"{r['clients_per_round']} of {r['num_clients']} clients x tau {r['tau']}, K {r['num_seeds']}"),
        ("plain ZO step", f"{r['plain_step_seconds']:.3f} s  (z pass {r['noise_pass_seconds']:.3f} s)"),
        ("plain steps per round", f"{r['plain_seconds_per_round']:.2f} s"),
    ]
    for undo, summary in r["undo"].items():
        phases = defaultdict(float, summary["phase_seconds_per_round_median"])
        rows += [
            (
                f"round, undo={undo}",
                f"{summary['median_round_seconds']:.2f} s  ratio {summary['ratio']:.3f}  (target <= 1.15), "
                f"paired {summary['paired_ratio_median']:.3f}",
            ),
            (
                "  of which",
                f"round-end catch-up {phases['end_round/catch_up']:.2f} s, "
                f"undo {phases['end_client/end_local']:.2f} s, "
                f"snapshot {phases['begin_client/begin_local']:.2f} s, Trainer steps {phases['trainer_step']:.2f} s",
            ),
        ]
    measured = r["bytes_per_client_measured"]
    fedkseed, pro = (r["bytes_per_client_per_round"][name]["total"] for name in ("fedkseed", "fedkseed_pro"))
    rows += [
        (
            "bytes/client measured",
            f"{measured['total']} at tau {measured['tau']} (= report: {r['bytes_match_report']})",
        ),
        (f"bytes/client tau {REPORT_TAU}", f"FedKSeed {fedkseed}, FedKSeed-Pro {pro}"),
        ("other processes' CPU", f"{r['other_processes_cpu_share']:.1%} of the machine (should be ~0)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}", file=sys.stderr)


def busy_cpu_seconds() -> float:
    """CPU time all processes spent since boot (`/proc/stat`), to tell how much of the run other processes took."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    load_before = os.getloadavg()
    busy_before, own_before = busy_cpu_seconds(), time.process_time()
    report = build_report(args, run_benchmark(args))
    wall = time.perf_counter() - started
    foreign = busy_cpu_seconds() - busy_before - (time.process_time() - own_before)
    report["wall_seconds"] = round(wall, 1)
    # The share of the machine's CPU time that other processes used during the run: near 0 on an idle machine.
    report["other_processes_cpu_share"] = round(max(foreign, 0.0) / (wall * (os.cpu_count() or 1)), 3)
    # Other processes on the same cores skew every figure; the load average makes such a run recognisable.
    report["load_average_1min_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
    print_table(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
