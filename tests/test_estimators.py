"""Beyond the paper's step: FZOO's normalised one-sided estimates and tensor-subset directions, still seed replay."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_llama, token_batch
from test_callback import config, run

from hf_fedkseed import KSeedZOOptimizer
from hf_fedkseed.configs import RecipeError, ZOArguments, parse_recipe
from hf_fedkseed.perturbation import CounterEngine, TensorSubsetEngine, get_engine
from hf_fedkseed.zo import check_estimator, normalized_one_sided


def named(model):
    return [(name, p) for name, p in model.named_parameters()]


# ---------------------------------------------------------------------------------------------- tensor subsets
def test_a_subset_direction_is_the_inner_z_on_its_chosen_tensors_and_zero_elsewhere():
    model = tiny_llama()
    params = named(model)
    subset, inner = get_engine("counter@tensors=0.5"), CounterEngine()
    assert isinstance(subset, TensorSubsetEngine) and subset.name == "counter@tensors=0.5"
    counts = []
    for seed in (3, 4, 5, 6):
        z, full = subset.generate(params, seed), inner.generate(params, seed)
        chosen = [subset.chosen(seed, name) for name, _ in params]
        counts.append(sum(chosen))
        for zi, fi, picked in zip(z, full, chosen, strict=True):
            assert torch.equal(zi, fi) if picked else not zi.any()
    assert all(1 <= count < len(params) for count in counts)  # some of the 21 tensors, never all
    subsets = {tuple(subset.chosen(seed, name) for name, _ in params) for seed in range(8)}
    assert len(subsets) > 1


def test_subset_replay_equals_the_steps_it_replays_and_decay_reaches_untouched_tensors():
    engine = get_engine("counter@tensors=0.3")
    stepped, replayed = tiny_llama(), tiny_llama()
    seeds, coefficients = [11, 12, 13, 11], [0.5, -0.25, 0.125, 1.0]
    for seed, coefficient in zip(seeds, coefficients, strict=True):
        engine.add_noise_(named(stepped), seed, coefficient)
    assert engine.replay_(named(replayed), seeds, coefficients) == 4
    for a, b in zip(stepped.parameters(), replayed.parameters(), strict=True):
        assert torch.equal(a, b)
    decayed, base = tiny_llama(), tiny_llama()
    engine.add_noise_(named(decayed), 11, 0.0, 0.5)  # beta only: every tensor halves, chosen or not
    for a, b in zip(decayed.parameters(), base.parameters(), strict=True):
        torch.testing.assert_close(a, 0.5 * b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name", ["counter@tensors=0", "counter@tensors=1.5", "counter@tensors=x", "nope@tensors=0.5", "counter@layers=1"]
)
def test_a_bad_subset_engine_name_is_refused_with_the_spelling(name):
    with pytest.raises(ValueError, match=r"tensors=|Unknown perturbation"):
        get_engine(name)


# ---------------------------------------------------------------------------------------------- FZOO
def test_normalized_one_sided_is_the_fzoo_formula():
    losses = [2.0, 2.5, 1.0, 2.25]
    perturbed = losses[1:]
    mean = sum(perturbed) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in perturbed) / 2)
    assert normalized_one_sided(losses) == pytest.approx([(x - 2.0) / (3 * std) for x in perturbed], rel=1e-12)
    assert normalized_one_sided([1.0, 2.0, 2.0]) is None  # no spread: no step
    assert normalized_one_sided([1.0, float("nan"), 2.0]) is None


@pytest.mark.parametrize(
    "estimator, directions, match",
    [("two_point", 2, "one direction"), ("fzoo", 1, "at least 2"), ("adam", 1, "Unknown"), ("fzoo", 0, "positive")],
)
def test_estimator_settings_are_checked(estimator, directions, match):
    with pytest.raises(ValueError, match=match):
        check_estimator(estimator, directions)
    with pytest.raises(ValueError, match=match):
        KSeedZOOptimizer(tiny_llama(), lr=1e-3, estimator=estimator, directions=directions)


@pytest.mark.parametrize("engine", ["counter", "counter@tensors=0.5"])
def test_an_fzoo_step_moves_w_by_minus_lr_times_the_normalised_slopes(engine):
    model, batch = tiny_llama(), token_batch()
    reference = tiny_llama()
    optimizer = KSeedZOOptimizer(
        model, lr=1e-2, eps=1e-3, num_seeds=16, seed=1, estimator="fzoo", directions=3, engine=engine
    )
    optimizer.step(lambda: model(input_ids=batch, labels=batch).loss)
    step = optimizer.last_step
    assert step["skipped"] is None and len(step["directions"]) == 3
    # recompute the N + 1 losses on the untouched copy
    z_engine = get_engine(engine)
    with torch.no_grad():
        losses = [float(reference(input_ids=batch, labels=batch).loss)]
        for direction in step["directions"]:
            probe = tiny_llama()
            z_engine.add_noise_(named(probe), direction["seed"], 1e-3)
            losses.append(float(probe(input_ids=batch, labels=batch).loss))
    slopes = normalized_one_sided(losses)
    assert [d["projected_grad"] for d in step["directions"]] == pytest.approx(slopes, rel=1e-4, abs=1e-6)
    # the weights are w0 - sum_j A_j z_j over the accumulators, which hold lr * slope per direction
    expected = torch.zeros(16, dtype=torch.float64)
    for direction in step["directions"]:
        expected[direction["seed_index"]] += 1e-2 * direction["projected_grad"]
    assert torch.allclose(optimizer.accumulators, expected, rtol=0, atol=1e-15)
    rebuilt = tiny_llama()
    optimizer.reconstruct_(named(rebuilt))
    for a, b in zip(model.parameters(), rebuilt.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # a few float32 ulps


def test_fzoo_steps_lower_the_loss_of_a_fixed_batch():
    model, batch = tiny_llama(), token_batch()
    optimizer = KSeedZOOptimizer(model, lr=3e-3, eps=1e-3, num_seeds=256, seed=0, estimator="fzoo", directions=4)
    with torch.no_grad():
        before = float(model(input_ids=batch, labels=batch).loss)
    for _ in range(60):
        optimizer.step(lambda: model(input_ids=batch, labels=batch).loss)
    with torch.no_grad():
        after = float(model(input_ids=batch, labels=batch).loss)
    assert after < before - 0.05, (before, after)


def test_an_fzoo_checkpoint_refuses_a_two_point_optimizer():
    model = tiny_llama()
    state = KSeedZOOptimizer(model, lr=1e-3, num_seeds=8, estimator="fzoo", directions=2).state_dict()
    with pytest.raises(ValueError, match="estimator 'fzoo' over 2"):
        KSeedZOOptimizer(model, lr=1e-3, num_seeds=8).load_state_dict(state)


# ---------------------------------------------------------------------------------------------- in the Trainer
def fzoo_run(tmp_path, federated_config, engine="counter@tensors=0.5", **kwargs):
    def factory(model):
        return KSeedZOOptimizer(
            model, lr=2e-3, eps=1e-3, num_seeds=32, seed=7, estimator="fzoo", directions=3, engine=engine
        )

    return run(tmp_path, federated_config, optimizer_factory=factory, **kwargs)


def test_fzoo_rounds_in_the_trainer_send_one_pair_per_direction_and_replay_exactly(tmp_path):
    model, optimizer, federated, _ = fzoo_run(tmp_path, config(pro=True, rounds=3))
    records = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    # Pro: 4 steps x 3 directions = 12 scheduled indices down; 12 (index, g) pairs and one lr up, per client
    assert records[0]["bytes_down"] == 2 * (32 * 4 + 12 + 30)
    assert records[0]["bytes_up"] == 2 * (12 * 5 + 4 + 30)
    assert federated.server.pro_count.sum().item() == 3 * 2 * 4 * 3
    assert federated.server.accumulators.abs().sum() > 0
    base = tiny_llama()
    with torch.no_grad():
        optimizer.engine.replay_(
            named(base), federated.server.seed_pool.tolist(), (-federated.server.accumulators).tolist()
        )
    for trained, rebuilt in zip(model.parameters(), base.parameters(), strict=True):
        torch.testing.assert_close(trained, rebuilt, rtol=0, atol=1e-5)


def test_fzoo_resume_from_a_checkpoint_ends_with_the_same_weights(tmp_path):
    uninterrupted, _, full, _ = fzoo_run(tmp_path / "full", config(rounds=3, pro=True))
    fzoo_run(tmp_path / "killed", config(rounds=1, pro=True), save_strategy="steps", save_steps=8, max_steps=8)
    resumed, _, again, _ = fzoo_run(
        tmp_path / "killed", config(rounds=3, pro=True), resume=str(tmp_path / "killed" / "checkpoint-8")
    )
    for a, b in zip(uninterrupted.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(full.server.accumulators, again.server.accumulators)


# ---------------------------------------------------------------------------------------------- recipes
def test_recipe_fields_build_the_engine_and_refuse_what_cannot_run():
    assert ZOArguments(zo_tensor_fraction=0.25).engine_name == "counter@tensors=0.25"
    assert (
        ZOArguments(engine="counter-rademacher", zo_tensor_fraction=0.5).engine_name == "counter-rademacher@tensors=0.5"
    )
    assert ZOArguments().engine_name is None
    with pytest.raises(ValueError, match="zo_tensor_fraction"):
        ZOArguments(zo_tensor_fraction=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        ZOArguments(zo_estimator="fzoo")
    with pytest.raises(RecipeError, match="fedavg"):
        parse_recipe("recipes/smoke.yaml", ["--zo_estimator", "fzoo", "--zo_directions", "4", "--method", "fedavg"])
