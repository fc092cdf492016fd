"""The recipe pipeline: held-out evaluation every N rounds, predictions.jsonl and the plot, on the smoke recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_fedkseed.configs import parse_recipe
from hf_fedkseed.evaluation import rouge_l
from hf_fedkseed.pipeline import run_training

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
