"""What a run reports: held-out Rouge-L and loss over the rounds, predictions, the plot and `eval_results.json`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .forward_hooks import labelled_logits_only

__all__ = [
    "BASE_EVALUATION_FILE",
    "HeldOutEvaluation",
    "RoundEvaluationCallback",
    "base_fingerprint",
    "cumulative_bytes_per_client",
    "held_out_loss",
    "plot_rounds",
    "read_base_evaluation",
    "run_results",
    "write_run_files",
]

logger = logging.getLogger(__name__)
BASE_EVALUATION_FILE = "base_evaluation.json"  # every run's evaluation of its untuned base, for `base_evaluation`
_BASE_EVALUATION_FORMAT = 1


@torch.no_grad()
def held_out_loss(model, rows, collator, batch_size: int) -> float | None:
    """Mean teacher-forced loss of the response tokens of held-out rows (a signal even before generation works)."""
    if len(rows) == 0:
        return None
    was_training = model.training
    model.eval()
    columns = ["input_ids", "attention_mask", "labels"]
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collator(
            [
                {key: row[key] for key in columns}
                for row in rows.select(range(start, min(start + batch_size, len(rows))))
            ]
        )
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        inputs = labelled_logits_only(model, {key: value.to(model.device) for key, value in batch.items()})
        with torch.no_grad():
            total += model(**inputs).loss.item() * tokens
        count += tokens
    model.train(was_training)
    return total / max(count, 1)


def plot_rounds(rounds: list[dict], path: Path, evaluations: list[dict] | None = None) -> None:
    """`training.png`: training loss per round, held-out Rouge-L and loss against the round and against the cumulative
    bytes per client (the paper's accuracy-against-communication view), and the traffic of every round.

    Args:
        rounds: the round records (`rounds.jsonl`).
        path: where to write the PNG.
        evaluations: held-out evaluations, each with `round` (rounds done), `bytes_per_client` (cumulative),
            `rougeL` and `eval_loss`; the panels that need them are left out when there are none.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluations = [entry for entry in evaluations or [] if entry.get("rougeL") is not None]
    numbers = [entry["round"] + 1 for entry in rounds]
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.2)) if evaluations else plt.subplots(1, 2, figsize=(10, 3.6))
    axes = list(axes.flat)
    loss_axis, bytes_axis = axes[0], axes[-1]
    loss_axis.plot(numbers, [entry["train_loss"] for entry in rounds], marker="o")
    loss_axis.set(xlabel="round", ylabel="mean local training loss", title="Training loss per round")
    if evaluations:
        views = ((axes[1], "round", "rounds done"), (axes[2], "bytes_per_client", "cumulative bytes per client"))
        for axis, key, label in views:
            xs = [entry[key] for entry in evaluations]
            axis.plot(xs, [100 * entry["rougeL"] for entry in evaluations], marker="o", color="tab:blue")
            axis.set(xlabel=label, ylabel="held-out Rouge-L (%)", title=f"Held-out Rouge-L and loss vs {label}")
            axis.tick_params(axis="y", labelcolor="tab:blue")
            if all(entry.get("eval_loss") is not None for entry in evaluations):
                twin = axis.twinx()
                twin.plot(xs, [entry["eval_loss"] for entry in evaluations], marker="s", color="tab:red")
                twin.set_ylabel("held-out loss", color="tab:red")
                twin.tick_params(axis="y", labelcolor="tab:red")
    bytes_axis.bar(numbers, [entry["bytes_down"] / len(entry["clients"]) for entry in rounds], label="down")
    bytes_axis.bar(
        numbers,
        [entry["bytes_up"] / len(entry["clients"]) for entry in rounds],
        bottom=[entry["bytes_down"] / len(entry["clients"]) for entry in rounds],
        label="up",
    )
    bytes_axis.set(xlabel="round", ylabel="bytes per client", title="Traffic per client and round")
    bytes_axis.set_ylim(0, 1.25 * max((entry["bytes_per_client"] for entry in rounds), default=1))
    bytes_axis.legend(loc="upper center", ncols=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


class HeldOutEvaluation:
    """Held-out Rouge-L (greedy generation) and loss of the model, recorded with the rounds and bytes before them.

    Every call appends a record `{round, bytes_per_client, rougeL, eval_loss, seconds}` to `records`; the first and
    the latest generations are kept for `predictions.jsonl`.

    Args:
        model, tokenizer: the model being tuned and its tokenizer.
        eval_rows: prompts for generation (`tokenize_for_generation`), with `reference` (and `category`).
        loss_rows: the same rows for teacher-forced loss (`tokenize_for_training`).
        collator: the training collator.
        max_new_tokens, batch_size: generation settings.
    """

    def __init__(
        self,
        model,
        tokenizer,
        eval_rows,
        loss_rows,
        collator,
        *,
        max_new_tokens: int,
        batch_size: int,
        fingerprint: str | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.eval_rows, self.loss_rows, self.collator = eval_rows, loss_rows, collator
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.fingerprint = fingerprint  # `base_fingerprint`: what the base's evaluation depends on
        self.records: list[dict] = []
        self.first: dict | None = None
        self.latest: dict | None = None

    def evaluate_base(self, reused: dict | None = None) -> dict:
        """Evaluate the untuned base (round 0), or take `reused`, a `read_base_evaluation` of an earlier run of the
        same base on the same rows: its scores and generations, with `seconds` 0 (this run spent none on it)."""
        if reused is None:
            return self(0, 0.0)
        record = dict(reused["record"], round=0, bytes_per_client=0.0, seconds=0.0, reused_from=reused["path"])
        self.records.append(record)
        if reused["result"] is not None:
            self.first = self.latest = reused["result"]
        logger.info("held-out base evaluation reused from %s", reused["path"])
        return record

    def base_evaluation(self) -> dict | None:
        """What `BASE_EVALUATION_FILE` holds: the base's record and generations, keyed by the fingerprint."""
        base = next((record for record in self.records if record["round"] == 0), None)
        if self.fingerprint is None or base is None:
            return None
        record = {key: base[key] for key in ("rougeL", "eval_loss", "seconds")}
        return {"format": _BASE_EVALUATION_FORMAT, "fingerprint": self.fingerprint, "record": record,
                "result": self.first}  # fmt: skip

    def __call__(self, rounds_done: int, bytes_per_client: float) -> dict:
        from .evaluation import evaluate_rouge_l

        started = time.perf_counter()
        result = None
        if len(self.eval_rows):
            result = evaluate_rouge_l(
                self.model,
                self.tokenizer,
                self.eval_rows,
                max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size,
                return_predictions=True,
            )
        loss = held_out_loss(self.model, self.loss_rows, self.collator, self.batch_size)
        record = {
            "round": rounds_done,
            "bytes_per_client": bytes_per_client,
            "rougeL": None if result is None else result["rougeL"],
            "eval_loss": loss,
            "seconds": time.perf_counter() - started,
        }
        self.records.append(record)
        if result is not None:
            self.latest = result
            self.first = self.first or result
        logger.info(
            "held-out after %d round(s): Rouge-L %s, loss %s",
            rounds_done,
            "n/a" if record["rougeL"] is None else f"{100 * record['rougeL']:.2f}",
            "n/a" if loss is None else f"{loss:.4f}",
        )
        return record

    def state_dict(self) -> dict:
        """The evaluations after rounds, which a checkpoint carries so a resumed run reports every one of them."""
        return {"records": [dict(record) for record in self.records if record["round"] > 0]}

    def load_state_dict(self, state: dict) -> None:
        before = [record for record in self.records if record["round"] == 0]  # this process's untuned base
        self.records = before + [dict(record) for record in state["records"]]

    def write_predictions(self, path: Path) -> None:
        """`predictions.jsonl`: per held-out row, the prompt, the reference and the generations before and after."""
        if self.first is None or self.latest is None:
            return
        categories = self.eval_rows["category"] if "category" in self.eval_rows.column_names else None
        with path.open("w", encoding="utf-8") as handle:
            for index, row in enumerate(self.eval_rows):
                before, after = self.first["predictions"][index], self.latest["predictions"][index]
                line = {
                    "category": None if categories is None else categories[index],
                    "prompt": self.tokenizer.decode(row["input_ids"]),
                    "reference": row["reference"],
                    "before": before,
                    "after": after,
                    "rougeL_before": self.first["scores"][index],  # scored once, by evaluate_rouge_l
                    "rougeL_after": self.latest["scores"][index],
                }
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")


def cumulative_bytes_per_client(history: list[dict]) -> float:
    return float(sum(entry["bytes_per_client"] for entry in history))


class RoundEvaluationCallback(TrainerCallback):
    """Runs a `HeldOutEvaluation` on the aggregated model after every `every` rounds.

    The last round is left to the caller, which evaluates after training. Add it to the Trainer after the federated
    callback, whose round end moves the model to the round's aggregate first.
    """

    def __init__(self, evaluation: HeldOutEvaluation, federated, optimizer, *, every: int, rounds: int):
        self.evaluation, self.federated, self.optimizer = evaluation, federated, optimizer
        self.every, self.rounds = every, rounds

    def on_step_end(self, args, state, control, **kwargs):
        done = len(self.federated.history)
        due = done and done % self.every == 0 and done < self.rounds
        if due and all(record["round"] != done for record in self.evaluation.records):
            self.optimizer.eval()  # no armed ZO forward: these forwards only measure
            self.evaluation(done, cumulative_bytes_per_client(self.federated.history))


def run_results(
    evaluation: HeldOutEvaluation, history: list[dict], federated_config, zo_args, rounds, **fields
) -> dict:
    """`eval_results.json` of a run: Rouge-L and loss before and after (and per category), the traffic, the
    setting (`rounds`: the runtime's `partition` and `clients_per_round`) and `fields` (method, timings)."""
    setting = dict(
        clients=rounds.partition.num_clients,
        clients_per_round=rounds.clients_per_round,
        local_steps=federated_config.local_steps,
        method=federated_config.method,
        pro=federated_config.pro,
        num_seeds=zo_args.num_seeds,
    )
    fields = {**setting, **fields}
    first, last = evaluation.records[0], evaluation.records[-1]
    before, after = evaluation.first, evaluation.latest
    return {
        "rougeL_before": first["rougeL"],
        "rougeL_after": last["rougeL"],
        "eval_loss_before": first["eval_loss"],
        "eval_loss_after": last["eval_loss"],
        "per_category_before": None if before is None else before.get("per_category"),
        "per_category_after": None if after is None else after.get("per_category"),
        "num_eval_samples": len(evaluation.eval_rows),
        "rounds": len(history),
        **fields,
        "bytes_per_client_per_round": (
            sum(entry["bytes_per_client"] for entry in history) / len(history) if history else 0
        ),
        "total_bytes": sum(entry["bytes_up"] + entry["bytes_down"] for entry in history),
        "eval_seconds": sum(record["seconds"] for record in evaluation.records),
        "evaluations": evaluation.records,
    }


def write_run_files(output_dir: Path, results: dict, evaluation: HeldOutEvaluation, history: list[dict]) -> None:
    """`eval_results.json`, `predictions.jsonl`, `base_evaluation.json` and `training.png` in `output_dir`."""
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    evaluation.write_predictions(output_dir / "predictions.jsonl")
    base = evaluation.base_evaluation()
    if base is not None:
        (output_dir / BASE_EVALUATION_FILE).write_text(json.dumps(base, ensure_ascii=False) + "\n", encoding="utf-8")
    if history:
        plot_rounds(history, output_dir / "training.png", evaluation.records)


def base_fingerprint(model_args, data_args, *, eval_batch_size: int, seed: int, eval_rows, loss_rows) -> str:
    """The sha256 of everything an evaluation of the untuned base depends on: the exact base (`base_record`: source,
    revision, GGUF sha256; with its dtype, tokenizer and quantization, and the seed of a from-scratch model), the
    held-out rows as token ids (prompts, references, loss labels) and the generation settings. Two runs with equal
    fingerprints score the base alike, so a sweep over methods or learning rates evaluates it once
    (`base_evaluation`)."""
    from .bases import base_record

    def column(rows, name: str) -> list:
        return list(rows[name]) if name in getattr(rows, "column_names", ()) else []

    model = dict(
        base_record(model_args),
        dtype=model_args.dtype,
        from_scratch=model_args.from_scratch,
        tokenizer_name=model_args.tokenizer_name,
        load_in_8bit=model_args.load_in_8bit,
        load_in_4bit=model_args.load_in_4bit,
        init_seed=seed if model_args.from_scratch else None,
    )
    payload = dict(
        model=model,
        prompt_format=data_args.prompt_format,
        max_new_tokens=data_args.max_new_tokens,
        eval_batch_size=eval_batch_size,
        prompts=column(eval_rows, "input_ids"),
        references=column(eval_rows, "reference"),
        loss_input_ids=column(loss_rows, "input_ids"),
        loss_labels=column(loss_rows, "labels"),
    )
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def read_base_evaluation(path: str | Path, fingerprint: str, num_rows: int) -> dict[str, Any]:
    """Read an earlier run's `base_evaluation.json` (JSON only) and check it is an evaluation of this run's base on
    this run's rows (`fingerprint`, from `base_fingerprint`), before the model loads.

    Args:
        path: the earlier run's `output_dir`, or its `base_evaluation.json`.
        fingerprint: this run's `base_fingerprint`.
        num_rows: this run's held-out rows (generations must match them one to one).

    Returns:
        `{"path", "record", "result"}` for `HeldOutEvaluation.evaluate_base`.

    Raises:
        RecipeError: if the file is missing, is not a base evaluation, or belongs to another base, other rows or
            other generation settings. The message names the fix: drop `base_evaluation` to evaluate this base.
    """
    from .configs import RecipeError

    folder = Path(path)
    file = folder / BASE_EVALUATION_FILE if folder.is_dir() else folder
    fix = "point it at the output_dir of a finished run with the same base and held-out rows, or drop it"
    if not file.is_file():
        raise RecipeError(f"`base_evaluation`: {file} does not exist; {fix} (every run writes {BASE_EVALUATION_FILE}).")
    try:
        payload = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RecipeError(f"`base_evaluation`: {file} is not readable JSON ({error}); {fix}.") from None

    if not _is_base_evaluation(payload):
        raise RecipeError(f"`base_evaluation`: {file} is not a base evaluation hf_fedkseed wrote; {fix}.")
    if payload["fingerprint"] != fingerprint:
        raise RecipeError(
            f"`base_evaluation`: {file} evaluated another base, other held-out rows or other generation settings "
            f"(fingerprint {payload['fingerprint'][:12]}, this run's {fingerprint[:12]}); {fix}."
        )
    if payload["result"] is not None and len(payload["result"]["predictions"]) != num_rows:
        raise RecipeError(f"`base_evaluation`: {file} holds generations for other rows than its fingerprint; {fix}.")
    record = {key: payload["record"].get(key) for key in ("rougeL", "eval_loss")}
    return {"path": str(file), "record": record, "result": payload["result"]}


def _is_base_evaluation(payload: Any) -> bool:
    """Whether `payload` has the shape `HeldOutEvaluation.base_evaluation` writes."""

    def number(value: Any) -> bool:
        return value is None or (type(value) in (int, float) and math.isfinite(value))

    if not isinstance(payload, dict) or payload.get("format") != _BASE_EVALUATION_FORMAT:
        return False
    record, result = payload.get("record"), payload.get("result")
    if not isinstance(payload.get("fingerprint"), str) or not isinstance(record, dict):
        return False
    if not (number(record.get("rougeL")) and number(record.get("eval_loss"))):
        return False
    if result is None:  # no generation rows: the loss alone
        return True
    predictions, scores = (result.get(key) if isinstance(result, dict) else None for key in ("predictions", "scores"))
    return (
        number(result.get("rougeL"))
        and isinstance(predictions, list)
        and isinstance(scores, list)
        and len(predictions) == len(scores)
        and all(isinstance(text, str) for text in predictions)
        and all(number(score) for score in scores)
    )
