"""The stock `transformers.Trainer` running KSeedZOOptimizer through its forward hooks."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import VOCAB, max_abs_diff, tiny_llama, token_batch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_fedkseed import KSeedZOOptimizer
from hf_fedkseed.forward_hooks import labelled_logits_only


def token_dataset(rows: int = 8, seq_len: int = 16, seed: int = 0) -> Dataset:
    tokens = token_batch(rows, seq_len, seed=seed).tolist()
    return Dataset.from_dict({"input_ids": tokens, "labels": tokens})


def training_args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=6,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


class ForwardRecorder:
    """Counts forwards of a module and records its training flag and the grad mode during each."""

    def __init__(self, module: torch.nn.Module):
        self.calls: list[tuple[bool, bool]] = []
        module.register_forward_pre_hook(lambda m, args: self.calls.append((m.training, torch.is_grad_enabled())))


class StepRecorder(TrainerCallback):
    def __init__(self, optimizer: KSeedZOOptimizer):
        self.optimizer = optimizer
        self.steps: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(dict(self.optimizer.last_step))


def test_stock_trainer_runs_zo_steps_without_gradients(tmp_path):
    model = tiny_llama()
    before = copy.deepcopy(model)
    optimizer = KSeedZOOptimizer(model, lr=1e-3, eps=1e-3, num_seeds=16)
    recorder = ForwardRecorder(model.model)  # the inner decoder sees both ZO forwards
    trainer = Trainer(
        model=model, args=training_args(tmp_path), train_dataset=token_dataset(), optimizers=(optimizer, None)
    )
    result = trainer.train()

    assert all(p.grad is None for p in model.parameters())
    assert max_abs_diff(model, before) > 1e-4
    assert optimizer.num_steps == 6
    assert len(recorder.calls) == 12  # two forward passes per optimizer step
    assert all(training is False and grad is False for training, grad in recorder.calls)  # eval mode, no graph
    assert model.training  # the Trainer's mode is restored after each ZO step
    assert torch.isfinite(torch.tensor(result.training_loss))


def test_evaluation_forwards_are_untouched(tmp_path):
    model = tiny_llama()
    optimizer = KSeedZOOptimizer(model, lr=1e-3, num_seeds=16)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=2),
        train_dataset=token_dataset(),
        eval_dataset=token_dataset(4, seed=1),
        optimizers=(optimizer, None),
    )
    trainer.train()
    weights = copy.deepcopy(model.state_dict())
    sampler_state = optimizer.sampler.generator.get_state()
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert optimizer.num_steps == 2
    assert torch.equal(optimizer.sampler.generator.get_state(), sampler_state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


def test_zo_training_lowers_the_loss_of_memorised_sequences(tmp_path):
    model = tiny_llama()
    data = token_dataset(rows=4)
    batch = torch.tensor(data["input_ids"])
    with torch.no_grad():
        initial = model(input_ids=batch, labels=batch).loss.item()
    optimizer = KSeedZOOptimizer(model, lr=3e-3, eps=1e-3, num_seeds=64, seed=1)
    args = training_args(tmp_path, per_device_train_batch_size=4, max_steps=300, logging_steps=50)
    Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None)).train()
    with torch.no_grad():
        final = model(input_ids=batch, labels=batch).loss.item()
    assert initial - final > 0.25, (initial, final)  # ~4.16 -> ~3.7 nats: a ZO signal, not noise


def test_gradient_accumulation_equals_a_larger_batch(tmp_path):
    data = token_dataset(rows=8)
    runs = {}
    for batch_size, accumulation in [(4, 1), (2, 2), (1, 4)]:
        model = tiny_llama()
        optimizer = KSeedZOOptimizer(model, lr=1e-3, eps=1e-3, num_seeds=16, seed=3)
        args = training_args(
            tmp_path / f"{batch_size}x{accumulation}",
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=4,
            train_sampling_strategy="sequential",
        )
        recorder = StepRecorder(optimizer)
        Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None), callbacks=[recorder]).train()
        runs[(batch_size, accumulation)] = (model, recorder.steps)
    big_model, big_steps = runs[(4, 1)]
    for key in [(2, 2), (1, 4)]:
        model, steps = runs[key]
        assert [s["seed_index"] for s in steps] == [s["seed_index"] for s in big_steps]  # one seed per step
        for mine, theirs in zip(steps, big_steps, strict=True):
            assert mine["projected_grad"] == pytest.approx(theirs["projected_grad"], rel=1e-3, abs=1e-2)
        for a, b in zip(model.parameters(), big_model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_the_trainer_scheduler_changes_the_step_size(tmp_path):
    model = tiny_llama()
    optimizer = KSeedZOOptimizer(model, lr=1e-3, num_seeds=16)
    recorder = StepRecorder(optimizer)
    args = training_args(tmp_path, lr_scheduler_type="linear", max_steps=5)
    Trainer(
        model=model, args=args, train_dataset=token_dataset(), optimizers=(optimizer, None), callbacks=[recorder]
    ).train()
    lrs = [step["lr"] for step in recorder.steps]
    assert lrs == pytest.approx([1e-3 * (1 - i / 5) for i in range(5)])


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    data = token_dataset(rows=8)

    def run(output_dir, max_steps, resume=None):
        model = tiny_llama()
        optimizer = KSeedZOOptimizer(model, lr=1e-3, eps=1e-3, num_seeds=16, seed=2)
        args = training_args(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=3, logging_steps=1)
        args.max_steps = max_steps
        trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
        trainer.train(resume_from_checkpoint=resume)
        return model, optimizer

    uninterrupted, uninterrupted_optimizer = run(tmp_path / "full", max_steps=7)
    run(tmp_path / "killed", max_steps=3)  # stops after checkpoint-3, as if killed there
    resumed, resumed_optimizer = run(tmp_path / "killed", max_steps=7, resume=str(tmp_path / "killed/checkpoint-3"))
    for a, b in zip(uninterrupted.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(uninterrupted_optimizer.accumulators, resumed_optimizer.accumulators)
    assert resumed_optimizer.num_steps == 7


def test_hooked_forward_equals_the_closure_step_and_reports_the_mean_loss():
    batch = token_batch()
    hooked_model, closure_model = tiny_llama(), tiny_llama()
    hooked = KSeedZOOptimizer(hooked_model, lr=1e-3, num_seeds=8, seed=9)
    closure = KSeedZOOptimizer(closure_model, lr=1e-3, num_seeds=8, seed=9)
    for _ in range(5):
        with torch.no_grad():
            clean_loss = hooked_model(input_ids=batch, labels=batch).loss.item()
        hooked.train()
        output = hooked_model(input_ids=batch, labels=batch)
        assert output.logits is None  # dropped to keep memory at inference level
        assert output.loss.requires_grad  # so the Trainer's backward() works, through a scalar leaf only
        output.loss.backward()
        hooked.step()
        # The hooks project only labelled positions onto the vocabulary; the closure does the same to match bit for bit.
        closure.step(
            lambda: closure_model(**labelled_logits_only(closure_model, {"input_ids": batch, "labels": batch})).loss
        )
        assert output.loss.item() == pytest.approx(hooked.last_step["loss"])
        assert output.loss.item() == pytest.approx(clean_loss, abs=1e-3)  # (L+ + L-)/2 = L(w) + O(eps^2)
    assert all(p.grad is None for p in hooked_model.parameters())
    for a, b in zip(hooked_model.parameters(), closure_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_failing_forward_restores_the_weights():
    model = tiny_llama()
    before = copy.deepcopy(model)
    optimizer = KSeedZOOptimizer(model, lr=1e-3, num_seeds=8)
    optimizer.train()
    with pytest.raises(Exception):  # noqa: B017 - whatever the model raises must come through
        model(input_ids=token_batch(), labels=token_batch(2, 5))  # mismatched labels: the loss raises
    assert optimizer._pending is None
    assert max_abs_diff(model, before) < 1e-6
    optimizer.train()
    with pytest.raises(ValueError, match="return a scalar loss"):
        model(input_ids=token_batch())  # no labels, no loss
    assert max_abs_diff(model, before) < 1e-6
    assert torch.is_grad_enabled()


def test_evaluation_between_micro_batches_sees_clean_weights():
    model = tiny_llama()
    before = copy.deepcopy(model)
    optimizer = KSeedZOOptimizer(model, lr=1e-3, num_seeds=8)
    optimizer.train()
    model(input_ids=token_batch(), labels=token_batch())  # weights now at w - eps z
    optimizer.eval()
    assert max_abs_diff(model, before) < 1e-6
    optimizer.train()
    model(input_ids=token_batch(), labels=token_batch())
    optimizer.step()
    assert optimizer.num_steps == 1


def test_fp16_amp_is_refused_with_the_fix(tmp_path):
    model = tiny_llama()
    before = copy.deepcopy(model)
    optimizer = KSeedZOOptimizer(model, lr=1e-3, num_seeds=8)
    args = training_args(tmp_path, fp16=True)
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(), optimizers=(optimizer, None))
    try:
        with pytest.raises(ValueError, match=r"cannot run with `fp16=True`.*Use `bf16=True`"):
            trainer.train()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # the fp16 state would refuse later tests' steps
    assert max_abs_diff(model, before) == 0.0  # refused before any weight moved


def test_labelled_logits_only_gives_the_same_loss_from_the_labelled_positions_alone():
    model = tiny_llama()
    batch = token_batch(seq_len=12)
    labels = torch.full_like(batch, -100)
    labels[:, 8:11] = batch[:, 8:11]  # a reply of 3 tokens
    labels[0, 3:5] = batch[0, 3:5]  # and rows that differ
    labels[2] = -100  # and a row with nothing to learn
    attention_mask = torch.ones_like(batch)
    attention_mask[1, 10:] = 0
    labels[1, 10:] = -100
    inputs = {"input_ids": batch, "attention_mask": attention_mask, "labels": labels}
    trimmed = labelled_logits_only(model, inputs)
    assert trimmed is not inputs and inputs.get("logits_to_keep") is None  # the caller's dict is left alone
    with torch.no_grad():
        full, partial = model(**inputs), model(**trimmed)
    next_token_labelled = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100) != -100
    assert partial.logits.shape == (int(next_token_labelled.sum()), VOCAB)
    torch.testing.assert_close(partial.logits, full.logits[next_token_labelled], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(partial.loss, full.loss, rtol=1e-6, atol=0.0)
    # No labels, an explicit choice of logits, or a model without `logits_to_keep`: the kwargs come back unchanged.
    assert labelled_logits_only(model, {"input_ids": batch}) == {"input_ids": batch}
    chosen = {**inputs, "logits_to_keep": 1}
    assert labelled_logits_only(model, chosen) is chosen
    plain = torch.nn.Linear(2, 2)
    assert labelled_logits_only(plain, inputs) is inputs


def test_a_zo_step_projects_only_the_labelled_positions(tmp_path):
    model = tiny_llama()
    projected_rows = []
    model.lm_head.register_forward_hook(lambda module, args, output: projected_rows.append(args[0].shape[:-1].numel()))
    batch = token_batch(seq_len=12)
    labels = torch.full_like(batch, -100)
    labels[:, 9:] = batch[:, 9:]
    optimizer = KSeedZOOptimizer(model, lr=1e-3, num_seeds=8, seed=1)
    optimizer.train()
    model(input_ids=batch, labels=labels).loss.backward()
    optimizer.step()
    assert projected_rows == [batch.shape[0] * 3, batch.shape[0] * 3]  # L+ and L-, 3 labelled next tokens per row
