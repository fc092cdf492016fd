"""Tune every parameter of a small Llama with zeroth-order K-seed steps inside the unmodified `transformers.Trainer`.

Runs offline in about a minute on 2 CPU cores: the model is built from a config and the tokenizer is byte-level, so
nothing is downloaded. Swap in `AutoModelForCausalLM.from_pretrained(...)` and your dataset for a real run.

    python examples/stock_trainer.py --output_dir outputs/stock_trainer
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    ByT5Tokenizer,
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

from hf_fedkseed import KSeedZOOptimizer

FACTS = [
    "The capital of France is Paris.",
    "Water boils at 100 degrees Celsius.",
    "A week has seven days.",
    "The sum of two and three is five.",
]


def mean_loss(model: LlamaForCausalLM, dataset: Dataset, collator) -> float:
    batch = collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        return model(**batch).loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/stock_trainer")
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--zo_eps", type=float, default=1e-3)
    parser.add_argument("--num_seeds", type=int, default=256)
    args = parser.parse_args()

    tokenizer = ByT5Tokenizer()  # byte-level: needs no vocabulary file
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # reproducible initial weights for the demo
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)

    dataset = Dataset.from_dict({"text": FACTS}).map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    before = mean_loss(model, dataset, collator)

    optimizer = KSeedZOOptimizer(model, lr=args.learning_rate, eps=args.zo_eps, num_seeds=args.num_seeds, seed=42)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=len(FACTS),
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,  # the Trainer's scheduler drives the optimizer's param-group lr
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # there are no gradients to clip in ZO training
        logging_steps=50,
        save_strategy="no",
        report_to="none",
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        optimizers=(optimizer, None),
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = mean_loss(model, dataset, collator)

    summary = {
        "loss_before": round(before, 4),
        "loss_after": round(after, 4),
        "steps": optimizer.num_steps,
        "seeds_used": int((optimizer.accumulators != 0).sum()),
        "skipped_steps": optimizer.num_skipped_nonfinite + optimizer.num_skipped_clipped,
        "train_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "any_grad_allocated": any(p.grad is not None for p in model.parameters()),
    }
    output_dir = Path(args.output_dir)
    trainer.save_model(str(output_dir))
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
