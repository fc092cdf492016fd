"""Tokenization of instruction rows for training (prompt-masked labels) and generation, and the batch collator."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import datasets

from .prompts import (
    _chat_prompt_and_completion,
    _check_chat_template,
    _check_prompt_format,
    _encode,
    build_prompt,
    format_prompt,
)

if TYPE_CHECKING:
    from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

__all__ = ["tokenize_for_generation", "tokenize_for_training", "training_collator"]

logger = logging.getLogger(__name__)

# A list of token ids; `datasets.List` appeared in datasets 4.0, `Sequence` is its older spelling.
_TOKEN_IDS = (datasets.List if hasattr(datasets, "List") else datasets.Sequence)(datasets.Value("int64"))


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
    chat, prefix, keep_category = _prepare(
        dataset, tokenizer, max_length, prompt_format, "tokenize_for_training", needs_eos=True
    )
    eos = tokenizer.eos_token_id

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
    chat, prefix, keep_category = _prepare(dataset, tokenizer, max_length, prompt_format, "tokenize_for_generation")
    bos = tokenizer.bos_token_id

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


def _prepare(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    prompt_format: str,
    caller: str,
    *,
    needs_eos: bool = False,
) -> tuple[bool, list[int], bool]:
    """Check the arguments of a tokenize function (`caller`), and give what both tokenize functions start from.

    Args:
        dataset: the rows; they need instruction, input and output.
        tokenizer: the tokenizer; for `chat` it needs a chat template, and with `needs_eos` an EOS token.
        max_length: the most tokens a row keeps; a positive int.
        prompt_format: one of `PROMPT_FORMATS`.
        caller: the function's name, for the missing-column message.
        needs_eos: whether responses end with the tokenizer's EOS (training).

    Returns:
        (whether the format is `chat`, the ids put before each prompt: the tokenizer's default BOS for `alpaca`, none
        for `chat`, whose template writes its own, and whether the rows have a category to keep).

    Raises:
        ValueError: for an unknown prompt format, a bad `max_length`, a missing column, no EOS token when
            `needs_eos`, or `chat` with a tokenizer without a chat template (checked in that order).
    """
    _check_prompt_format(prompt_format)
    _check_max_length(max_length)
    _check_row_columns(dataset, ("instruction", "input", "output"), caller)
    if needs_eos and tokenizer.eos_token_id is None:
        raise ValueError(
            "The tokenizer has no `eos_token_id`, so responses cannot be terminated; set `tokenizer.eos_token`."
        )
    chat = prompt_format == "chat"
    if chat:
        _check_chat_template(tokenizer)
    return chat, [] if chat else _bos_prefix(tokenizer), "category" in dataset.column_names


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


def _bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[bos] if the tokenizer has a BOS token and puts it first by default (Llama), else [] (GPT-2, ByT5)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _through_last_eos(ids: list[int], eos: int) -> list[int]:
    """A completion's ids up to and including its last EOS (the end of turn), or with EOS appended if it has none."""
    if eos not in ids:
        return [*ids, eos]
    return ids[: len(ids) - ids[::-1].index(eos)]
