"""The KSeed delta: base hash, save, load, apply round trip after real training, and every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_llama, token_batch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from hf_fedkseed.artifacts import KSeedArtifactsCallback
from hf_fedkseed.callback import FederatedCallback, FederatedConfig
from hf_fedkseed.delta import (
    KSEED_CONFIG_NAME,
    KSEED_DELTA_NAME,
    apply_kseed,
    base_weights_sha256,
    load_kseed_delta,
    save_kseed_delta,
)
from hf_fedkseed.optimizer import KSeedZOOptimizer
from hf_fedkseed.perturbation import ENGINES

ROUNDS, CLIENTS_PER_ROUND, LOCAL_STEPS = 2, 2, 3
STEPS_PER_ROUND = CLIENTS_PER_ROUND * LOCAL_STEPS
SUMMARY = {"method": "fedkseed", "base_model": "tiny-llama (tests)", "base_model_source": "config", "seed": 0}


def task_rows(rows_per_task: int = 4, seq_len: int = 8) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, VOCAB, (seq_len,), generator=generator).tolist() for _ in range(4 * rows_per_task)]
    tasks = [f"task{i // rows_per_task}" for i in range(4 * rows_per_task)]
    return Dataset.from_dict({"task": tasks, "input_ids": tokens, "labels": tokens})


def federated_run(output_dir: Path, *, model=None, resume: str | None = None, save_steps: int = STEPS_PER_ROUND):
    """A short FedKSeed run in the stock Trainer with the artifacts callback; returns (model, optimizer, trainer)."""
    model = tiny_llama() if model is None else model
    optimizer = KSeedZOOptimizer(model, lr=2e-3, eps=1e-3, num_seeds=32, seed=7)
    federated = FederatedCallback(
        FederatedConfig(
            rounds=ROUNDS,
            local_steps=LOCAL_STEPS,
            clients_per_round=CLIENTS_PER_ROUND,
            partition="natural",
            partition_column="task",
        ),
        task_rows(),
    )
    artifacts = KSeedArtifactsCallback(dict(SUMMARY), federated=federated)
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        max_steps=federated.total_steps,
        learning_rate=2e-3,
        lr_scheduler_type="linear",
        logging_steps=1000,
        save_strategy="steps",
        save_steps=save_steps,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        max_grad_norm=0.0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=federated.train_dataset,
        optimizers=(optimizer, None),
        callbacks=[federated, artifacts],
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    artifacts.finish(trainer, {"rougeL_before": 0.1, "rougeL_after": 0.2, "num_eval_samples": 3})
    return model, optimizer, trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output = tmp_path_factory.mktemp("run")
    model, optimizer, _ = federated_run(output)
    return output, model, optimizer


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_untouched(model, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def max_diff(model, weights: dict[str, torch.Tensor]) -> float:
    return max((p - weights[name]).abs().max().item() for name, p in model.named_parameters())


# ---------------------------------------------------------------------- base hash
def test_base_hash_is_deterministic_and_content_addressed():
    model = tiny_llama()
    digest = base_weights_sha256(model)
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    assert base_weights_sha256(tiny_llama()) == digest  # same weights, another object
    wrapped = [(f"_orig_mod.{name}", p) for name, p in reversed(list(model.named_parameters()))]
    assert base_weights_sha256(wrapped) == digest  # wrapper prefixes and order do not matter
    assert base_weights_sha256(model, chunk_elements=7) == digest  # chunking does not either
    with torch.no_grad():
        model.model.norm.weight[3] += 1e-7
    assert base_weights_sha256(model) != digest  # one element changed
    assert base_weights_sha256(tiny_llama().to(torch.bfloat16)) != digest  # the dtype is part of the content


# ---------------------------------------------------------------------- round trip
def test_delta_rebuilds_the_trained_model_on_a_fresh_base(trained):
    output, model, optimizer = trained
    config = json.loads((output / KSEED_CONFIG_NAME).read_text())
    assert config["engine"] == optimizer.engine.name and config["engine_version"] == optimizer.engine.version
    assert config["num_seeds"] == 32 and config["seed"] == 7 and config["seed_pool"] == "drawn from seed"
    assert config["base_weights_sha256"] == base_weights_sha256(tiny_llama())
    assert config["trained_parameters"] == "all" and config["weight_decay"] == 0.0
    assert config["optimizer_steps"] == ROUNDS * STEPS_PER_ROUND and config["training"]["method"] == "fedkseed"
    assert config["training"]["rounds_completed"] == ROUNDS
    stored = load_file(output / KSEED_DELTA_NAME)
    assert set(stored) == {"accumulators"} and torch.equal(stored["accumulators"], optimizer.accumulators)
    assert (output / KSEED_DELTA_NAME).stat().st_size == config["delta_bytes"] < 1024

    fresh = tiny_llama()
    assert apply_kseed(fresh, output) is fresh
    assert max_diff(fresh, snapshot(model)) <= 1e-6  # the trained model, up to float32 rounding of its updates
    rebuilt = tiny_llama()
    optimizer.reconstruct_(list(rebuilt.named_parameters()))
    for (name, a), b in zip(fresh.named_parameters(), rebuilt.parameters(), strict=True):
        assert torch.equal(a, b), name  # bit-identical to the optimizer's own reconstruction
    merged = load_file(output / "model.safetensors")
    assert max((p - merged[name]).abs().max().item() for name, p in fresh.named_parameters()) <= 1e-6


def test_every_checkpoint_carries_its_own_delta(trained):
    output, _, _ = trained
    checkpoint = output / f"checkpoint-{STEPS_PER_ROUND}"
    config = json.loads((checkpoint / KSEED_CONFIG_NAME).read_text())
    assert config["optimizer_steps"] == STEPS_PER_ROUND and config["training"]["rounds_completed"] == 1
    assert (checkpoint / "README.md").is_file()
    fresh = apply_kseed(tiny_llama(), checkpoint)
    weights = load_file(checkpoint / "model.safetensors")
    assert max((p - weights[name]).abs().max().item() for name, p in fresh.named_parameters()) <= 1e-6
    final = json.loads((output / KSEED_CONFIG_NAME).read_text())
    assert config["delta_sha256"] != final["delta_sha256"]  # round 1's accumulators, not the end's


def test_a_resumed_run_keeps_the_base_hash_of_its_checkpoint(trained, tmp_path):
    """Built on the checkpoint's weights, the Trainer still records the original base (from the optimizer state)."""
    output, model, _ = trained
    import shutil

    shutil.copytree(output / f"checkpoint-{STEPS_PER_ROUND}", tmp_path / f"checkpoint-{STEPS_PER_ROUND}")
    start = apply_kseed(tiny_llama(), tmp_path / f"checkpoint-{STEPS_PER_ROUND}")  # not the base
    federated_run(tmp_path, model=start, resume=str(tmp_path / f"checkpoint-{STEPS_PER_ROUND}"))
    config = json.loads((tmp_path / KSEED_CONFIG_NAME).read_text())
    assert config["base_weights_sha256"] == base_weights_sha256(tiny_llama())
    assert max_diff(apply_kseed(tiny_llama(), tmp_path), snapshot(model)) <= 1e-6


def test_a_subset_of_parameters_a_stored_pool_and_the_sequential_engine(tmp_path):
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    base_hash = base_weights_sha256(model)
    pool = torch.arange(100, 116)
    optimizer = KSeedZOOptimizer(
        model, lr=1e-2, eps=1e-3, num_seeds=16, seed=3, seed_pool=pool, engine="torch-sequential"
    )
    batch = token_batch()
    for _ in range(5):
        optimizer.step(lambda: model(input_ids=batch, labels=batch).loss)
    config = save_kseed_delta(optimizer, tmp_path, base_weights_sha256=base_hash, base_model="tiny")
    assert config["seed_pool"] == "stored" and "model.embed_tokens.weight" not in config["trained_parameters"]
    assert len(config["trained_parameters"]) == config["num_trained_tensors"]
    fresh = apply_kseed(tiny_llama(), tmp_path)
    assert max_diff(fresh, snapshot(model)) <= 1e-6
    assert torch.equal(fresh.model.embed_tokens.weight, tiny_llama().model.embed_tokens.weight)


# ---------------------------------------------------------------------- refusals
@pytest.fixture
def delta_copy(trained, tmp_path):
    output, _, _ = trained
    for name in (KSEED_CONFIG_NAME, KSEED_DELTA_NAME):
        (tmp_path / name).write_bytes((output / name).read_bytes())
    return tmp_path


def edit_config(directory: Path, **changes) -> None:
    path = directory / KSEED_CONFIG_NAME
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def refused(directory, model, match: str) -> None:
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        apply_kseed(model, directory)
    assert_untouched(model, before)


def test_another_base_is_refused_and_left_untouched(delta_copy):
    refused(delta_copy, tiny_llama(seed=1), r"not the base the delta was trained from: its weights hash to sha256:")
    refused(delta_copy, tiny_llama().to(torch.bfloat16), r"dtypes \{'float32': \d+\} but this model holds")
    one_layer = LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    )
    refused(delta_copy, one_layer, r"trained \d+ parameter tensors but this model has \d+; load the base model")


def test_an_applied_model_is_not_a_base(delta_copy):
    model = apply_kseed(tiny_llama(), delta_copy)
    refused(delta_copy, model, "not the base")  # applying twice would add the delta twice


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"engine": "warp-drive"}, "engine 'warp-drive', which this hf_fedkseed does not know; upgrade"),
        ({"engine_version": 99}, r"version 99, which this hf_fedkseed cannot replay .*has no version 99"),
        ({"weight_decay": 0.01}, "weight_decay=0.01; with decay K scalars do not describe the model"),
        ({"format_version": 2}, "format_version 2; this hf_fedkseed reads up to 1. Upgrade hf_fedkseed"),
        ({"format": "something-else"}, "is not a KSeed delta config"),
        ({"seed": 8}, "seed pool does not match `seed_pool_sha256`"),
        ({"device_type": "cuda"}, "move the model to 'cuda' before `apply_kseed`"),
    ],
)
def test_config_refusals(delta_copy, changes, match):
    edit_config(delta_copy, **changes)
    refused(delta_copy, tiny_llama(), match)


def test_file_corruptions_are_refused(delta_copy):
    delta = delta_copy / KSEED_DELTA_NAME
    data = delta.read_bytes()
    delta.write_bytes(data[:-8])
    refused(delta_copy, tiny_llama(), "truncated or was replaced")
    delta.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    refused(delta_copy, tiny_llama(), "does not match the checksum in kseed_config.json: the file is corrupted")
    garbage = b"\xff" * len(data)  # a consistent checksum over bytes that are not safetensors
    delta.write_bytes(garbage)
    import hashlib

    edit_config(delta_copy, delta_sha256=f"sha256:{hashlib.sha256(garbage).hexdigest()}")
    refused(delta_copy, tiny_llama(), "is not a valid safetensors file")
    delta.unlink()
    refused(delta_copy, tiny_llama(), "kseed_delta.safetensors is missing")
    (delta_copy / KSEED_CONFIG_NAME).write_text('{"format": "hf_fedkseed.kseed_delta", "format_')
    refused(delta_copy, tiny_llama(), "is not valid JSON")
    (delta_copy / KSEED_CONFIG_NAME).unlink()
    refused(delta_copy, tiny_llama(), "holds no kseed_config.json")


def test_incomplete_config_and_an_unreachable_repo_are_refused(delta_copy, monkeypatch):
    config = json.loads((delta_copy / KSEED_CONFIG_NAME).read_text())
    del config["delta_sha256"]
    (delta_copy / KSEED_CONFIG_NAME).write_text(json.dumps(config))
    refused(delta_copy, tiny_llama(), "lacks delta_sha256")
    # Not a directory here, so a Hub repo id; offline (no retries against an unreachable Hub), the download fails.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    refused("nobody/no-such-delta", tiny_llama(), "Could not get the KSeed delta of 'nobody/no-such-delta'")


def test_saving_refuses_weight_decay(tmp_path):
    model = tiny_llama()
    optimizer = KSeedZOOptimizer(model, lr=1e-3, num_seeds=8, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"weight_decay`=0\.1: with decay the model is no longer"):
        save_kseed_delta(optimizer, tmp_path, base_weights_sha256=base_weights_sha256(model))
    assert not (tmp_path / KSEED_CONFIG_NAME).exists()
    with pytest.raises(TypeError, match="needs a KSeedZOOptimizer"):
        save_kseed_delta(torch.optim.SGD(model.parameters(), lr=0.1), tmp_path, base_weights_sha256="sha256:0")


def test_load_returns_the_verified_pieces(trained):
    output, _, optimizer = trained
    delta = load_kseed_delta(output)
    assert delta.num_seeds == 32 and torch.equal(delta.seed_pool, optimizer.seed_pool)
    assert delta.engine.name in ENGINES
    assert load_kseed_delta(output / KSEED_CONFIG_NAME).config == delta.config  # the config's path works too


# ---------------------------------------------------------------------- Reliability 12: forged or mistyped configs
def test_absurd_accumulators_with_a_recomputed_checksum_are_refused(delta_copy):
    import hashlib

    from safetensors.torch import save

    for value in (1e300, -2e6):
        payload = save({"accumulators": torch.full((32,), value, dtype=torch.float64)})
        (delta_copy / KSEED_DELTA_NAME).write_bytes(payload)
        edit_config(delta_copy, delta_bytes=len(payload), delta_sha256=f"sha256:{hashlib.sha256(payload).hexdigest()}")
        refused(delta_copy, tiny_llama(), "above the sanity bound SANITY_MAX_ABS_ACCUMULATOR=1e[+]06")


def test_a_hand_built_delta_is_bounded_too(trained):
    output, _, _ = trained
    delta = load_kseed_delta(output)
    forged = type(delta)(config=delta.config, accumulators=delta.accumulators * 1e300, seed_pool=delta.seed_pool)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="above the sanity bound"):
        apply_kseed(model, forged)
    assert_untouched(model, before)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"engine": ["counter"]}, r"`engine` is list \['counter'\], not str"),
        ({"base_weights_sha256": ["sha256:0"]}, "`base_weights_sha256` is list"),
        ({"num_seeds": "32"}, "`num_seeds` is str '32', not int"),
        ({"delta_bytes": True}, "`delta_bytes` is bool True, not int"),
        ({"trained_parameters": [1, 2]}, r"`trained_parameters` is \[1, 2\], not \"all\" or a list of parameter names"),
        ({"parameter_dtypes": {"float32": "many"}}, "`parameter_dtypes` must map dtype names to counts"),
        ({"weight_decay": "0"}, "`weight_decay` is str"),
    ],
)
def test_a_config_field_of_the_wrong_type_is_a_value_error(delta_copy, changes, match):
    edit_config(delta_copy, **changes)
    refused(delta_copy, tiny_llama(), match)


def test_the_delta_file_is_the_same_bytes_for_the_same_accumulators(trained, tmp_path):
    # safetensors writes its metadata in hash-map order; the delta sorts it, so a resumed run's file is identical.
    output, _, optimizer = trained
    config = json.loads((output / KSEED_CONFIG_NAME).read_text())
    save_kseed_delta(optimizer, tmp_path, base_weights_sha256=config["base_weights_sha256"])
    data = (tmp_path / KSEED_DELTA_NAME).read_bytes()
    assert b'{"__metadata__":{"format":"hf_fedkseed.kseed_delta","format_version":"1"}' in data
    assert data == (output / KSEED_DELTA_NAME).read_bytes()
