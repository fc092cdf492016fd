"""Instruction datasets in the paper's three formats (Alpaca, Natural-Instructions, Dolly), prompts and tokenization."""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np

if TYPE_CHECKING:
    from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

FORMATS = ("alpaca", "natural_instructions", "dolly")
# Every loaded split has exactly these string columns, whatever the source format.
COLUMNS = ("instruction", "input", "output", "category")
# The columns a flat (file or Hub) source must have, per format, in the order error messages list them. A flat
# Natural-Instructions source uses the layout of the Hub's `Muennighoff/natural-instructions`; a raw
# allenai/natural-instructions checkout (tasks/*.json + splits/) is read by `_read_natural_instructions_dir`.
SOURCE_COLUMNS = {
    "alpaca": ("instruction", "input", "output"),
    "dolly": ("instruction", "context", "response", "category"),
    "natural_instructions": ("task_name", "definition", "inputs", "targets"),
}
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# The synthetic Natural-Instructions-format tasks shipped with the package (see scripts/make_quickstart_data.py).
QUICKSTART_DATA_DIR = Path(__file__).resolve().parent / "resources" / "quickstart"

# The Alpaca template (Taori et al., 2023), which FedKSeed uses for every dataset.
PROMPT_TEMPLATE = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    ),
}
# How a row becomes a prompt: the paper's Alpaca template, or the tokenizer's own chat template (instruct models).
PROMPT_FORMATS = ("alpaca", "chat")
_FEATURES = datasets.Features({column: datasets.Value("string") for column in COLUMNS})
# A list of token ids; `datasets.List` appeared in datasets 4.0, `Sequence` is its older spelling.
_TOKEN_IDS = (datasets.List if hasattr(datasets, "List") else datasets.Sequence)(datasets.Value("int64"))
# Long name lists (Natural-Instructions has ~1,600 tasks) are cut to this many in error messages.
_PREVIEW_LIMIT = 20


def build_prompt(instruction: str, input: str = "") -> str:
    """Fill the Alpaca template: the with-input variant when `input` has text, the no-input one otherwise.

    Args:
        instruction: the task description (an NI definition, a Dolly or Alpaca instruction).
        input: the instance's input or context; empty or whitespace-only selects the no-input variant.

    Returns:
        The prompt, ending with "### Response:\\n", after which the response is generated.

    Example:
        >>> build_prompt("Repeat the word.", "apple").endswith("### Input:\\napple\\n\\n### Response:\\n")
        True
    """
    if input.strip():
        return PROMPT_TEMPLATE["prompt_input"].format(instruction=instruction, input=input)
    return PROMPT_TEMPLATE["prompt_no_input"].format(instruction=instruction)


def format_prompt(
    instruction: str, input: str = "", tokenizer: PreTrainedTokenizerBase | None = None, prompt_format: str = "alpaca"
) -> str:
    """The prompt text of one row, after which the model writes its response, in either prompt format.

    * `alpaca`: `build_prompt(instruction, input)`, the paper's template; `tokenizer` is not used.
    * `chat`: one user turn rendered by the tokenizer's chat template with the generation prompt, e.g. for ChatML
      "<|im_start|>user\\n{instruction}\\n\\n{input}<|im_end|>\\n<|im_start|>assistant\\n" (after the template's own
      default system turn, if it has one). The user message is the instruction, plus "\\n\\n" and the input when the
      input has text.

    Args:
        instruction: the task description.
        input: the instance's input or context; empty or whitespace-only leaves it out.
        tokenizer: the tokenizer whose `chat_template` renders the prompt; needed for `chat` only.
        prompt_format: one of `PROMPT_FORMATS`.

    Returns:
        The prompt text (for `chat`, with any special tokens the template writes, such as a BOS).

    Raises:
        ValueError: for an unknown `prompt_format`, or for `chat` without a tokenizer or without a chat template.

    Example:
        >>> format_prompt("Repeat the word.", "apple") == build_prompt("Repeat the word.", "apple")
        True
        >>> prompt = format_prompt("Repeat the word.", "apple", chatml_tokenizer, "chat")  # doctest: +SKIP
        >>> prompt.endswith("user\\nRepeat the word.\\n\\napple<|im_end|>\\n<|im_start|>assistant\\n")  # doctest: +SKIP
        True
    """
    _check_prompt_format(prompt_format)
    if prompt_format == "alpaca":
        return build_prompt(instruction, input)
    if tokenizer is None:
        raise ValueError("prompt_format='chat' renders the tokenizer's chat template: pass the `tokenizer`.")
    _check_chat_template(tokenizer)
    return _render_chat(tokenizer, [_user_turn(instruction, input)], add_generation_prompt=True)


def end_of_turn_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the tokenizer's chat template closes an assistant turn with, or None.

    Read from the template itself, not from a list of names: the first special token that the template writes after
    an assistant reply (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, `<end_of_turn>` for Gemma). Generation
    must stop there, since an instruct model emits it, not necessarily its `eos_token`, when it has answered.

    Args:
        tokenizer: a `transformers` tokenizer.

    Returns:
        The token id, or None when the tokenizer has no chat template, the template fails to render a user turn and a
        reply, or it writes no special token after the reply.

    Example:
        >>> end_of_turn_token_id(AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct"))  # doctest: +SKIP
        2
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    reply = "Done."
    try:
        _, completion = _chat_prompt_and_completion(tokenizer, "Say done.", "", reply)
    except Exception:  # any template that cannot render this probe has no end of turn we can read
        return None
    position = completion.find(reply)
    if position < 0:
        return None
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    special.update(
        int(token_id)
        for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
        if getattr(token, "special", False)
    )
    tail = _encode(tokenizer, [completion[position + len(reply) :]])
    return next((token for token in (tail[0] if tail else []) if token in special), None)


def load_instruction_dataset(
    dataset_name: str | os.PathLike,
    dataset_format: str,
    *,
    eval_fraction: float = 0.02,
    held_out_categories: Iterable[str] | str | None = None,
    test_tasks: Iterable[str] | str | None = None,
    max_samples_per_task: int | None = None,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Load an instruction dataset and split it, normalised to the columns instruction, input, output, category.

    Sources: a Hub dataset id (`datasets.load_dataset(name)`; its "train" split, or its only one, for Alpaca and
    Dolly), a local `.json`/`.jsonl`/`.parquet` file, or, for Natural-Instructions, a raw allenai/natural-instructions
    directory (`tasks/*.json` plus `splits/default/{train,test}_tasks.txt`).

    * `alpaca` (columns instruction, input, output): category is ""; test is a seeded `eval_fraction` of the rows.
    * `dolly` (columns instruction, context, response, category): context becomes input and response output; test is
      the rows whose category is in `held_out_categories` (the paper holds out "summarization"), else a seeded
      `eval_fraction` of the rows.
    * `natural_instructions`: instruction is the task definition, input the instance input, output its first
      reference output, category the task name. Train and test are the tasks listed in the splits files (`test_tasks`
      overrides the test list; train is then the listed train tasks, or every other task, minus the test tasks). A
      flat source needs the columns task_name, definition, inputs, targets (`Muennighoff/natural-instructions`) and
      either `test_tasks` or train and test splits of its own.

    Both splits keep the source's row order.

    Args:
        dataset_name: a Hub dataset id or a local path.
        dataset_format: one of `FORMATS`.
        eval_fraction: the share of rows held out as test (Alpaca, and Dolly without `held_out_categories`), in
            [0, 1); at least one row when positive.
        held_out_categories: Dolly categories that form the test split.
        test_tasks: Natural-Instructions task names that form the test split, instead of the splits file.
        max_samples_per_task: Natural-Instructions only: keep at most this many instances of each task, a seeded
            draw that depends only on `seed` and the task name.
        seed: seeds the eval_fraction split and the per-task caps.

    Returns:
        A `datasets.DatasetDict` with "train" and "test" splits of string columns instruction, input, output, category.

    Raises:
        ValueError: for an unknown format, a local path that does not exist, an unsupported file type, a missing
            column, an option that does not apply to the format, an out-of-range `eval_fraction` or
            `max_samples_per_task`, held-out categories or test tasks absent from the data, or a malformed
            Natural-Instructions directory.

    Example:
        >>> splits = load_instruction_dataset(QUICKSTART_DATA_DIR, "natural_instructions")
        >>> splits["train"].column_names
        ['instruction', 'input', 'output', 'category']
        >>> splits = load_instruction_dataset("databricks/databricks-dolly-15k", "dolly",
        ...                                   held_out_categories=["summarization"])  # doctest: +SKIP
    """
    if dataset_format not in FORMATS:
        raise ValueError(f"Unknown dataset_format={dataset_format!r}; pass one of: {', '.join(FORMATS)}.")
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, int | float) or not 0 <= eval_fraction < 1:
        raise ValueError(f"Invalid `eval_fraction`: {eval_fraction!r}; pass a number in [0, 1).")
    held_out_categories = _as_names(held_out_categories, "held_out_categories")
    test_tasks = _as_names(test_tasks, "test_tasks")
    if held_out_categories is not None and dataset_format != "dolly":
        raise ValueError(
            f"`held_out_categories` applies to dataset_format='dolly' only, not {dataset_format!r}; "
            "for natural_instructions pass `test_tasks`, for alpaca `eval_fraction`."
        )
    if dataset_format != "natural_instructions":
        for option, value in (("test_tasks", test_tasks), ("max_samples_per_task", max_samples_per_task)):
            if value is not None:
                raise ValueError(
                    f"`{option}` applies to dataset_format='natural_instructions' only, not {dataset_format!r}."
                )
    if max_samples_per_task is not None and (
        isinstance(max_samples_per_task, bool) or not isinstance(max_samples_per_task, int) or max_samples_per_task < 1
    ):
        raise ValueError(f"Invalid `max_samples_per_task`: {max_samples_per_task!r}; pass a positive int or None.")

    name = os.fspath(dataset_name)
    path = Path(name).expanduser()
    if path.is_dir() and (path / "tasks").is_dir():
        if dataset_format != "natural_instructions":
            raise ValueError(
                f"{name!r} is a Natural-Instructions directory (it has tasks/); "
                f"pass dataset_format='natural_instructions' instead of {dataset_format!r}."
            )
        return _read_natural_instructions_dir(path, test_tasks, max_samples_per_task, seed)
    if not path.exists() and _looks_local(name):
        raise ValueError(
            f"Dataset path {name!r} does not exist; pass an existing .json, .jsonl or .parquet file, a "
            "Natural-Instructions directory (with tasks/ and splits/default/), or a Hub dataset id."
        )

    source = _read_source(name, path)
    first = source[next(iter(source))]
    _check_columns(first.column_names, dataset_format, name)
    if dataset_format == "natural_instructions":
        return _split_flat_natural_instructions(source, name, test_tasks, max_samples_per_task, seed)
    if len(source) > 1 and "train" not in source:
        raise ValueError(
            f"Dataset {name!r} has splits {', '.join(source)} and none is named 'train'; "
            "save the rows to use as one .jsonl or .parquet file and load that."
        )
    table = _normalise(source.get("train", first), dataset_format)
    if held_out_categories is not None:
        return _split_by_category(table, held_out_categories, name)
    train_rows, test_rows = _fraction_split(len(table), eval_fraction, seed)
    return datasets.DatasetDict({"train": table.select(train_rows), "test": table.select(test_rows)})


def tokenize_for_training(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, *, prompt_format: str = "alpaca"
) -> datasets.Dataset:
    """Tokenize prompt + response for causal-LM training, with the loss on the response and its end token only.

    Prompt and completion are tokenized separately without special tokens, so the boundary is exact for any tokenizer;
    labels are -100 over the prompt and equal the input ids elsewhere.

    * `alpaca`: each row is `[bos] + prompt + response + [eos]` with `build_prompt`'s prompt (bos only if the tokenizer
      adds one by default).
    * `chat`: the prompt is `format_prompt(..., prompt_format="chat")`, one user turn and the generation prompt; the
      completion is what the template adds to it for the assistant reply, kept up to and including the last
      `eos_token_id` in it (for ChatML: reply + "<|im_end|>", without the trailing "\\n"), or with `eos_token_id`
      appended if it has none. The template writes any BOS itself.

    Rows longer than `max_length` lose their end; rows whose prompt alone fills `max_length` would have no supervised
    token and are dropped (with a warning that gives the count).

    Args:
        dataset: rows with instruction, input, output (and category, which is kept for partitioning clients).
        tokenizer: a `transformers` tokenizer with an `eos_token_id` (and a `chat_template` for `chat`).
        max_length: the most tokens a row keeps.
        prompt_format: one of `PROMPT_FORMATS`: the paper's Alpaca template, or the tokenizer's chat template.

    Returns:
        A `datasets.Dataset` with columns input_ids, attention_mask, labels (and category), in the input's order.

    Raises:
        ValueError: if a column is missing, the tokenizer has no EOS token, `max_length` is not a positive int, the
            prompt format is unknown, or for `chat` the tokenizer has no chat template or one whose reply render does
            not start with its prompt render.

    Example:
        >>> from transformers import ByT5Tokenizer
        >>> splits = load_instruction_dataset(QUICKSTART_DATA_DIR, "natural_instructions")
        >>> train = tokenize_for_training(splits["train"], ByT5Tokenizer(), max_length=512)
        >>> train.column_names
        ['input_ids', 'attention_mask', 'labels', 'category']
    """
    _check_prompt_format(prompt_format)
    _check_max_length(max_length)
    _check_row_columns(dataset, ("instruction", "input", "output"), "tokenize_for_training")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "The tokenizer has no `eos_token_id`, so responses cannot be terminated; set `tokenizer.eos_token`."
        )
    chat = prompt_format == "chat"
    if chat:
        _check_chat_template(tokenizer)
    prefix = [] if chat else _bos_prefix(tokenizer)
    keep_category = "category" in dataset.column_names

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        rows_text = zip(batch["instruction"], batch["input"], batch["output"], strict=True)
        if chat:
            texts = [_chat_prompt_and_completion(tokenizer, i, x, y) for i, x, y in rows_text]
            prompt_ids = _encode(tokenizer, [prompt for prompt, _ in texts])
            response_ids = [_through_last_eos(ids, eos) for ids in _encode(tokenizer, [c for _, c in texts])]
        else:
            prompt_ids = _encode(tokenizer, [build_prompt(i, x) for i, x, _ in rows_text])
            response_ids = [[*ids, eos] for ids in _encode(tokenizer, batch["output"])]
        rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        if keep_category:
            rows["category"] = []
        for position, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
            prompt = prefix + prompt
            if len(prompt) >= max_length:  # no room left for a single response token
                continue
            input_ids = (prompt + response)[:max_length]
            rows["input_ids"].append(input_ids)
            rows["attention_mask"].append([1] * len(input_ids))
            rows["labels"].append([-100] * len(prompt) + input_ids[len(prompt) :])
            if keep_category:
                rows["category"].append(batch["category"][position])
        return rows

    features = datasets.Features(
        {column: _TOKEN_IDS for column in ("input_ids", "attention_mask", "labels")}
        | ({"category": dataset.features["category"]} if keep_category else {})
    )
    tokenized = dataset.map(
        tokenize, batched=True, remove_columns=dataset.column_names, features=features, desc="Tokenizing"
    )
    dropped = len(dataset) - len(tokenized)
    if dropped:
        logger.warning(
            "Dropped %d of %d rows whose prompt alone fills max_length=%d (no response token left to train on); "
            "raise `max_length` to keep them.",
            dropped,
            len(dataset),
            max_length,
        )
    return tokenized


def tokenize_for_generation(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, *, prompt_format: str = "alpaca"
) -> datasets.Dataset:
    """Tokenize the prompts for generation, keeping the reference output text for scoring (e.g. Rouge-L).

    Each row is the prompt of `format_prompt`: `[bos] + build_prompt(...)` for `alpaca` (bos only if the tokenizer
    adds one by default), the chat template's user turn and generation prompt for `chat`. A longer prompt loses its
    start (after a leading bos), since the end of the prompt ("### Response:", or the assistant header) is what the
    model continues from.

    Args:
        dataset: rows with instruction, input, output (and category, which is kept).
        tokenizer: a `transformers` tokenizer (with a `chat_template` for `chat`).
        max_length: the most prompt tokens a row keeps.
        prompt_format: one of `PROMPT_FORMATS`; use the one the model was trained with.

    Returns:
        A `datasets.Dataset` with columns input_ids, attention_mask, reference (and category), in the input's order.

    Raises:
        ValueError: if a column is missing, `max_length` is not a positive int, the prompt format is unknown, or for
            `chat` the tokenizer has no chat template.

    Example:
        >>> from transformers import ByT5Tokenizer
        >>> splits = load_instruction_dataset(QUICKSTART_DATA_DIR, "natural_instructions")
        >>> test = tokenize_for_generation(splits["test"], ByT5Tokenizer(), max_length=512)
        >>> test.column_names
        ['input_ids', 'attention_mask', 'reference', 'category']
    """
    _check_prompt_format(prompt_format)
    _check_max_length(max_length)
    _check_row_columns(dataset, ("instruction", "input", "output"), "tokenize_for_generation")
    chat = prompt_format == "chat"
    if chat:
        _check_chat_template(tokenizer)
    prefix = [] if chat else _bos_prefix(tokenizer)
    bos = tokenizer.bos_token_id
    keep_category = "category" in dataset.column_names

    def keep_end(ids: list[int]) -> list[int]:
        """The ids cut to max_length from the left, keeping a leading bos (ours, or the one the template wrote)."""
        head = 1 if chat and bos is not None and ids[:1] == [bos] else 0
        kept_prefix, body = (prefix + ids[:head])[:max_length], ids[head:]
        room = max_length - len(kept_prefix)
        return kept_prefix + body[max(len(body) - room, 0) :]

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        prompts = [
            format_prompt(i, x, tokenizer, prompt_format)
            for i, x in zip(batch["instruction"], batch["input"], strict=True)
        ]
        input_ids = [keep_end(ids) for ids in _encode(tokenizer, prompts)]
        rows = {
            "input_ids": input_ids,
            "attention_mask": [[1] * len(ids) for ids in input_ids],
            "reference": list(batch["output"]),
        }
        if keep_category:
            rows["category"] = list(batch["category"])
        return rows

    features = datasets.Features(
        {"input_ids": _TOKEN_IDS, "attention_mask": _TOKEN_IDS, "reference": dataset.features["output"]}
        | ({"category": dataset.features["category"]} if keep_category else {})
    )
    return dataset.map(
        tokenize, batched=True, remove_columns=dataset.column_names, features=features, desc="Tokenizing prompts"
    )


def training_collator(
    tokenizer: PreTrainedTokenizerBase, *, pad_to_multiple_of: int | None = None
) -> DataCollatorForSeq2Seq:
    """The training batch collator: `transformers.DataCollatorForSeq2Seq`, which pads causal-LM rows correctly.

    It pads input_ids with the pad token, attention_mask with 0 and labels with -100, on the tokenizer's padding side,
    so no causal-LM-specific collator is needed. It accepts only token columns: the Trainer drops `category` (and any
    column the model's forward does not take) before collating, as long as `remove_unused_columns=True` (the default).

    Args:
        tokenizer: the tokenizer the rows were built with; needs a pad token.
        pad_to_multiple_of: pad each batch to a multiple of this length (e.g. 8 for tensor cores), or None.

    Returns:
        A `transformers.DataCollatorForSeq2Seq` returning PyTorch tensors.

    Raises:
        ValueError: if the tokenizer has no pad token.

    Example:
        >>> from transformers import ByT5Tokenizer
        >>> collator = training_collator(ByT5Tokenizer())
        >>> collator([{"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [-100, 6]},
        ...           {"input_ids": [7], "attention_mask": [1], "labels": [7]}])["labels"].tolist()
        [[-100, 6], [7, -100]]
    """
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token_id is None:
        raise ValueError(
            "The tokenizer has no pad token, so batches cannot be padded; set one first, "
            "e.g. `tokenizer.pad_token = tokenizer.eos_token` (padded label positions are -100 either way)."
        )
    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt"
    )


def _check_prompt_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"Unknown prompt_format={prompt_format!r}; pass one of: {', '.join(PROMPT_FORMATS)}.")


def _check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"prompt_format='chat' needs a chat template, and the tokenizer ({type(tokenizer).__name__}) has no chat "
            "template; use `prompt_format: alpaca`, or set `tokenizer.chat_template` to a Jinja template."
        )


def _user_turn(instruction: str, input: str) -> dict[str, str]:
    """The one user message of a row: the instruction, then a blank line and the input when the input has text."""
    return {"role": "user", "content": f"{instruction}\n\n{input}" if input.strip() else instruction}


def _render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool
) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _chat_prompt_and_completion(
    tokenizer: PreTrainedTokenizerBase, instruction: str, input: str, output: str
) -> tuple[str, str]:
    """(prompt, completion) texts: the user turn with the generation prompt, and what the assistant reply adds to it."""
    user = _user_turn(instruction, input)
    prompt = _render_chat(tokenizer, [user], add_generation_prompt=True)
    full = _render_chat(tokenizer, [user, {"role": "assistant", "content": output}], add_generation_prompt=False)
    if not full.startswith(prompt):
        differ = next(
            (position for position, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b),
            min(len(prompt), len(full)),
        )
        raise ValueError(
            "The tokenizer's chat template renders the conversation with the assistant's reply so that it does not "
            "start with the prompt it renders with add_generation_prompt=True, so the prompt/reply boundary is "
            f"undefined (they differ at character {differ}: prompt {prompt[differ : differ + 40]!r}, with reply "
            f"{full[differ : differ + 40]!r}); use `prompt_format: alpaca`, or set `tokenizer.chat_template` to a "
            "template whose generation prompt is a prefix of the rendered reply."
        )
    return prompt, full[len(prompt) :]


def _through_last_eos(ids: list[int], eos: int) -> list[int]:
    """A completion's ids up to and including its last EOS (the end of turn), or with EOS appended if it has none."""
    if eos not in ids:
        return [*ids, eos]
    return ids[: len(ids) - ids[::-1].index(eos)]


def _as_names(names: Iterable[str] | str | None, option: str) -> list[str] | None:
    """A list of names from a list, a tuple, a set or a single string (not split into characters)."""
    if names is None:
        return None
    names = [names] if isinstance(names, str) else list(names)
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"Invalid `{option}`: {names!r}; pass a non-empty list of names, or None.")
    return names


def _preview(names: Iterable[Any]) -> str:
    names = list(names)
    shown = ", ".join(str(name) for name in names[:_PREVIEW_LIMIT])
    return shown if len(names) <= _PREVIEW_LIMIT else f"{shown}, ... ({len(names)} in all)"


def _looks_local(name: str) -> bool:
    """Whether a name that does not exist was meant as a local path rather than a Hub id ("owner/name")."""
    return (
        Path(name).suffix.lower() in FILE_BUILDERS
        or name.startswith((".", "/", "~"))
        or os.sep in name.replace("/", "")
        or name.count("/") > 1
    )


def _read_source(name: str, path: Path) -> datasets.DatasetDict:
    """The splits of a local data file or folder, or of a Hub dataset."""
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Unsupported file type {path.suffix!r} for dataset {name!r}; pass a .json, .jsonl or .parquet file."
            )
        if path.stat().st_size == 0 or (builder == "json" and not _check_utf8(path)):
            raise ValueError(f"Dataset file {name!r} is empty; pass a file with rows.")
        source = datasets.load_dataset(builder, data_files={"train": str(path)})
    else:
        source = datasets.load_dataset(str(path) if path.is_dir() else name)
    if not source or all(len(split) == 0 for split in source.values()):
        raise ValueError(f"Dataset {name!r} holds no rows; pass a file or dataset with rows.")
    return source


def _check_utf8(path: Path, chunk_bytes: int = 1 << 24) -> bool:
    """Raise a ValueError naming `path` and the first bad byte unless the file is UTF-8 text (read in chunks).

    Returns:
        Whether the file holds anything but whitespace.
    """
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, content = 0, False
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"Dataset file {str(path)!r} is not UTF-8 text (byte {offset + error.start}: {error.reason}); "
                    "convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8`."
                ) from None
            if not chunk:
                return content
            content = content or bool(chunk.strip())
            offset += len(chunk)


def _check_columns(found: list[str], dataset_format: str, name: str) -> None:
    needed = SOURCE_COLUMNS[dataset_format]
    missing = [column for column in needed if column not in found]
    if missing:
        noun = "column" if len(missing) == 1 else "columns"
        raise ValueError(
            f"dataset {name!r} has no {noun} {', '.join(f'`{column}`' for column in missing)} for "
            f"dataset_format={dataset_format!r}, which needs {', '.join(needed)}; found: {', '.join(found)}"
        )


def _check_row_columns(dataset: datasets.Dataset, needed: tuple[str, ...], caller: str) -> None:
    missing = [column for column in needed if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{caller} needs the columns {', '.join(needed)}; missing: {', '.join(missing)} (found: "
            f"{', '.join(dataset.column_names)}). Load the rows with `load_instruction_dataset`."
        )


def _check_max_length(max_length: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"Invalid `max_length`: {max_length!r}; pass a positive int.")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _first(value: Any) -> str:
    """The first reference of a Natural-Instructions output, which is a list in raw files and may be one elsewhere."""
    if isinstance(value, list | tuple):
        return _text(value[0]) if value else ""
    return _text(value)


def _normalise(table: datasets.Dataset, dataset_format: str) -> datasets.Dataset:
    """Rename a flat source's columns to instruction, input, output, category (all strings), dropping the others."""

    def convert(batch: dict[str, list]) -> dict[str, list[str]]:
        if dataset_format == "alpaca":
            columns = [batch["instruction"], batch["input"], batch["output"], [""] * len(batch["instruction"])]
        elif dataset_format == "dolly":
            columns = [batch["instruction"], batch["context"], batch["response"], batch["category"]]
        else:
            columns = [batch["definition"], batch["inputs"], batch["targets"], batch["task_name"]]
            columns[2] = [_first(value) for value in columns[2]]
        return {column: [_text(value) for value in values] for column, values in zip(COLUMNS, columns, strict=True)}

    return table.map(
        convert, batched=True, remove_columns=table.column_names, features=_FEATURES, desc="Normalising columns"
    )


def _fraction_split(num_rows: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, test) row indices, both ascending: a seeded draw of round(eval_fraction * n) rows (>= 1) is test."""
    num_test = round(eval_fraction * num_rows)
    if eval_fraction > 0 and num_rows > 1:
        num_test = min(max(num_test, 1), num_rows - 1)
    order = np.random.default_rng(seed).permutation(num_rows)
    return sorted(order[num_test:].tolist()), sorted(order[:num_test].tolist())


def _split_by_category(table: datasets.Dataset, held_out: list[str], name: str) -> datasets.DatasetDict:
    codes, present = _column_codes(table, "category")
    absent = [category for category in held_out if category not in present]
    if absent:
        raise ValueError(
            f"`held_out_categories` lists {', '.join(absent)}, absent from dataset {name!r}; "
            f"its categories are: {_preview(sorted(present))}."
        )
    is_test = np.isin(codes, [present.index(category) for category in held_out])
    train_rows, test_rows = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    return datasets.DatasetDict({"train": table.select(train_rows), "test": table.select(test_rows)})


def _capped(num_rows: int, cap: int | None, seed: int, task: str) -> list[int]:
    """Ascending positions of at most `cap` of a task's rows: a draw seeded by (seed, task name) only."""
    if cap is None or num_rows <= cap:
        return list(range(num_rows))
    rng = np.random.default_rng([seed, zlib.crc32(task.encode("utf-8"))])
    return sorted(rng.choice(num_rows, size=cap, replace=False).tolist())


def _read_task_list(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [name.removesuffix(".json") for name in names if name]


def _read_natural_instructions_dir(
    root: Path, test_tasks: list[str] | None, cap: int | None, seed: int
) -> datasets.DatasetDict:
    """Train and test rows of a raw allenai/natural-instructions checkout, one category per task."""
    available = {path.stem for path in (root / "tasks").glob("*.json")}
    splits_dir = root / "splits" / "default"
    train_file, test_file = splits_dir / "train_tasks.txt", splits_dir / "test_tasks.txt"
    if train_file.is_file():
        train_tasks = _read_task_list(train_file)
    elif test_tasks is not None:  # every task not held out trains
        train_tasks = sorted(available)
    else:
        raise ValueError(
            f"Natural-Instructions directory {str(root)!r} has no splits/default/train_tasks.txt; "
            "add it (one task name per line), or pass `test_tasks` to train on every other task."
        )
    if test_tasks is None:
        if not test_file.is_file():
            raise ValueError(
                f"Natural-Instructions directory {str(root)!r} has no splits/default/test_tasks.txt; "
                "add it (one task name per line) or pass `test_tasks`."
            )
        test_tasks = _read_task_list(test_file)
    held = set(test_tasks)
    train_tasks = [task for task in train_tasks if task not in held]
    missing = [task for task in dict.fromkeys(train_tasks + test_tasks) if task not in available]
    if missing:
        raise ValueError(
            f"Natural-Instructions directory {str(root)!r} has no tasks/<name>.json for {_preview(missing)}; "
            f"fix the task names (found {len(available)} task files: {_preview(sorted(available))})."
        )
    return datasets.DatasetDict(
        {
            "train": _read_tasks(root, train_tasks, cap, seed),
            "test": _read_tasks(root, list(dict.fromkeys(test_tasks)), cap, seed),
        }
    )


def _read_tasks(root: Path, tasks: list[str], cap: int | None, seed: int) -> datasets.Dataset:
    rows: dict[str, list[str]] = {column: [] for column in COLUMNS}
    skipped = 0
    for task in tasks:
        path = root / "tasks" / f"{task}.json"
        try:
            with path.open(encoding="utf-8") as handle:
                content = json.load(handle)
        except UnicodeDecodeError as error:
            raise ValueError(
                f"Natural-Instructions task file {str(path)!r} is not UTF-8 text (byte {error.start}: {error.reason}); "
                "convert it to UTF-8."
            ) from None
        except json.JSONDecodeError as error:
            raise ValueError(f"Natural-Instructions task file {str(path)!r} is not valid JSON ({error}).") from None
        for key in ("Definition", "Instances"):
            if key not in content:
                raise ValueError(
                    f"Natural-Instructions task file {str(path)!r} has no {key!r} key; "
                    "each task file needs 'Definition' (a list of strings) and 'Instances'."
                )
        definition = content["Definition"]
        instruction = "\n".join(definition) if isinstance(definition, list) else _text(definition)
        instances = content["Instances"]
        for position in _capped(len(instances), cap, seed, task):
            instance = instances[position]
            output = instance.get("output")
            if not output:  # an instance without a reference cannot be trained on or scored
                skipped += 1
                continue
            rows["instruction"].append(instruction)
            rows["input"].append(_text(instance.get("input")))
            rows["output"].append(_first(output))
            rows["category"].append(task)
    if skipped:
        logger.warning("Skipped %d Natural-Instructions instances with no reference output.", skipped)
    return datasets.Dataset.from_dict(rows, features=_FEATURES)


def _split_flat_natural_instructions(
    source: datasets.DatasetDict, name: str, test_tasks: list[str] | None, cap: int | None, seed: int
) -> datasets.DatasetDict:
    """Train and test rows of a flat Natural-Instructions source (task_name, definition, inputs, targets)."""
    if test_tasks is None:
        if not {"train", "test"} <= set(source):
            raise ValueError(
                f"Dataset {name!r} has splits {', '.join(source)}, not train and test; pass `test_tasks` "
                "(the task names to evaluate on) to split it by task."
            )
        splits = {split: _normalise(source[split], "natural_instructions") for split in ("train", "test")}
    else:
        table = datasets.concatenate_datasets([_normalise(part, "natural_instructions") for part in source.values()])
        codes, tasks = _column_codes(table, "category")
        absent = [task for task in test_tasks if task not in tasks]
        if absent:
            raise ValueError(
                f"`test_tasks` lists {_preview(absent)}, absent from dataset {name!r}; "
                f"its tasks are: {_preview(sorted(tasks))}."
            )
        is_test = np.isin(codes, [tasks.index(task) for task in test_tasks])
        splits = {"train": table.select(np.flatnonzero(~is_test)), "test": table.select(np.flatnonzero(is_test))}
    if cap is not None:
        for split, table in splits.items():
            codes, tasks = _column_codes(table, "category")
            order = np.argsort(codes, kind="stable")
            boundaries = np.flatnonzero(np.diff(codes[order])) + 1
            keep = [
                group[_capped(len(group), cap, seed, tasks[codes[group[0]]])]
                for group in np.split(order, boundaries)
                if len(group)
            ]
            splits[split] = table.select(np.sort(np.concatenate(keep)) if keep else [])
    return datasets.DatasetDict(splits)


def _column_codes(table: datasets.Dataset, column: str) -> tuple[np.ndarray, list[str]]:
    """Integer codes of a string column and the value of each code, computed in Arrow (NI has millions of rows)."""
    import pyarrow as pa

    values = table.with_format("arrow")[column]
    encoded = pa.chunked_array(values if isinstance(values, pa.ChunkedArray) else [values]).combine_chunks()
    encoded = encoded.dictionary_encode()
    return encoded.indices.to_numpy(zero_copy_only=False), encoded.dictionary.to_pylist()


def _bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[bos] if the tokenizer has a BOS token and puts it first by default (Llama), else [] (GPT-2, ByT5)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]
