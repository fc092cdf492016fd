"""FederatedCallback: FedKSeed rounds inside the stock Trainer: data routing, accounting, agreement, faults, resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, tiny_llama
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_fedkseed import FederatedCallback, FederatedConfig, KSeedZOOptimizer, ShiftCounterEngine
from hf_fedkseed.federated import KSeedClient, SyncMessage

NUM_TASKS = 6
TOKENS_PER_TASK = VOCAB // NUM_TASKS  # task t writes only tokens in [t * 10, t * 10 + 10)


def task_dataset(rows_per_task: int = 5, seq_len: int = 8) -> Dataset:
    """Rows whose tokens reveal their task, so a test can tell which client's shard a batch came from."""
    generator = torch.Generator().manual_seed(0)
    tasks, tokens = [], []
    for task in range(NUM_TASKS):
        for _ in range(rows_per_task):
            low = task * TOKENS_PER_TASK
            tokens.append(torch.randint(low, low + TOKENS_PER_TASK, (seq_len,), generator=generator).tolist())
            tasks.append(f"task{task}")
    return Dataset.from_dict({"task": tasks, "input_ids": tokens, "labels": tokens})


def config(**overrides) -> FederatedConfig:
    settings = dict(
        rounds=3, local_steps=4, clients_per_round=2, partition="natural", partition_column="task", pro=False
    )
    settings.update(overrides)
    return FederatedConfig(**settings)


def args(tmp_path, max_steps: int, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=max_steps,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        max_grad_norm=0.0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def run(
    tmp_path, federated_config: FederatedConfig, *, model=None, resume=None, optimizer_factory=None, **arg_overrides
):
    model = tiny_llama() if model is None else model
    if optimizer_factory is None:
        optimizer = KSeedZOOptimizer(model, lr=2e-3, eps=1e-3, num_seeds=32, seed=7)
    else:
        optimizer = optimizer_factory(model)
    federated = FederatedCallback(federated_config, task_dataset())
    steps = federated_config.rounds * federated_config.clients_per_round * federated_config.local_steps
    trainer = Trainer(
        model=model,
        args=args(tmp_path, arg_overrides.pop("max_steps", steps), **arg_overrides),
        train_dataset=federated.train_dataset,
        optimizers=(optimizer, None),
        callbacks=[federated],
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, optimizer, federated, trainer


def test_every_local_step_reads_the_active_clients_shard(tmp_path):
    model = tiny_llama()
    seen: list[set[int]] = []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append({int(t) // TOKENS_PER_TASK for t in kwargs["input_ids"].flatten()}),
        with_kwargs=True,
    )
    _, optimizer, federated, _ = run(tmp_path, config(), model=model)
    assert optimizer.num_steps == 3 * 2 * 4
    expected = []
    for round_index in range(3):
        for client in federated.selected_clients(round_index):
            task = int(federated.partition.client_names[client].removeprefix("task"))
            expected += [{task}] * 4 * 2  # 4 local steps, two ZO forwards each
    assert seen == expected


def test_final_model_is_w0_minus_the_servers_accumulators(tmp_path):
    model, optimizer, federated, _ = run(tmp_path, config(rounds=4))
    server = federated.server
    assert server.accumulators.abs().sum() > 0
    base = tiny_llama()
    with torch.no_grad():
        optimizer.engine.replay_(
            list(base.named_parameters()), server.seed_pool.tolist(), (-server.accumulators.float().double()).tolist()
        )
    for trained, rebuilt in zip(model.parameters(), base.parameters(), strict=True):
        torch.testing.assert_close(trained, rebuilt, rtol=0, atol=1e-5)
    assert torch.equal(optimizer.accumulators, federated.client.synced)  # the optimizer describes the model too


def test_rounds_are_logged_with_real_byte_counts(tmp_path):
    *_, trainer = run(tmp_path, config())
    lines = (tmp_path / "rounds.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records:
        assert set(record) >= {"round", "clients", "train_loss", "bytes_up", "bytes_down", "seeds_touched", "seconds"}
        assert len(record["clients"]) == 2 and record["accepted"] == record["clients"]
        # K = 32 float32 accumulators + 30 header/CRC bytes down; 4 steps x (uint8 index + float32) + 30 bytes up.
        assert record["bytes_down"] == 2 * (32 * 4 + 30)
        assert record["bytes_up"] == 2 * (4 * 5 + 30)
        assert 1 <= record["seeds_touched"] <= 8
    logged = [entry for entry in trainer.state.log_history if "bytes_up" in entry]
    assert [entry["round"] for entry in logged] == [0, 1, 2]


def test_pro_rounds_follow_the_servers_schedule(tmp_path):
    _, _, federated, _ = run(tmp_path, config(pro=True, rounds=3))
    records = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    # Pro sends each client its 4 scheduled seed indices (uint8) down, and g plus one learning rate up.
    assert records[0]["bytes_down"] == 2 * (32 * 4 + 4 + 30)
    assert records[0]["bytes_up"] == 2 * (4 * 5 + 4 + 30)
    assert federated.server.pro_count.sum().item() == 3 * 2 * 4
    probabilities = federated.server.probabilities()
    assert probabilities.max() > probabilities.min()  # importance has moved the distribution off uniform


def test_a_failing_client_is_left_out_and_the_round_completes(tmp_path, monkeypatch):
    original = KSeedClient.build_update
    calls = {"count": 0}

    def flaky(self, **kwargs):
        calls["count"] += 1
        if calls["count"] == 2:  # the second client of round 0
            raise RuntimeError("device lost")
        return original(self, **kwargs)

    monkeypatch.setattr(KSeedClient, "build_update", flaky)
    _, _, federated, _ = run(tmp_path, config(rounds=2))
    first = federated.history[0]
    assert len(first["failed"]) == 1 and len(first["accepted"]) == 1
    assert federated.history[1]["failed"] == [] and len(federated.history[1]["accepted"]) == 2


def test_out_of_bound_scalars_are_rejected_before_the_accumulators(tmp_path):
    _, _, federated, _ = run(tmp_path, config(rounds=2, max_abs_scalar=1e-12))
    assert all(len(entry["rejected"]) == 2 and entry["accepted"] == [] for entry in federated.history)
    assert federated.server.accumulators.abs().sum().item() == 0


def test_resume_from_a_checkpoint_ends_with_the_same_weights(tmp_path):
    uninterrupted, _, full, _ = run(tmp_path / "full", config(rounds=4, pro=True))
    # save_steps=3 falls mid-round: the save is taken at the end of round 0 (step 8) and of round 1 (step 16).
    run(tmp_path / "killed", config(rounds=2, pro=True), save_strategy="steps", save_steps=3, max_steps=16)
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-8"]
    resumed, _, again, _ = run(
        tmp_path / "killed", config(rounds=4, pro=True), resume=str(tmp_path / "killed" / "checkpoint-8")
    )
    for a, b in zip(uninterrupted.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(full.server.accumulators, again.server.accumulators)
    records = [json.loads(line) for line in (tmp_path / "killed" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="local_steps differ"):
        run(tmp_path / "other", config(rounds=4, pro=True, local_steps=2), resume=str(tmp_path / "killed/checkpoint-8"))


def test_replay_undo_agrees_with_snapshot_undo(tmp_path):
    snapshot, snapshot_optimizer, *_ = run(tmp_path / "snapshot", config(undo="snapshot"))
    replay, replay_optimizer, *_ = run(tmp_path / "replay", config(undo="replay"))
    # A snapshot undo is exact; a replayed one (`w + c z - c z` in float32) is not, so from the second client on the
    # two runs evaluate their forwards at weights a few ulps apart. Such a difference changes each float32 loss by
    # about one ulp (~4.8e-7 for losses in [4, 8)), hence g = (L+ - L-) / (2 eps) by up to ulp / eps, and the weights
    # by lr * ulp / eps * |z| per step, |z| < 6 for every element here. Summed over the steps, that is the bound; it
    # is not a fitted tolerance (measured: 5.1e-6 on one 2-core EPYC VM, 1.0e-5 elsewhere, against a bound of 1.4e-4),
    # and a real disagreement, such as one step not undone, moves weights by lr * |g| * |z| ~ 1e-2.
    cfg = config()
    steps = cfg.rounds * cfg.clients_per_round * cfg.local_steps
    lr, zo_eps, z_max = 2e-3, 1e-3, 6.0  # as in run()
    loss_ulp = 4 * torch.finfo(torch.float32).eps
    bound = steps * lr * loss_ulp / zo_eps * z_max
    for a, b in zip(snapshot.parameters(), replay.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=bound)
    torch.testing.assert_close(snapshot_optimizer.accumulators, replay_optimizer.accumulators, rtol=0, atol=bound)


@pytest.mark.parametrize(
    ("pro", "engine"), [(False, "counter"), (True, "counter"), (True, "counter-shift"), (True, "counter-rademacher")]
)
def test_every_round_ends_where_a_client_catching_up_round_by_round_ends(tmp_path, monkeypatch, pro, engine):
    """One catch-up rule: after every round the shared model equals a fresh client's model that replays each
    round's change of the accumulators in turn, bit for bit, also when the server clips a client (with the
    cyclic-shift engine, whose catch-ups of 8 seeds or more run by FFT, and with the quickstart's Rademacher one)."""
    # norm_bound clips every client to the round's median norm: of three clients, the longest one is clipped. Pro
    # updates carry g and the learning rate; the server's scalars are their exact products either way.
    cfg = config(rounds=2, clients_per_round=3, aggregation="norm_bound", pro=pro)
    after_rounds: list[tuple[torch.Tensor, list[torch.Tensor], bool]] = []
    end_round = FederatedCallback.end_round

    def recording(self, round_index):
        entry = end_round(self, round_index)
        weights = [p.detach().clone() for _, p in self.optimizer.named_params]
        after_rounds.append((self.server.accumulators.clone(), weights, bool(entry["clipped"])))
        return entry

    monkeypatch.setattr(FederatedCallback, "end_round", recording)
    chosen = ShiftCounterEngine(fft_min_seeds=2) if engine == "counter-shift" else engine  # every catch-up by FFT
    factory = lambda model: KSeedZOOptimizer(model, lr=2e-3, eps=1e-3, num_seeds=32, seed=7, engine=chosen)  # noqa: E731
    _, optimizer, federated, _ = run(tmp_path, cfg, optimizer_factory=factory)
    assert optimizer.engine.name == engine
    assert any(clipped for *_, clipped in after_rounds)  # the rule holds where the old shortcut needed a correction

    fresh = tiny_llama()
    client = KSeedClient(list(fresh.named_parameters()), engine=optimizer.engine, seed_pool=optimizer.seed_pool)
    for round_index, (accumulators, weights, _) in enumerate(after_rounds):
        client.catch_up(SyncMessage.build(server_round=round_index + 1, accumulators=accumulators, encoding="full"))
        for (_, param), expected in zip(fresh.named_parameters(), weights, strict=True):
            assert torch.equal(param, expected)
    assert torch.equal(optimizer.accumulators, federated.server.accumulators.float().double())


def test_refusals_name_the_fix(tmp_path):
    message = r"`max_steps`=5 cannot hold 3 rounds x 2 clients x 4 local steps; set `max_steps=24`"
    with pytest.raises(ValueError, match=message):
        run(tmp_path, config(), max_steps=5)
    with pytest.raises(ValueError, match="set `dataloader_num_workers=0`"):
        run(tmp_path, config(), dataloader_num_workers=2)
    model = tiny_llama()
    federated = FederatedCallback(config(), task_dataset())
    with pytest.raises(ValueError, match="`weight_decay=0`"):
        Trainer(
            model=model,
            args=args(tmp_path, 24),
            train_dataset=federated.train_dataset,
            optimizers=(KSeedZOOptimizer(model, lr=1e-3, weight_decay=0.1), None),
            callbacks=[federated],
        )
    with pytest.raises(TypeError, match="needs `optimizers=\\(KSeedZOOptimizer"):
        Trainer(model=model, args=args(tmp_path, 24), train_dataset=federated.train_dataset, callbacks=[federated])
    trainer = Trainer(
        model=model,
        args=args(tmp_path, 24),
        train_dataset=task_dataset(),
        optimizers=(KSeedZOOptimizer(model, lr=1e-3), None),
        callbacks=[federated],
    )
    with pytest.raises(ValueError, match=r"train_dataset=federated\.train_dataset"):
        trainer.train()
    with pytest.raises(ValueError, match="Set exactly one of `clients_per_round` and `client_fraction`"):
        FederatedConfig(rounds=1, clients_per_round=2, client_fraction=0.5, num_clients=4)
    with pytest.raises(ValueError, match="`partition='iid'` needs `num_clients`"):
        FederatedConfig(rounds=1, clients_per_round=2)
    with pytest.raises(ValueError, match="Invalid `rounds`"):
        FederatedConfig(rounds=0, clients_per_round=2, num_clients=4)


def test_evaluation_asked_mid_round_runs_on_the_aggregated_model(tmp_path):
    evaluated_at: list[int] = []

    class Recorder(TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            evaluated_at.append(state.global_step)

    model = tiny_llama()
    federated = FederatedCallback(config(rounds=2), task_dataset())
    trainer = Trainer(
        model=model,
        args=args(tmp_path, federated.total_steps, eval_strategy="steps", eval_steps=3),
        train_dataset=federated.train_dataset,
        eval_dataset=task_dataset(rows_per_task=1).remove_columns("task"),
        optimizers=(KSeedZOOptimizer(model, lr=2e-3, num_seeds=32, seed=7), None),
        callbacks=[federated, Recorder()],
    )
    trainer.train()
    assert evaluated_at == [8, 16]  # asked at steps 3, 6, 9, 12, 15; run at the ends of rounds 0 and 1


def test_round_records_reach_callbacks_registered_before_it(tmp_path):
    class Reporter(TrainerCallback):  # stands in for a `report_to` integration, registered first
        def __init__(self):
            self.rounds = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "round" in logs:
                self.rounds.append(logs["round"])

    model = tiny_llama()
    federated = FederatedCallback(config(rounds=2), task_dataset())
    reporter = Reporter()
    trainer = Trainer(
        model=model,
        args=args(tmp_path, federated.total_steps),
        train_dataset=federated.train_dataset,
        optimizers=(KSeedZOOptimizer(model, lr=2e-3, num_seeds=32, seed=7), None),
        callbacks=[reporter, federated],
    )
    federated.move_before_reporters(trainer)
    trainer.train()
    assert reporter.rounds == [0, 1]
