"""Every shipped recipe parses into valid settings without touching the network, and carries its launch command."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_fedkseed.configs import parse_recipe

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))


def test_the_recipes_are_there():
    assert {path.stem for path in RECIPES} >= {"alpaca", "natural_instructions", "dolly", "quickstart", "smoke"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_parses_and_documents_its_command(recipe):
    model_args, data_args, zo_args, federated, training = parse_recipe(recipe)
    assert f"hf-fedkseed train recipes/{recipe.name}" in recipe.read_text()  # the header gives the exact command
    assert federated.rounds >= 1 and federated.local_steps >= 1
    assert training.max_grad_norm == 0.0 and training.report_to in ([], ["none"], "none", None)
    if recipe.stem not in ("quickstart", "smoke"):  # the paper's settings
        assert model_args.model_name_or_path == "datajuicer/LLaMA-1B-dj-refine-150B"
        assert (zo_args.num_seeds, zo_args.zo_eps, training.learning_rate) == (4096, 5e-4, 3e-7)
        assert (federated.local_steps, federated.client_fraction) == (200, 0.05)
        assert training.per_device_train_batch_size == 1
        assert data_args.max_length == 1024 and data_args.max_new_tokens == 128


def test_paper_specific_settings():
    _, data, _, federated, _ = parse_recipe(RECIPE_DIR / "dolly.yaml")
    assert (federated.partition, federated.num_clients, federated.dirichlet_alpha, federated.rounds) == (
        "dirichlet",
        200,
        0.5,
        60,
    )
    assert data.held_out_categories == ["summarization"]
    _, data, _, federated, _ = parse_recipe(RECIPE_DIR / "natural_instructions.yaml")
    assert (federated.partition, federated.partition_column, federated.rounds) == ("natural", "category", 40)
    _, _, _, federated, _ = parse_recipe(RECIPE_DIR / "natural_instructions.yaml", ["--pro", "true"])
    assert federated.pro is True  # FedKSeed-Pro is one flag away
