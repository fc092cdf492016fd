"""KSeedZOOptimizer on the closure path: agreement with the reference, replay, skips, schedules, state, validation."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import max_abs_diff, tiny_llama, token_batch

from hf_fedkseed import KSeedZOOptimizer, get_engine
from hf_fedkseed.reference import ReferenceZO, official_no_decay


def loss_closure(model, batch):
    return lambda: model(input_ids=batch, labels=batch).loss


def test_matches_the_official_reference_step_by_step():
    model, batch = tiny_llama(), token_batch()
    reference_model = copy.deepcopy(model)
    optimizer = KSeedZOOptimizer(model, lr=1e-3, eps=1e-3, num_seeds=32, seed=4, engine="torch-sequential")
    reference = ReferenceZO(reference_model, lr=1e-3, eps=1e-3)
    for _ in range(30):
        optimizer.step(loss_closure(model, batch))
        reference_grad = reference.step(loss_closure(reference_model, batch), seed=optimizer.last_step["seed"])
        assert optimizer.last_step["projected_grad"] == pytest.approx(reference_grad, rel=1e-3, abs=1e-2)
    for (name, mine), theirs in zip(model.named_parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5, msg=name)
    assert max_abs_diff(model, tiny_llama()) > 1e-3  # and the weights did move


def test_weight_decay_matches_the_reference():
    model, batch = tiny_llama(), token_batch()
    reference_model = copy.deepcopy(model)
    kwargs = dict(lr=1e-3, eps=1e-3, weight_decay=0.1)
    optimizer = KSeedZOOptimizer(
        model, num_seeds=8, engine="torch-sequential", no_decay=lambda name, p: official_no_decay(name), **kwargs
    )
    reference = ReferenceZO(reference_model, **kwargs)
    for _ in range(10):
        optimizer.step(loss_closure(model, batch))
        reference.step(loss_closure(reference_model, batch), seed=optimizer.last_step["seed"])
    for mine, theirs in zip(model.parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


def test_default_engine_matches_a_four_pass_step_on_the_same_z():
    """The fused 3-regeneration step equals perturb(+1), perturb(-2), perturb(+1), update() on the same engine."""
    model, batch = tiny_llama(), token_batch()
    naive_model = copy.deepcopy(model)
    optimizer = KSeedZOOptimizer(model, lr=2e-3, eps=1e-3, num_seeds=16, seed=0)
    engine = get_engine(optimizer.engine.name)
    naive_params = [(n, p) for n, p in naive_model.named_parameters()]
    for _ in range(20):
        optimizer.step(loss_closure(model, batch))
        seed, eps, lr = optimizer.last_step["seed"], 1e-3, 2e-3
        with torch.no_grad():
            engine.add_noise_(naive_params, seed, eps)
            loss_plus = naive_model(input_ids=batch, labels=batch).loss.item()
            engine.add_noise_(naive_params, seed, -2 * eps)
            loss_minus = naive_model(input_ids=batch, labels=batch).loss.item()
            engine.add_noise_(naive_params, seed, eps)
            engine.add_noise_(naive_params, seed, -lr * (loss_plus - loss_minus) / (2 * eps))
    for mine, theirs in zip(model.parameters(), naive_model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


def test_three_regenerations_per_step():
    model, batch = tiny_llama(), token_batch()
    optimizer = KSeedZOOptimizer(model, lr=1e-3, num_seeds=4)
    calls = []
    original = optimizer.engine.add_noise_
    optimizer.engine.add_noise_ = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    for _ in range(5):
        optimizer.step(loss_closure(model, batch))
    assert len(calls) == 15


def test_accumulators_replay_any_learning_rate_schedule():
    model, batch = tiny_llama(), token_batch()
    base = copy.deepcopy(model)
    optimizer = KSeedZOOptimizer(model, lr=1e-3, eps=1e-3, num_seeds=8, seed=1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    lrs = []
    for _ in range(25):
        optimizer.step(loss_closure(model, batch))
        lrs.append(optimizer.last_step["lr"])
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-3 / 25)  # the schedule acted
    assert (optimizer.accumulators != 0).sum() <= 8 and optimizer.accumulators.abs().sum() > 0
    optimizer.reconstruct_(base.named_parameters())  # w0 - sum_j A_j z_j
    for mine, rebuilt in zip(model.parameters(), base.parameters(), strict=True):
        torch.testing.assert_close(mine, rebuilt, rtol=0, atol=1e-5)  # float32 rounding of 75 passes


def test_learning_rate_is_read_from_the_param_group():
    model, batch = tiny_llama(), token_batch()
    before = copy.deepcopy(model)
    optimizer = KSeedZOOptimizer(model, lr=1e-3, num_seeds=4)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step(loss_closure(model, batch))
    assert optimizer.last_step["lr"] == 0.0
    assert max_abs_diff(model, before) < 1e-6  # perturbed and restored, but not moved


def test_nonfinite_loss_skips_the_step_and_restores_the_weights():
    model, batch = tiny_llama(), token_batch()
    before = copy.deepcopy(model)
    optimizer = KSeedZOOptimizer(model, lr=1e-3, num_seeds=4)
    optimizer.step(lambda: torch.tensor(float("nan")))
    optimizer.step(lambda: torch.tensor(float("inf")))
    assert optimizer.num_skipped_nonfinite == 2
    assert optimizer.last_step["skipped"] == "nonfinite"
    assert optimizer.accumulators.abs().sum().item() == 0
    assert max_abs_diff(model, before) < 1e-6
    optimizer.step(loss_closure(model, batch))  # training goes on afterwards
    assert optimizer.last_step["skipped"] is None


def test_grad_clip_skips_outlier_loss_differences():
    model = tiny_llama()
    losses = iter([torch.tensor(5.0), torch.tensor(1.0), torch.tensor(1.001), torch.tensor(1.0)])
    optimizer = KSeedZOOptimizer(model, lr=1e-3, num_seeds=4, grad_clip=0.5)
    optimizer.step(lambda: next(losses))  # |L+ - L-| = 4 > 0.5: skipped
    assert optimizer.num_skipped_clipped == 1 and optimizer.last_step["skipped"] == "clipped"
    optimizer.step(lambda: next(losses))  # 0.001: applied
    assert optimizer.last_step["skipped"] is None and optimizer.num_steps == 2
    assert optimizer.last_step["projected_grad"] == pytest.approx(0.001 / 2e-3, rel=1e-3)


def test_frozen_parameters_are_untouched():
    model, batch = tiny_llama(), token_batch()
    model.model.embed_tokens.weight.requires_grad_(False)
    frozen = model.model.embed_tokens.weight.detach().clone()
    optimizer = KSeedZOOptimizer(model, lr=1e-3, num_seeds=4)
    assert all(name != "model.embed_tokens.weight" for name, _ in optimizer.named_params)
    for _ in range(3):
        optimizer.step(loss_closure(model, batch))
    assert torch.equal(model.model.embed_tokens.weight, frozen)


def test_state_dict_resume_is_bit_identical():
    batch = token_batch()
    model = tiny_llama()
    probabilities = torch.linspace(0.1, 1.0, 16)
    optimizer = KSeedZOOptimizer(model, lr=1e-3, num_seeds=16, seed=5, seed_probabilities=probabilities)
    for _ in range(5):
        optimizer.step(loss_closure(model, batch))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)  # as the Trainer saves it, and loads it with weights_only=True
    weights = copy.deepcopy(model.state_dict())
    for _ in range(7):
        optimizer.step(loss_closure(model, batch))

    resumed_model = tiny_llama(seed=1)
    resumed_model.load_state_dict(weights)
    resumed = KSeedZOOptimizer(resumed_model, lr=1e-3, num_seeds=16, seed=999)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(7):
        resumed.step(loss_closure(resumed_model, batch))
    for mine, theirs in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    assert torch.equal(optimizer.accumulators, resumed.accumulators)
    assert resumed.num_steps == optimizer.num_steps == 12


def test_probabilities_steer_the_seed_choice():
    model, batch = tiny_llama(), token_batch()
    probabilities = torch.zeros(8)
    probabilities[3] = 1.0
    optimizer = KSeedZOOptimizer(model, lr=1e-4, num_seeds=8)
    optimizer.set_seed_probabilities(probabilities)
    for _ in range(4):
        optimizer.step(loss_closure(model, batch))
        assert optimizer.last_step["seed_index"] == 3
    assert optimizer.last_step["seed"] == optimizer.seed_pool[3].item()


def test_explicit_seed_pool_is_used():
    model, batch = tiny_llama(), token_batch()
    optimizer = KSeedZOOptimizer(model, lr=1e-4, num_seeds=3, seed_pool=torch.tensor([11, 22, 33]))
    optimizer.step(loss_closure(model, batch))
    assert optimizer.last_step["seed"] in (11, 22, 33)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=-1.0), "Invalid `lr`"),
        (dict(lr=math.nan), "Invalid `lr`"),
        (dict(lr=1e-3, eps=0.0), "Invalid `eps`"),
        (dict(lr=1e-3, weight_decay=-0.1), "Invalid `weight_decay`"),
        (dict(lr=1e-3, grad_clip=0.0), "Invalid `grad_clip`"),
        (dict(lr=1e-3, num_seeds=0), "Invalid `num_seeds`"),
        (dict(lr=1e-3, num_seeds=2.5), "Invalid `num_seeds`"),
        (dict(lr=1e-3, seed="0"), "Invalid `seed`"),
        (dict(lr=1e-3, num_seeds=4, seed_pool=torch.arange(3)), "`seed_pool` has 3 seeds"),
        (dict(lr=1e-3, num_seeds=4, seed_probabilities=torch.ones(5)), "one per seed"),
        (dict(lr=1e-3, engine="philox?"), "Unknown perturbation `engine`"),
    ],
)
def test_arguments_out_of_range_raise_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        KSeedZOOptimizer(tiny_llama(), **kwargs)


def test_usage_errors():
    model = tiny_llama()
    with pytest.raises(TypeError, match="named_parameters"):
        KSeedZOOptimizer(list(model.parameters()), lr=1e-3)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        KSeedZOOptimizer(model, lr=1e-3)

    model = tiny_llama()
    optimizer = KSeedZOOptimizer(model, lr=1e-3, num_seeds=4)
    with pytest.raises(RuntimeError, match="found no zeroth-order forward"):
        optimizer.step()
    optimizer.param_groups[0]["lr"] = 5e-3
    with pytest.raises(ValueError, match="one learning rate for all parameters"):
        optimizer.step(loss_closure(model, token_batch()))

    by_name = KSeedZOOptimizer(model.named_parameters(), lr=1e-3, num_seeds=4)
    with pytest.raises(RuntimeError, match="Pass the model itself"):
        by_name.train()

    other_engine = KSeedZOOptimizer(tiny_llama(), lr=1e-3, num_seeds=4, engine="torch-sequential")
    with pytest.raises(ValueError, match="pass `engine='counter'`"):
        other_engine.load_state_dict(by_name.state_dict())
    with pytest.raises(ValueError, match="`num_seeds`=8"):
        KSeedZOOptimizer(tiny_llama(), lr=1e-3, num_seeds=8).load_state_dict(by_name.state_dict())
    with pytest.raises(ValueError, match="no `kseed` entry"):
        by_name.load_state_dict(torch.optim.SGD(tiny_llama().parameters(), lr=0.1).state_dict())
