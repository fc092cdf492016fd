"""The `hf-fedkseed` command line: `train`, `eval`, `push` and `env`; heavy imports happen per command."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys

__all__ = ["USAGE_ERROR", "build_parser", "main"]

USAGE_ERROR = 2  # argparse's and the shell's convention for a wrong command line


def _env() -> int:
    """Print the versions a bug report needs."""
    from importlib.metadata import PackageNotFoundError, version

    from .version import __version__

    print(f"hf-fedkseed {__version__}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    for package in ("torch", "transformers", "accelerate", "datasets", "evaluate", "peft", "flwr", "bitsandbytes"):
        try:
            print(f"{package} {version(package)}")
        except PackageNotFoundError:
            print(f"{package} not installed")
    import torch

    print(f"cuda available: {torch.cuda.is_available()}")
    return 0


def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("hf_fedkseed").setLevel(logging.INFO)


def _train(recipe: str | None, overrides: list[str]) -> int:
    from .configs import RecipeError, parse_recipe

    if recipe in ("-h", "--help") or "-h" in overrides or "--help" in overrides:
        from transformers import HfArgumentParser

        from .configs import recipe_dataclasses

        HfArgumentParser(recipe_dataclasses(), prog="hf-fedkseed train RECIPE.yaml").print_help()
        return 0
    try:
        model_args, data_args, zo_args, federated_config, training_args = parse_recipe(recipe, overrides)
        from .bases import resolve_base

        resolve_base(model_args)  # a missing package or GGUF file fails here, before anything heavy loads
    except RecipeError as error:  # BaseModelError included
        return _usage_error("train", error)
    _setup_logging()
    from .pipeline import run_training

    try:  # the output directory, the checkpoint, the data and the partition are checked before the model loads
        results = run_training(model_args, data_args, zo_args, federated_config, training_args)
    except RecipeError as error:  # CheckpointError included
        return _usage_error("train", error)
    print(json.dumps(results, indent=2))
    return 0


def _usage_error(command: str, error: Exception) -> int:
    """Print one line, `hf-fedkseed COMMAND: error: ...`, and return the usage-error exit code."""
    print(f"hf-fedkseed {command}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return USAGE_ERROR


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    if not Path(args.model_dir).is_dir():
        print(f"hf-fedkseed eval: error: model directory {args.model_dir!r} not found", file=sys.stderr)
        return USAGE_ERROR
    _setup_logging()
    from transformers import AutoModelForCausalLM

    from .build import cap_rows, load_data, load_tokenizer
    from .configs import ModelArguments, RecipeError
    from .data import tokenize_for_generation
    from .evaluation import evaluate_rouge_l

    try:  # the data first: a bad dataset fails before the model loads
        data = load_data(
            args.dataset_name, args.dataset_format, seed=args.seed, held_out_categories=args.held_out_categories
        )
    except RecipeError as error:
        return _usage_error("eval", error)
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=args.model_dir, tokenizer_name=args.tokenizer_name))
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    test = cap_rows(data["test"], args.max_eval_samples, args.seed)
    rows = tokenize_for_generation(test, tokenizer, args.max_length, prompt_format=args.prompt_format)
    result = evaluate_rouge_l(model, tokenizer, rows, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    text = json.dumps(result, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-fedkseed",
        description="Federated full-parameter tuning of language models with zeroth-order steps over K seeds.",
    )
    parser.add_argument("--version", action="store_true", help="print the package version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser(
        "train",
        help="run a YAML recipe: federated FedKSeed rounds, Rouge-L before and after, outputs",
        description="Run a recipe. Any recipe field can be overridden as `--field value` after the recipe path; "
        "`hf-fedkseed train --help` lists every field.",
        add_help=False,
    )
    train.add_argument("recipe", nargs="?", help="path of the YAML recipe, e.g. recipes/quickstart.yaml")
    evaluate = commands.add_parser("eval", help="Rouge-L of a saved model on the held-out split of a dataset")
    evaluate.add_argument("model_dir", help="directory written by `hf-fedkseed train` (or any causal LM)")
    evaluate.add_argument("--dataset_name", required=True, help="Hub id or local path of the instruction data")
    evaluate.add_argument(
        "--dataset_format", required=True, choices=("alpaca", "natural_instructions", "dolly"), help="column layout"
    )
    evaluate.add_argument("--held_out_categories", nargs="+", default=None, help="Dolly categories to evaluate on")
    evaluate.add_argument("--tokenizer_name", default=None, help="`byt5` or a tokenizer id (default: the model's)")
    evaluate.add_argument("--max_eval_samples", type=int, default=None, help="evaluate at most this many rows")
    evaluate.add_argument("--max_new_tokens", type=int, default=128, help="greedy generation length")
    evaluate.add_argument("--max_length", type=int, default=1024, help="prompt tokens kept (left-truncated)")
    evaluate.add_argument(
        "--prompt_format",
        choices=("alpaca", "chat"),
        default="alpaca",
        help="how rows become prompts: the paper's Alpaca template (default) or the tokenizer's chat template; "
        "use the recipe's `prompt_format` the model was trained with",
    )
    evaluate.add_argument("--batch_size", type=int, default=8, help="generation batch size")
    evaluate.add_argument("--seed", type=int, default=42, help="seeds the choice of evaluated rows")
    evaluate.add_argument("--output", default=None, help="also write the JSON result to this file")
    commands.add_parser("env", help="print the versions of hf-fedkseed and its dependencies")
    from .hub import add_push_arguments

    add_push_arguments(
        commands.add_parser(
            "push",
            help="upload a run (merged model, KSeed delta, model card) to the Hugging Face Hub",
            description="Create the repository if needed and upload OUTPUT_DIR in one commit (checkpoints are left "
            "out). The token comes from HF_TOKEN or `hf auth login`.",
        )
    )
    from .flower_run import add_flower_arguments

    add_flower_arguments(
        commands.add_parser(
            "flower",
            help="run a recipe as a Flower deployment in a local simulation (one SuperNode per client)",
            description="Run the FedKSeed Flower ServerApp and ClientApps of a recipe in Flower's local simulation. "
            "Recipe fields can be overridden as `--field value` after the recipe path.",
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.version:
        from .version import __version__

        print(__version__)
        return 0
    if args.command == "train":
        return _train(args.recipe, rest)
    if args.command == "flower":
        from .flower_run import run_flower

        return run_flower(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "eval":
        return _eval(args)
    if args.command == "env":
        return _env()
    if args.command == "push":
        from .hub import run_push

        return run_push(args)
    parser.print_help()
    return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
