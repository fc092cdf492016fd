"""The recipe pipeline: held-out evaluation every N rounds, predictions.jsonl and the plot, and a base evaluation
reused across a sweep, on the smoke recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_fedkseed.configs import RecipeError, parse_recipe
from hf_fedkseed.evaluation import rouge_l
from hf_fedkseed.pipeline import run_training
from hf_fedkseed.reporting import BASE_EVALUATION_FILE

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--rounds", "3", "--local_steps", "2", "--max_eval_samples", "4", "--max_new_tokens", "4"]


def train(output: Path, *overrides: str) -> dict:
    recipe = parse_recipe(ROOT / "recipes" / "smoke.yaml", [*SHORT, "--output_dir", str(output), *overrides])
    return run_training(*recipe)


def test_periodic_evaluation_records_rounds_bytes_and_predictions_without_changing_training(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the repository root
    plain = train(tmp_path / "plain")
    every = train(tmp_path / "every", "--eval_every_rounds", "1")

    # Evaluating between rounds only measures: the tuned weights are bit-identical to a run without it.
    weights_plain = load_file(tmp_path / "plain" / "model.safetensors")
    weights_every = load_file(tmp_path / "every" / "model.safetensors")
    assert weights_plain.keys() == weights_every.keys()
    assert all(torch.equal(weights_plain[name], weights_every[name]) for name in weights_plain)
    assert every["rougeL_after"] == plain["rougeL_after"] and every["eval_loss_after"] == plain["eval_loss_after"]

    # One record before tuning, after each round, and none twice; bytes are cumulative per client.
    records = every["evaluations"]
    assert [record["round"] for record in records] == [0, 1, 2, 3]
    assert [record["round"] for record in plain["evaluations"]] == [0, 3]
    rounds = [json.loads(line) for line in (tmp_path / "every" / "rounds.jsonl").read_text().splitlines()]
    cumulative = [0.0]
    for entry in rounds:
        cumulative.append(cumulative[-1] + entry["bytes_per_client"])
    assert [record["bytes_per_client"] for record in records] == cumulative
    assert records[0]["eval_loss"] == every["eval_loss_before"] and records[-1]["eval_loss"] == every["eval_loss_after"]
    saved = json.loads((tmp_path / "every" / "eval_results.json").read_text())
    assert saved["evaluations"] == records

    # predictions.jsonl: one line per held-out row, whose scores average to the reported Rouge-L.
    lines = [json.loads(line) for line in (tmp_path / "every" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == every["num_eval_samples"] == 4
    for line in lines:
        assert set(line) == {"category", "prompt", "reference", "before", "after", "rougeL_before", "rougeL_after"}
        assert line["prompt"].endswith("### Response:\n") and line["category"].startswith("task00")
        assert line["rougeL_after"] == rouge_l(line["after"], line["reference"])
    assert sum(line["rougeL_before"] for line in lines) / 4 == pytest.approx(every["rougeL_before"], rel=1e-12)
    assert sum(line["rougeL_after"] for line in lines) / 4 == pytest.approx(every["rougeL_after"], rel=1e-12)
    assert (tmp_path / "every" / "training.png").stat().st_size > 20_000  # four panels


def test_a_sweep_reuses_the_base_evaluation_of_the_same_base_and_refuses_another(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    first = train(tmp_path / "first")
    assert (tmp_path / "first" / BASE_EVALUATION_FILE).is_file()  # every run writes its base's evaluation

    # Another learning rate from the same base: the base is not evaluated again, and the run is otherwise the same
    # as one that evaluates it (same before, same after, same predictions of the base).
    reused = train(tmp_path / "reused", "--learning_rate", "2e-3", "--base_evaluation", str(tmp_path / "first"))
    fresh = train(tmp_path / "fresh", "--learning_rate", "2e-3")
    for key in ("rougeL_before", "eval_loss_before", "per_category_before"):
        assert reused[key] == first[key] == fresh[key], key
    assert reused["rougeL_after"] == fresh["rougeL_after"] and reused["eval_loss_after"] == fresh["eval_loss_after"]
    base = reused["evaluations"][0]
    assert base["seconds"] == 0.0 and base["reused_from"] == str(tmp_path / "first" / BASE_EVALUATION_FILE)
    assert fresh["evaluations"][0]["seconds"] > 0.0 and "reused_from" not in fresh["evaluations"][0]

    def predictions(name: str) -> list[dict]:
        lines = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    assert predictions("reused") == predictions("fresh")
    # A run that reused one can itself be reused: it writes the same base evaluation under the same fingerprint.
    written = json.loads((tmp_path / "reused" / BASE_EVALUATION_FILE).read_text())
    assert written["fingerprint"] == json.loads((tmp_path / "fresh" / BASE_EVALUATION_FILE).read_text())["fingerprint"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--max_new_tokens", "3"], "evaluated another base, other held-out rows or other generation settings"),
        (["--seed", "7"], "evaluated another base"),  # a from-scratch base is another model under another seed
        (["--max_eval_samples", "3"], "evaluated another base"),
    ],
)
def test_base_evaluation_of_another_base_or_rows_stops_before_the_model_loads(
    tmp_path, monkeypatch, overrides, message
):
    monkeypatch.chdir(ROOT)
    train(tmp_path / "first", "--rounds", "1", "--local_steps", "1")

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the recipe error")

    monkeypatch.setattr("hf_fedkseed.pipeline.load_model", no_model)
    with pytest.raises(RecipeError, match=message):
        train(tmp_path / "second", *overrides, "--base_evaluation", str(tmp_path / "first"))
    assert not (tmp_path / "second").exists()  # no empty output directory left behind


def test_base_evaluation_that_is_missing_or_not_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(RecipeError, match="does not exist; point it at the output_dir of a finished run"):
        train(tmp_path / "run", "--base_evaluation", str(tmp_path / "nowhere"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / BASE_EVALUATION_FILE).write_text("{not json")
    with pytest.raises(RecipeError, match="is not readable JSON"):
        train(tmp_path / "run", "--base_evaluation", str(bad))
    (bad / BASE_EVALUATION_FILE).write_text(json.dumps({"format": 1, "fingerprint": "x", "record": {"rougeL": "high"}}))
    with pytest.raises(RecipeError, match="is not a base evaluation hf_fedkseed wrote"):
        train(tmp_path / "run", "--base_evaluation", str(bad / BASE_EVALUATION_FILE))
