"""The baselines: FedAvg/FedIT/FedZO rounds in the Trainer, their payloads and bytes, and the `method` setting."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, max_abs_diff, tiny_llama, token_batch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from hf_fedkseed.baselines.fedavg import FedAvgCallback, decode_tensors, encode_tensors
from hf_fedkseed.baselines.fedzo import (
    FreshSeedZOOptimizer,
    SeedStepsMessage,
    encode_seed_history,
    replay_seed_steps,
)
from hf_fedkseed.baselines.setup import prepare_baseline
from hf_fedkseed.callback import FederatedConfig
from hf_fedkseed.configs import ModelArguments, RecipeError, ZOArguments, parse_recipe
from hf_fedkseed.federated.server import KSeedServer

NUM_TASKS = 4
RECIPE = "recipes/smoke.yaml"


def task_dataset(rows_per_task=(3, 5, 4, 6), seq_len: int = 8) -> Dataset:
    """Rows of NUM_TASKS tasks with different sizes, so sample-count weighting differs from equal weighting."""
    generator = torch.Generator().manual_seed(0)
    tasks, tokens = [], []
    for task, count in enumerate(rows_per_task):
        for _ in range(count):
            tokens.append(torch.randint(0, VOCAB, (seq_len,), generator=generator).tolist())
            tasks.append(f"task{task}")
    return Dataset.from_dict({"task": tasks, "input_ids": tokens, "labels": tokens})


def federated_config(method: str, **overrides) -> FederatedConfig:
    settings = dict(
        rounds=2, local_steps=3, clients_per_round=2, partition="natural", partition_column="task", method=method
    )
    settings.update(overrides)
    return FederatedConfig(**settings)


def training_args(tmp_path, max_steps: int, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=max_steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        max_grad_norm=1.0,
        seed=3,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


class RecordingFedAvg(FedAvgCallback):
    """Keeps what each client started from, its optimizer state size then, and the weights it finished with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.starts, self.ends, self.state_sizes, self.globals, self.results = [], [], [], [], []

    def begin_round(self, round_index):
        super().begin_round(round_index)
        self.globals.append({name: t.clone() for name, t in self._round["global"].items()})

    def begin_client(self, slot, optimizer):
        super().begin_client(slot, optimizer)
        inner = getattr(optimizer, "optimizer", optimizer)
        self.state_sizes.append(len(inner.state) if inner is not None and hasattr(inner, "state") else None)
        self.starts.append({name: p.detach().clone() for name, p in self.trained})

    def end_client(self, slot):
        client_id = self._round["clients"][slot]
        self.ends.append((client_id, {name: p.detach().clone() for name, p in self.trained}))
        super().end_client(slot)

    def end_round(self, round_index):
        entry = super().end_round(round_index)
        self.results.append({name: p.detach().clone() for name, p in self.trained})
        return entry


def run_baseline(tmp_path, method: str, *, model=None, callback_cls=RecordingFedAvg, **config_overrides):
    model = tiny_llama() if model is None else model
    config = federated_config(method, **config_overrides)
    args = training_args(tmp_path, max_steps=1, learning_rate=2e-3 if method == "fedzo" else 1e-2)
    setup = prepare_baseline(
        method,
        model,
        task_dataset(),
        model_args=ModelArguments(model_name_or_path="unused", lora_target_modules=["q_proj", "v_proj"]),
        zo_args=ZOArguments(zo_eps=1e-3),
        federated_config=config,
        training_args=args,
    )
    federated = callback_cls(config, task_dataset(), payload=setup.federated.payload)
    args.max_steps = federated.total_steps
    trainer = Trainer(
        model=setup.model,
        args=args,
        train_dataset=federated.train_dataset,
        optimizers=(setup.optimizer, None),
        callbacks=[federated],
    )
    trainer.train()
    return setup.model, federated, trainer


# ---------------------------------------------------------------------------------------------- method setting
def test_method_defaults_to_pro_and_conflicts_are_refused():
    assert federated_config(None).method == "fedkseed"
    assert federated_config(None, pro=True).method == "fedkseed_pro"
    assert federated_config("fedkseed_pro").pro is True
    with pytest.raises(ValueError, match="conflicts with `method: fedavg`"):
        federated_config("fedavg", pro=True)


def test_unknown_method_is_a_usage_error_naming_the_choices(capsys):
    with pytest.raises(RecipeError, match="fedkseed_pro"):
        parse_recipe(RECIPE, ["--method", "sgd"])
    from hf_fedkseed.cli import main

    assert main(["train", RECIPE, "--method", "sgd"]) == 2
    assert "fedavg" in capsys.readouterr().err
    _, _, _, federated, _ = parse_recipe(RECIPE, ["--method", "fedzo", "--pro", "false"])
    assert federated.method == "fedzo" and federated.pro is False


def test_quantized_base_only_with_fedit(tmp_path):
    with pytest.raises(ValueError, match="at most one"):
        ModelArguments(model_name_or_path="x", load_in_8bit=True, load_in_4bit=True)
    with pytest.raises(ValueError, match="applies to `method: fedit` only"):
        prepare_baseline(
            "fedavg",
            tiny_llama(),
            task_dataset(),
            model_args=ModelArguments(model_name_or_path="x", load_in_4bit=True),
            zo_args=ZOArguments(),
            federated_config=federated_config("fedavg"),
            training_args=training_args(tmp_path, 1),
        )


# ---------------------------------------------------------------------------------------------- payloads
def test_tensor_payload_round_trips_and_counts_real_bytes():
    model = tiny_llama()
    tensors = dict(model.named_parameters())
    payload = encode_tensors(tensors)
    decoded = decode_tensors(payload)
    assert all(torch.equal(decoded[name], tensor.detach()) for name, tensor in tensors.items())
    raw = sum(t.numel() * t.element_size() for t in tensors.values())
    assert raw < len(payload) < raw + 4096  # the data plus a small JSON header


def test_seed_steps_message_round_trips_and_rejects_corruption():
    message = SeedStepsMessage(server_round=2, client_id=5, num_samples=40, seeds=[17, 2**62 + 1], scalars=[0.5, -1e-3])
    payload = message.encode()
    assert len(payload) == 20 + 2 * 12 + 4
    decoded = SeedStepsMessage.decode(payload)
    assert decoded.seeds.tolist() == [17, 2**62 + 1] and decoded.client_id == 5 and decoded.server_round == 2
    assert decoded.scalars.tolist() == [0.5, float(torch.tensor(-1e-3, dtype=torch.float32))]
    corrupt = bytearray(payload)
    corrupt[25] ^= 0xFF
    with pytest.raises(ValueError, match="CRC32"):
        SeedStepsMessage.decode(bytes(corrupt))
    with pytest.raises(ValueError, match="announces 2 steps"):
        SeedStepsMessage.decode(payload[:-1])
    with pytest.raises(ValueError, match="one per step"):
        SeedStepsMessage(server_round=0, client_id=0, num_samples=1, seeds=[1, 2], scalars=[0.1])
    assert len(encode_seed_history([(1, 0.1)] * 100)) == 20 + 1200 + 4  # grows by 12 bytes a step


def test_fresh_seed_optimizer_never_reuses_a_seed_and_its_steps_rebuild_the_model():
    model = tiny_llama()
    start = copy.deepcopy(model)
    optimizer = FreshSeedZOOptimizer(model, lr=1e-2, eps=1e-3, max_steps=6, seed=11)
    batch = token_batch()
    seeds, scalars = [], []
    for _ in range(6):
        optimizer.step(lambda: model(input_ids=batch, labels=batch).loss)
        seeds.append(optimizer.last_step["seed"])
        scalars.append(optimizer.last_step["lr"] * optimizer.last_step["projected_grad"])
    assert len(set(seeds)) == 6
    with pytest.raises(RuntimeError, match="fresh seeds"):
        optimizer.step(lambda: model(input_ids=batch, labels=batch).loss)
    # What a FedZO server does with the upload: replay the pairs on the broadcast model.
    message = SeedStepsMessage.decode(
        SeedStepsMessage(server_round=0, client_id=0, num_samples=1, seeds=seeds, scalars=scalars).encode()
    )
    replay_seed_steps(list(start.named_parameters()), message, optimizer.engine)
    assert max_abs_diff(start, model) < 1e-6
    with pytest.raises(ValueError, match="no `num_seeds`"):
        FreshSeedZOOptimizer(model, lr=1e-3, max_steps=4, num_seeds=8)


# ---------------------------------------------------------------------------------------------- runtimes
@pytest.mark.slow
def test_fedavg_restores_global_weights_per_client_resets_adamw_and_averages_by_samples(tmp_path):
    model, federated, _ = run_baseline(tmp_path, "fedavg")
    sizes = federated.partition.client_sizes
    server = KSeedServer(NUM_TASKS, num_seeds=1, seed=3, clients_per_round=2)
    assert [entry["clients"] for entry in federated.history] == [server.select_clients(r) for r in range(2)]
    assert federated.state_sizes == [0, 0, 0, 0]  # a fresh AdamW for every client and round
    for round_index in range(2):
        global_weights = federated.globals[round_index]
        for slot in range(2):  # every client starts from the round's global weights
            start = federated.starts[2 * round_index + slot]
            assert all(torch.equal(start[name], global_weights[name]) for name in global_weights)
        ends = federated.ends[2 * round_index : 2 * round_index + 2]
        total = sum(sizes[client] for client, _ in ends)
        for name, result in federated.results[round_index].items():
            expected = sum(sizes[client] * weights[name] for client, weights in ends) / total
            assert torch.allclose(result, expected, atol=1e-6)
        assert not torch.equal(ends[0][1]["lm_head.weight"], ends[1][1]["lm_head.weight"])
    full_model = len(encode_tensors(dict(model.named_parameters())))
    assert all(entry["bytes_down"] == entry["bytes_up"] == 2 * full_model for entry in federated.history)
    assert all(entry["train_loss"] > 0 for entry in federated.history)


@pytest.mark.slow
def test_fedzo_uploads_12_bytes_a_step_and_keeps_a_replayable_description(tmp_path):
    model = tiny_llama()
    start = copy.deepcopy(model)
    model, federated, trainer = run_baseline(tmp_path, "fedzo", model=model)
    full_model = len(encode_tensors(dict(model.named_parameters())))
    for entry in federated.history:
        assert entry["bytes_down"] == 2 * full_model
        assert entry["bytes_up"] == 2 * (20 + 12 * 3 + 4)
    assert [entry["bytes_down_seed_history"] for entry in federated.history] == [24 + 12 * 6, 24 + 12 * 12]
    # The averaged model is still w0 - sum_j A_j z_j over the fresh seeds: the KSeed-style delta stays exact.
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    optimizer.reconstruct_(list(start.named_parameters()))
    assert max_abs_diff(start, model) < 1e-6
    assert max_abs_diff(tiny_llama(), model) > 1e-6


@pytest.mark.slow
def test_fedit_trains_and_sends_only_the_lora_adapters(tmp_path):
    pytest.importorskip("peft")
    base = tiny_llama()
    model, federated, _ = run_baseline(tmp_path, "fedit", model=copy.deepcopy(base))
    trained = dict(federated.trained)
    assert trained and all("lora_" in name for name in trained)
    assert sum(p.numel() for p in trained.values()) == 2 * (8 * 32 + 32 * 8 + 8 * 32 + 16 * 8)  # 2 layers, q and v
    merged = model.merge_and_unload()
    unchanged = {n: p for n, p in merged.named_parameters() if "q_proj" not in n and "v_proj" not in n}
    assert all(torch.equal(p, dict(base.named_parameters())[n]) for n, p in unchanged.items())
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    adapters = len(encode_tensors(trained))
    assert all(entry["bytes_down"] == entry["bytes_up"] == 2 * adapters for entry in federated.history)
    assert adapters < len(encode_tensors(dict(base.named_parameters()))) / 4


def test_quantized_base_is_refused_with_the_reason_when_there_is_no_backend(monkeypatch):
    import builtins

    from hf_fedkseed.baselines import fedit

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("no bitsandbytes here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    assert "hf-fedkseed[bnb]" in fedit.quantization_unavailable(4)
    with pytest.raises(RuntimeError, match="4-bit base is not available"):
        fedit.load_quantized_model("unused", bits=4)
