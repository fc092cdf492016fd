"""Offline Rouge-L evaluation of a causal LM by greedy generation, as the FedKSeed paper scores held-out tasks."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .data import end_of_turn_token_id
from .forward_hooks import eval_mode

__all__ = ["RougeL", "evaluate_rouge_l", "generate_predictions", "official_rouge_l", "official_rouge_l_mean", "rouge_l"]

# rouge-score's default tokenizer: lowercase, every run of characters outside [a-z0-9] becomes one space.
_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def _tokenize(text: str) -> list[str]:
    """The tokens rouge-score scores: `str.lower()` first (so a Kelvin sign becomes `k`), then [a-z0-9]+ runs."""
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def _lcs_length(reference: Sequence[str], prediction: Sequence[str]) -> int:
    """Length of the longest common subsequence, by the textbook DP kept to one row (O(len(prediction)) memory)."""
    row = [0] * (len(prediction) + 1)
    for ref_token in reference:
        diagonal = 0  # row[j - 1] of the previous reference token
        for j, pred_token in enumerate(prediction, start=1):
            above = row[j]
            row[j] = diagonal + 1 if ref_token == pred_token else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def _check_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a str, got {type(value).__name__}: decode token ids before scoring.")
    return value


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F1 of one prediction against one reference, equal to rouge-score's `rougeL` with `use_stemmer=False`.

    Both texts are lowercased and split into runs of [a-z0-9] (punctuation and non-ASCII letters separate tokens and
    are dropped). With `lcs` the longest common subsequence of the two token lists, precision is `lcs / len(pred)`,
    recall is `lcs / len(ref)` and the score is their harmonic mean; it is 0.0 when either text has no tokens.

    Args:
        prediction: The generated text.
        reference: The ground-truth text.

    Returns:
        The F1 as a fraction in [0, 1] (the paper's tables show it times 100).

    Raises:
        TypeError: If either argument is not a str.

    Example:
        >>> round(rouge_l("The cat sat on the mat.", "the cat is on the mat"), 4)
        0.8333
    """
    prediction_tokens = _tokenize(_check_text(prediction, "prediction"))
    reference_tokens = _tokenize(_check_text(reference, "reference"))
    if not prediction_tokens or not reference_tokens:
        return 0.0
    lcs = _lcs_length(reference_tokens, prediction_tokens)
    if lcs == 0:
        return 0.0
    precision = lcs / len(prediction_tokens)
    recall = lcs / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    """Both are non-empty lists of the same length (a single str is refused, not scored character by character)."""
    for name, texts in (("predictions", predictions), ("references", references)):
        if isinstance(texts, str):
            raise TypeError(f"`{name}` must be a list of str, not one str: wrap it as [{name}].")
    if len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} predictions and {len(references)} references: pass exactly one reference "
            "per prediction."
        )
    if not predictions:
        raise ValueError("Got no predictions to score: pass at least one prediction and its reference.")


class RougeL:
    """An offline, `evaluate`-style Rouge-L metric: the mean of per-sample F1 scores.

    FedKSeed scores each decoded prediction against its reference and averages the scores over samples; this class
    does the same. (`evaluate.load("rouge")` needs the Hub, and by default reports a bootstrap median of means rather
    than the plain mean; with `use_aggregator=False` its per-sample `rougeL` scores equal ours.)

    The scores follow Google's `rouge-score` (`RougeScorer(["rougeL"], use_stemmer=False)`), not the `rouge` package
    (pltrdy) that FedKSeed's own code calls: that one is case-sensitive, keeps punctuation inside tokens, splits
    sentences on "." for a union LCS, and counts distinct words, so it gives 0.8 where we give 5/6 on the example of
    `rouge_l`, and our numbers are not digit-for-digit comparable with the paper's tables.

    Example:
        >>> RougeL().compute(predictions=["a b c", "x"], references=["a b c", "y"])
        {'rougeL': 0.5}
    """

    name = "rougeL"

    def compute(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        """Mean Rouge-L F1 of aligned predictions and references.

        Args:
            predictions: One generated text per sample.
            references: One ground-truth text per sample, in the same order.

        Returns:
            `{"rougeL": mean_f1}`, a fraction in [0, 1].

        Raises:
            TypeError: If either argument is a single str rather than a list of them, or holds a non-str.
            ValueError: If the two lists differ in length, or are empty.
        """
        scores = self.score(predictions, references)
        return {self.name: math.fsum(scores) / len(scores)}

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        """Per-sample Rouge-L F1 scores (what `compute` averages).

        Args:
            predictions: One generated text per sample.
            references: One ground-truth text per sample, in the same order.

        Returns:
            One F1 in [0, 1] per sample.

        Raises:
            TypeError: If either argument is a single str rather than a list of them, or holds a non-str.
            ValueError: If the two lists differ in length, or are empty.
        """
        _check_pairs(predictions, references)
        return [rouge_l(prediction, reference) for prediction, reference in zip(predictions, references, strict=True)]


def _as_id_list(ids: Any) -> list[int]:
    """A prompt's token ids as a plain list of ints (accepts lists, tuples, tensors and numpy arrays)."""
    return [int(token) for token in (ids.tolist() if hasattr(ids, "tolist") else ids)]


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a generation: the model's generation-config EOS id(s), the tokenizer's EOS, and the token
    the tokenizer's chat template ends an assistant turn with (`<|im_end|>`, `<|eot_id|>`, ...), if it has one."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    config_eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, Iterable):
        ids.update(int(token) for token in config_eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    end_of_turn = end_of_turn_token_id(tokenizer)
    if end_of_turn is not None:
        ids.add(int(end_of_turn))
    return sorted(ids)


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def generate_predictions(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts_input_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> list[str]:
    """Greedy-decode a continuation of every prompt, in batches, and return the decoded new text.

    Prompts are sorted by length (longest first, so an out-of-memory error shows up in the first batch) and
    left-padded with an attention mask, so every prompt ends where generation starts; the model derives positions
    from the mask, and the outputs equal those of one-prompt-at-a-time generation. Each continuation is cut at its
    first EOS (the model's generation-config EOS ids, the tokenizer's, or the end-of-turn token of its chat
    template), decoded with `skip_special_tokens=True` and stripped. The model runs in eval mode under
    `torch.inference_mode()`, and gets its previous train/eval flags back.

    Args:
        model: A causal LM with `generate` (a `transformers` `GenerationMixin`).
        tokenizer: Its tokenizer: `pad_token_id` pads (`eos_token_id` when there is no pad token) and `decode` decodes.
        prompts_input_ids: The prompt token ids of each sample, without padding.
        max_new_tokens: Most tokens generated per prompt (the paper: 128).
        batch_size: Prompts per `generate` call; it changes speed and memory, not the predictions.
        device: Where the inputs go; defaults to the model's device.

    Returns:
        One decoded prediction per prompt, in the order of `prompts_input_ids`.

    Raises:
        ValueError: If `max_new_tokens` or `batch_size` is not positive, a prompt is empty, or neither the tokenizer
            nor the model names a pad or EOS token to pad with.

    Example:
        >>> predictions = generate_predictions(model, tokenizer, [tokenizer("Q: 2+2?\\nA:").input_ids])
    """
    if max_new_tokens < 1:
        raise ValueError(f"Invalid max_new_tokens: {max_new_tokens}; generate at least one token.")
    if batch_size < 1:
        raise ValueError(f"Invalid batch_size: {batch_size}; use a positive number of prompts per batch.")
    prompts = [_as_id_list(ids) for ids in prompts_input_ids]
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"Prompt {index} has no tokens: greedy generation needs at least one prompt token.")
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    if pad_id is None and eos_ids:
        pad_id = eos_ids[0]
    if pad_id is None:
        raise ValueError("Neither the tokenizer nor the model has a pad or EOS token: set `tokenizer.pad_token`.")
    continuations = _greedy_continuations(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=torch.device(device) if device is not None else _model_device(model),
        pad_id=pad_id,
        eos_ids=eos_ids,
    )
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in continuations]


def _greedy_continuations(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    pad_id: int,
    eos_ids: list[int],
) -> list[list[int]]:
    """The new token ids greedy generation appends to each prompt, cut before the first EOS, in prompt order."""
    order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))  # stable: ties keep their order
    continuations: list[list[int]] = [[] for _ in prompts]
    stop = set(eos_ids)
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(prompts[index]) for index in batch)
            # Left padding: (batch, width) ids and mask, each prompt flush right so new tokens follow it directly.
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                prompt = prompts[index]
                input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
                attention_mask[row, width - len(prompt) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=eos_ids or None,
            )
            sequences = output if isinstance(output, torch.Tensor) else output.sequences
            for row, index in enumerate(batch):
                new_tokens = sequences[row, width:].tolist()
                # Finished rows are padded to the batch's longest continuation: keep what precedes the first EOS.
                end = next((position for position, token in enumerate(new_tokens) if token in stop), len(new_tokens))
                continuations[index] = new_tokens[:end]
    return continuations


def _column(dataset: Any, name: str) -> list[Any]:
    names = dataset.column_names if hasattr(dataset, "column_names") else list(dataset.keys())
    if name not in names:
        raise ValueError(f"The dataset has no `{name}` column (it has {sorted(names)}): add it before evaluating.")
    return list(dataset[name])


def evaluate_rouge_l(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    max_samples: int | None = None,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Greedy-generate an answer to every prompt of a held-out set and report the mean Rouge-L F1.

    This is FedKSeed's evaluation: greedy decoding (`num_beams=1`, `max_new_tokens=128`) of each prompt, Rouge-L F1
    between the decoded continuation and the reference, averaged over samples, and also within each category (the
    task of a Natural-Instructions sample, say) when the dataset has a `category` column.

    Args:
        model: A causal LM with `generate`.
        tokenizer: Its tokenizer (see `generate_predictions`).
        dataset: A `datasets.Dataset` or a mapping of column name to list, with `input_ids` (prompt token ids, no
            padding), `reference` (the ground-truth text) and optionally `category`.
        max_new_tokens: Most tokens generated per prompt (the paper: 128).
        batch_size: Prompts per `generate` call; it does not change the scores.
        max_samples: Score only the first `max_samples` rows (all rows when None).
        return_predictions: Also return, in dataset order, the decoded predictions under `"predictions"` (special
            tokens skipped, stripped) and each row's Rouge-L F1 under `"scores"`.

    Returns:
        `{"rougeL": mean_f1, "num_samples": n, "per_category": {category: mean_f1}}` with fractions in [0, 1]
        (`per_category` is empty without a `category` column), plus `"predictions"` and `"scores"` when asked.

    Raises:
        TypeError: If `dataset` is neither a `datasets.Dataset` nor a mapping of columns.
        ValueError: If a required column is missing, `max_samples` is not positive, or there are no rows to score.

    Example:
        >>> result = evaluate_rouge_l(model, tokenizer, eval_dataset, max_samples=200)
        >>> print(f"Rouge-L: {100 * result['rougeL']:.2f}")
    """
    if not isinstance(dataset, Mapping) and not hasattr(dataset, "column_names"):
        raise TypeError(f"`dataset` must be a datasets.Dataset or a mapping of columns, got {type(dataset).__name__}.")
    if max_samples is not None:
        if max_samples < 1:
            raise ValueError(f"Invalid max_samples: {max_samples}; use a positive row count, or None for all rows.")
        if hasattr(dataset, "select"):  # a datasets.Dataset: avoid materialising columns beyond max_samples
            dataset = dataset.select(range(min(max_samples, len(dataset))))
    prompts = _column(dataset, "input_ids")[:max_samples]
    references = _column(dataset, "reference")[: len(prompts)]
    names = dataset.column_names if hasattr(dataset, "column_names") else list(dataset.keys())
    categories = _column(dataset, "category")[: len(prompts)] if "category" in names else None
    if not prompts:
        raise ValueError("The dataset has no rows to evaluate: pass a non-empty held-out set.")
    if len(references) != len(prompts) or (categories is not None and len(categories) != len(prompts)):
        raise ValueError("The dataset's columns differ in length: give every row a prompt, a reference and a category.")

    predictions = generate_predictions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores = RougeL().score(predictions, references)
    result: dict[str, Any] = {"rougeL": math.fsum(scores) / len(scores), "num_samples": len(scores), "per_category": {}}
    if categories is not None:
        by_category: dict[Any, list[float]] = {}
        for category, score in zip(categories, scores, strict=True):
            by_category.setdefault(category, []).append(score)
        ordered = sorted(by_category.items(), key=lambda item: str(item[0]))
        result["per_category"] = {category: math.fsum(values) / len(values) for category, values in ordered}
    if return_predictions:
        result["predictions"] = predictions
        result["scores"] = scores
    return result


# ---------------------------------------------------------------------------------------------- the official scorer
def _official_sentences(text: str) -> list[str]:
    """The `rouge` package's sentences: split on ".", drop empty pieces, collapse whitespace (may leave "")."""
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _official_lcs_words(reference: list[str], prediction: list[str]) -> set[str]:
    """The distinct words of the one LCS the `rouge` package reconstructs (its tie-break: left unless up is longer)."""
    table = [[0] * (len(prediction) + 1) for _ in range(len(reference) + 1)]
    for i, ref_word in enumerate(reference, start=1):
        for j, pred_word in enumerate(prediction, start=1):
            if ref_word == pred_word:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    words: set[str] = set()
    i, j = len(reference), len(prediction)
    while i > 0 and j > 0:  # iterative: the package recurses and overflows the stack on long texts
        if reference[i - 1] == prediction[j - 1]:
            words.add(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def official_rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F as FedKSeed's official code scores a sample, in pure Python (no `rouge` package needed).

    The official evaluation calls `rouge.Rouge().get_scores([prediction], [reference])[0]["rouge-l"]["f"]` (the
    `rouge` package, pltrdy, 1.0.1) and scores 0 for an empty prediction or when the package raises ValueError. That
    scorer is case-sensitive and splits words on single spaces only (punctuation stays inside words); it splits each
    text into sentences on "."; it takes the union, over prediction sentences, of the distinct words of one longest
    common subsequence per reference sentence; and it counts distinct words, so recall is
    `|union| / distinct reference words`, precision `|union| / distinct prediction words`, and F is
    `2 p r / (p + r + 1e-8)`. This function reproduces those steps, the LCS tie-break included.

    Args:
        prediction: The generated text.
        reference: The ground-truth text.

    Returns:
        The F score as a fraction in [0, 1].

    Raises:
        TypeError: If either argument is not a str.

    Example:
        >>> round(official_rouge_l("The cat sat on the mat.", "the cat is on the mat"), 4)  # rouge_l: 0.8333
        0.7273
    """
    prediction = _check_text(prediction, "prediction")
    reference = _check_text(reference, "reference")
    if len(prediction) == 0:
        return 0.0
    prediction_sentences, reference_sentences = _official_sentences(prediction), _official_sentences(reference)
    if not prediction_sentences or not reference_sentences:  # the package raises ValueError: scored 0
        return 0.0
    reference_count = len({word for sentence in reference_sentences for word in sentence.split(" ")})
    prediction_count = len({word for sentence in prediction_sentences for word in sentence.split(" ")})
    union: set[str] = set()
    overlap = 0
    for reference_sentence in reference_sentences:
        before = len(union)
        reference_words = reference_sentence.split(" ")
        for prediction_sentence in prediction_sentences:
            union |= _official_lcs_words(reference_words, prediction_sentence.split(" "))
        overlap += len(union) - before
    recall, precision = overlap / reference_count, overlap / prediction_count
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def official_rouge_l_mean(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The mean of `official_rouge_l` over aligned predictions and references (FedKSeed averages over samples).

    Args:
        predictions: One generated text per sample.
        references: One ground-truth text per sample, in the same order.

    Returns:
        The mean F score, a fraction in [0, 1].

    Raises:
        TypeError: If either argument is a single str, or holds a non-str.
        ValueError: If the two lists differ in length, or are empty.

    Example:
        >>> round(official_rouge_l_mean(["a b c", "x"], ["a b c", "y"]), 4)  # 1e-8 in F's denominator
        0.5
    """
    _check_pairs(predictions, references)
    pairs = zip(predictions, references, strict=True)
    scores = [official_rouge_l(prediction, reference) for prediction, reference in pairs]
    return math.fsum(scores) / len(scores)
