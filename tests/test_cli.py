"""The `hf-fedkseed` console script: usage errors (exit 2, one message), fast help, env, the quickstart end to end."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_fedkseed import __version__
from hf_fedkseed.cli import main

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = """\
model_name_or_path: some/model
dataset_name: some/data
dataset_format: dolly
rounds: 2
clients_per_round: 1
num_clients: 4
report_to: none
"""


def write_recipe(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_version_and_env(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == __version__
    assert main(["env"]) == 0
    report = capsys.readouterr().out
    assert f"hf-fedkseed {__version__}" in report and "torch " in report and "transformers " in report


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: hf-fedkseed" in capsys.readouterr().out


def test_help_is_fast_because_nothing_heavy_is_imported():
    code = (
        "import sys; from hf_fedkseed.cli import build_parser; build_parser().format_help(); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("extra_yaml", "flags", "message"),
    [
        ("learnig_rate: 0.1\n", [], "unknown key(s) in {recipe}: `learnig_rate` (did you mean `learning_rate`?)"),
        ("", ["--learning_rate", "fast"], "argument --learning_rate/--learning-rate: invalid float value: 'fast'"),
        ("rounds: many\n", [], "argument --rounds: invalid int value: 'many'"),
        (
            "partition: random\n",
            [],
            "argument --partition: invalid choice: 'random' (choose from 'iid', 'dirichlet', 'natural')",
        ),
        ("", ["--bogus", "1"], "unknown option(s): --bogus; see `hf-fedkseed train --help`"),
        ("client_fraction: 0.5\n", [], "Set exactly one of `clients_per_round` and `client_fraction`."),
        (
            "sync_precision: int4\n",
            [],
            "argument --sync_precision/--sync-precision: invalid choice: 'int4' (choose from 'float32', 'int8')",
        ),
        ("method: fedavg\n", ["--sync_precision", "int8"], "`method: fedavg` sends no accumulators"),
    ],
)
def test_train_usage_errors_exit_2_with_one_message(tmp_path, capsys, extra_yaml, flags, message):
    recipe = write_recipe(tmp_path, MINIMAL + extra_yaml)
    assert main(["train", recipe, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-fedkseed train: error: ")
    assert message.format(recipe=recipe) in err
    assert "Traceback" not in err


def test_a_missing_base_evaluation_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    output = tmp_path / "run"
    assert main(["train", "recipes/smoke.yaml", "--output_dir", str(output), "--base_evaluation", "nowhere"]) == 2
    err = capsys.readouterr().err  # after the tokenizing progress bars: the data are read before the check
    assert "hf-fedkseed train: error: `base_evaluation`: nowhere does not exist; point it at the output_dir" in err
    assert "Traceback" not in err and not output.exists()


def test_missing_recipe_and_missing_fields(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "not found; pass the path of a YAML file" in capsys.readouterr().err
    assert main(["train", write_recipe(tmp_path, "rounds: 2\n")]) == 2
    err = capsys.readouterr().err
    assert "the following arguments are required: --model_name_or_path" in err and "--dataset_format" in err
    assert main(["train", write_recipe(tmp_path, "- a\n- b\n")]) == 2
    assert "must be a mapping of field: value" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "hf_fedkseed.cli", "fly"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "invalid choice: 'fly'" in result.stderr
    assert "Traceback" not in result.stderr


PUBLIC_API = {
    "BASELINE_METHODS", "ChunkedGeneratorEngine", "ClientUpdate", "CounterEngine", "DEFAULT_ENGINE", "ENGINES",
    "FedAvgCallback", "FederatedCallback", "FederatedConfig", "FlowerConfig", "FlowerRun", "FreshSeedZOOptimizer",
    "KSeedArtifactsCallback", "KSeedClient", "KSeedDelta", "KSeedServer", "KSeedZOOptimizer", "METHODS",
    "PerturbationEngine", "PretrainConfig", "ProtocolError", "RademacherCounterEngine", "SequentialGeneratorEngine",
    "ShiftCounterEngine", "SyncMessage", "UpdateMessage", "apply_kseed", "base_weights_sha256", "get_engine",
    "load_kseed_delta", "make_client_app", "make_server_app", "pretrain_base", "push_output_dir", "save_kseed_delta",
    "simulate",
}  # fmt: skip


def test_the_public_api_is_pinned_and_every_name_resolves():
    """What users import, from one list: adding or dropping a public name is a deliberate change of this set."""
    import hf_fedkseed

    assert set(hf_fedkseed.__all__) == PUBLIC_API
    assert hf_fedkseed.__all__ == sorted(hf_fedkseed._EXPORTS)
    for name in hf_fedkseed.__all__:
        value = getattr(hf_fedkseed, name)
        assert value is not None and not name.startswith("_")
        module = importlib.import_module(hf_fedkseed._EXPORTS[name], "hf_fedkseed")
        assert getattr(module, name) is value
    with pytest.raises(AttributeError):
        hf_fedkseed.run_summary  # noqa: B018  (internal: not exported)


def test_quickstart_end_to_end_with_a_short_override(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the repository root, as in the README
    output = tmp_path / "quickstart"
    code = main(
        [
            "train",
            "recipes/smoke.yaml",
            "--rounds",
            "2",
            "--local_steps",
            "3",
            "--max_eval_samples",
            "4",
            "--max_new_tokens",
            "4",
            "--output_dir",
            str(output),
        ]
    )
    assert code == 0
    results = json.loads((output / "eval_results.json").read_text())
    assert results["rounds"] == 2 and results["num_eval_samples"] == 4
    assert 0.0 <= results["rougeL_before"] <= 1.0 and 0.0 <= results["rougeL_after"] <= 1.0
    rounds = [json.loads(line) for line in (output / "rounds.jsonl").read_text().splitlines()]
    assert [entry["round"] for entry in rounds] == [0, 1]
    assert results["bytes_per_client_per_round"] == pytest.approx(rounds[0]["bytes_per_client"])
    for name in ("model.safetensors", "config.json", "training.png", "tokenizer_config.json"):
        assert (output / name).is_file(), name
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(output)  # the saved model loads with transformers alone

    # The KSeed delta and the card: the delta rebuilds the merged model on the recipe's base.
    from hf_fedkseed.configs import ModelArguments
    from hf_fedkseed.delta import apply_kseed
    from hf_fedkseed.pipeline import load_model

    card = (output / "README.md").read_text()
    assert "FedKSeed-Pro" in card and "| rounds | 2 |" in card and "adamw" not in card.lower()
    base = load_model(ModelArguments("hf_fedkseed/resources/tiny-llama", from_scratch=True), seed=42)
    rebuilt = apply_kseed(base, output)
    for name, param in rebuilt.named_parameters():
        torch.testing.assert_close(param, merged.get_parameter(name), rtol=0, atol=1e-6)

    capsys.readouterr()
    evaluated = output / "eval.json"
    code = main(
        [
            "eval",
            str(output),
            "--dataset_name",
            "hf_fedkseed/resources/quickstart",
            "--dataset_format",
            "natural_instructions",
            "--max_eval_samples",
            "3",
            "--max_new_tokens",
            "4",
            "--output",
            str(evaluated),
        ]
    )
    assert code == 0
    report = json.loads(evaluated.read_text())
    assert report["num_samples"] == 3 and 0.0 <= report["rougeL"] <= 1.0
    assert main(["eval", str(tmp_path / "missing"), "--dataset_name", "x", "--dataset_format", "dolly"]) == 2
