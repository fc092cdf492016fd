"""One builder for every entry point: tokenizer, model, data splits and optimizer from a recipe's dataclasses."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "RecipeData",
    "build_data",
    "build_optimizer",
    "cap_rows",
    "load_data",
    "load_model",
    "load_tokenizer",
    "zo_optimizer_kwargs",
]


def cap_rows(dataset, limit: int | None, seed: int):
    """At most `limit` rows of `dataset`, a seeded random choice when it has more (all rows for None)."""
    if limit is None or len(dataset) <= limit:
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit))


def load_tokenizer(model_args):
    """The tokenizer of the base (`hf_fedkseed.bases.load_base_tokenizer`): `byt5`, a Hub id, a directory or a GGUF."""
    from .bases import load_base_tokenizer

    return load_base_tokenizer(model_args)


def load_model(model_args, *, seed: int, vocab_size: int | None = None):
    """The causal LM (`hf_fedkseed.bases.load_base_model`): from the Hub, a directory or a GGUF, or a seeded config."""
    from .bases import load_base_model

    return load_base_model(model_args, seed=seed, vocab_size=vocab_size)


def load_data(dataset_name: str, dataset_format: str, *, seed: int, data_args=None, **overrides):
    """The train/test splits of an instruction dataset, with the recipe's split options (`DataArguments`).

    Raises:
        RecipeError: for a dataset that cannot be read or has no training rows (one line naming `dataset_name`).
    """
    from .configs import RecipeError
    from .data import load_instruction_dataset

    options = {}
    if data_args is not None:
        options = dict(
            eval_fraction=data_args.eval_fraction,
            held_out_categories=data_args.held_out_categories,
            max_samples_per_task=data_args.max_samples_per_task,
        )
    options.update(overrides)
    try:
        data = load_instruction_dataset(dataset_name, dataset_format, seed=seed, **options)
    except (ValueError, OSError) as error:
        raise RecipeError(f"`dataset_name`: {' '.join(str(error).split())}") from None
    if len(data["train"]) == 0 and data_args is not None:
        raise RecipeError(f"`dataset_name`: dataset {dataset_name!r} has no training rows; check the file.")
    return data


@dataclass
class RecipeData:
    """A recipe's tokenized rows: training rows, held-out prompts for generation and the same rows for the loss."""

    tokenizer: object
    train_rows: object
    eval_rows: object
    loss_rows: object
    collator: object


def build_data(data_args, model_args, *, seed: int, with_eval: bool = True, tokenizer=None) -> RecipeData:
    """Load and tokenize a recipe's data the way every runtime does, so they all read the same rows.

    The dataset is read first and the tokenizer (`tokenizer`, or the base's) loaded after, so a bad dataset fails
    before anything heavy loads.

    Raises:
        RecipeError: for a dataset that cannot be read, has no training rows, or does not tokenize.
    """
    from .configs import RecipeError
    from .data import tokenize_for_generation, tokenize_for_training, training_collator

    data = load_data(data_args.dataset_name, data_args.dataset_format, seed=seed, data_args=data_args)
    tokenizer = load_tokenizer(model_args) if tokenizer is None else tokenizer
    prompt_format, max_length = data_args.prompt_format, data_args.max_length
    try:
        train_rows = tokenize_for_training(data["train"], tokenizer, max_length, prompt_format=prompt_format)
        eval_rows = loss_rows = None
        if with_eval:
            test = cap_rows(data["test"], data_args.max_eval_samples, seed)
            eval_rows = tokenize_for_generation(test, tokenizer, max_length, prompt_format=prompt_format)
            loss_rows = tokenize_for_training(test, tokenizer, max_length, prompt_format=prompt_format)
    except ValueError as error:
        raise RecipeError(" ".join(str(error).split())) from None
    return RecipeData(tokenizer, train_rows, eval_rows, loss_rows, training_collator(tokenizer))


def zo_optimizer_kwargs(zo_args, training_args) -> dict:
    """The keyword arguments every zeroth-order optimizer of a recipe takes: lr, eps, seed, engine, clip."""
    return dict(
        lr=training_args.learning_rate,
        eps=zo_args.zo_eps,
        seed=training_args.seed,
        engine=zo_args.engine_name,
        grad_clip=zo_args.grad_clip,
    )


def build_optimizer(model, zo_args, training_args):
    """The recipe's `KSeedZOOptimizer` over `model` (FedZO's optimizer takes `zo_optimizer_kwargs` the same way)."""
    from .optimizer import KSeedZOOptimizer

    return KSeedZOOptimizer(
        model,
        num_seeds=zo_args.num_seeds,
        estimator=zo_args.zo_estimator,
        directions=zo_args.zo_directions,
        **zo_optimizer_kwargs(zo_args, training_args),
    )
