"""The model card: the packaged template, rendered with huggingface_hub.ModelCard for KSeed and other methods."""

from __future__ import annotations

import json
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, token_batch
from huggingface_hub import ModelCard

from hf_fedkseed.artifacts import run_summary
from hf_fedkseed.configs import parse_recipe
from hf_fedkseed.delta import base_weights_sha256, save_kseed_delta
from hf_fedkseed.model_card import MODEL_CARD_TEMPLATE, render_model_card, write_model_card
from hf_fedkseed.optimizer import KSeedZOOptimizer

ROOT = Path(__file__).resolve().parents[1]

SUMMARY = {
    "method": "fedkseed_pro",
    "model_name": "llama-dolly-fedkseed",
    "hub_model_id": "me/llama-dolly-fedkseed",
    "base_model": "meta-llama/Llama-3.2-1B",
    "base_model_revision": "main",
    "base_model_source": "hub",
    "dataset_name": "databricks/databricks-dolly-15k",
    "dataset_format": "dolly",
    "num_clients": 200,
    "clients_per_round": 10,
    "participation": 0.05,
    "rounds": 40,
    "rounds_completed": 40,
    "local_steps": 200,
    "num_seeds": 4096,
    "zo_eps": 0.0005,
    "pro": True,
    "learning_rate": 3e-7,
    "lr_scheduler_type": "constant",
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "partition": "dirichlet",
    "global_step": 80000,
    "seed": 42,
    "bytes_per_client_per_round": 17238.5,
    "total_bytes": 6895400,
    "eval": {"rougeL_before": 0.2512, "rougeL_after": 0.3377, "eval_loss_before": 2.5, "eval_loss_after": 2.1},
}


@pytest.fixture(scope="module")
def delta_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("delta")
    model = tiny_llama()
    base_hash = base_weights_sha256(model)
    optimizer = KSeedZOOptimizer(model, lr=1e-2, eps=1e-3, num_seeds=64, seed=42)
    batch = token_batch()
    for _ in range(3):
        optimizer.step(lambda: model(input_ids=batch, labels=batch).loss)
    save_kseed_delta(
        optimizer,
        directory,
        base_weights_sha256=base_hash,
        base_model="meta-llama/Llama-3.2-1B",
        base_model_revision="main",
        base_model_source="hub",
    )
    return directory


def test_the_template_ships_inside_the_package():
    packaged = files("hf_fedkseed") / "model_cards" / "kseed_model_card.md"
    assert packaged.is_file()
    assert packaged.read_text() == (ROOT / "model_cards" / "kseed_model_card.md").read_text()
    assert MODEL_CARD_TEMPLATE.read_text() == packaged.read_text()


def test_kseed_card_holds_the_setup_bytes_results_loading_versions_and_citation(delta_dir):
    path = write_model_card(delta_dir, SUMMARY, repo_id="me/llama-dolly-fedkseed")
    text = path.read_text()
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers" and card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert card.data.datasets == ["databricks/databricks-dolly-15k"] and "fedkseed" in card.data.tags
    assert card.data.eval_results[0].metric_value == 0.3377
    for expected in (
        "tuned by **FedKSeed-Pro** on [databricks/databricks-dolly-15k]",
        "| clients | 200 |",
        "| clients per round | 10 (participation 0.05) |",
        "| rounds | 40 |",
        "| local steps per client and round (tau) | 200 |",
        "| candidate seeds (K) | 4096 |",
        "| perturbation scale (eps) | 0.0005 |",
        "| FedKSeed-Pro (importance-sampled seeds) | on |",
        "| learning rate | 3e-07 (constant schedule) |",
        "| optimizer | KSeed ZO: zeroth-order SGD over K = 4096 candidate seeds",
        "| per client per round | 16.8 KiB |",
        "| total, all rounds | 6.6 MiB |",
        "| Rouge-L | 0.2512 | 0.3377 |",
        "| held-out loss | 2.5000 | 2.1000 |",
        'AutoModelForCausalLM.from_pretrained("me/llama-dolly-fedkseed")',
        'base = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B", dtype=torch.float32)',
        'model = apply_kseed(base, "me/llama-dolly-fedkseed")',
        f"- transformers: {version('transformers')}",
        f"- torch: {version('torch')}",
        "@inproceedings{qin2024fedkseed",
        "Communication Cost under",
    ):
        assert expected in text, expected
    size = (delta_dir / "kseed_config.json").stat().st_size + (delta_dir / "kseed_delta.safetensors").stat().st_size
    assert f"{size:,} bytes" in text  # the delta's measured size on disk
    config = json.loads((delta_dir / "kseed_config.json").read_text())
    assert f"| base weights hash | `{config['base_weights_sha256']}` |" in text
    assert f"| engine | `{config['engine']}` version {config['engine_version']} (z drawn on `cpu`) |" in text
    assert "adamw" not in text.lower()  # the Trainer's default card would name AdamW


def test_a_baseline_card_has_no_delta_section(tmp_path):
    summary = dict(SUMMARY, method="fedit", optimizer="AdamW on LoRA adapters", num_seeds=None)
    text = write_model_card(tmp_path, summary).read_text()
    assert "tuned by **FedIT (LoRA)**" in text and "| optimizer | AdamW on LoRA adapters |" in text
    assert "apply_kseed" not in text and "candidate seeds (K)" not in text
    assert 'from_pretrained("me/llama-dolly-fedkseed")' in text  # the summary's hub_model_id
    with pytest.raises(ValueError, match="needs `method`"):
        render_model_card({})


def test_a_config_built_base_is_named_by_its_config_and_hash(delta_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    model_args, data_args, zo_args, federated_config, training_args = parse_recipe("recipes/smoke.yaml")
    summary = run_summary(model_args, data_args, zo_args, federated_config, training_args)
    assert summary["base_model_source"] == "config" and summary["method"] == "fedkseed_pro"
    card = render_model_card(summary, delta_config={"base_weights_sha256": "sha256:abc", "seed": 42})
    text = str(card)
    assert card.data.base_model is None and card.data.datasets is None  # local paths are not Hub ids
    assert "built from the config `hf_fedkseed/resources/tiny-llama` with random weights (seed 42)" in text
    assert "`hf_fedkseed/resources/quickstart` (natural_instructions format)" in text
    assert 'from_pretrained("smoke")' in text  # no hub_model_id: the output directory's name
    assert "torch.manual_seed(42)" in text and "AutoConfig.from_pretrained(" in text
    assert "No evaluation was recorded" in text


def test_the_config_snippet_rebuilds_the_quickstart_base(monkeypatch):
    """The card's from-config recipe gives exactly the weights `load_model` builds (so its hash check passes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_fedkseed.configs import ModelArguments
    from hf_fedkseed.pipeline import load_model

    monkeypatch.chdir(ROOT)
    args = ModelArguments(model_name_or_path="hf_fedkseed/resources/tiny-llama", from_scratch=True)
    built = load_model(args, seed=42)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(42)
        snippet = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained("hf_fedkseed/resources/tiny-llama"), dtype=torch.float32
        )
    assert base_weights_sha256(snippet) == base_weights_sha256(built)
