"""Loading instruction datasets in the paper's three formats (Alpaca, Natural-Instructions, Dolly) and their splits."""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import datasets
import numpy as np

__all__ = [
    "COLUMNS",
    "FILE_BUILDERS",
    "FORMATS",
    "QUICKSTART_DATA_DIR",
    "SOURCE_COLUMNS",
    "load_instruction_dataset",
]

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
QUICKSTART_DATA_DIR = Path(__file__).resolve().parents[1] / "resources" / "quickstart"
_FEATURES = datasets.Features({column: datasets.Value("string") for column in COLUMNS})
# Long name lists (Natural-Instructions has ~1,600 tasks) are cut to this many in error messages.
_PREVIEW_LIMIT = 20


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


def _split_by_category(
    table: datasets.Dataset,
    held_out: list[str],
    name: str,
    option: str = "held_out_categories",
    noun: str = "categories",
) -> datasets.DatasetDict:
    """Test is the rows whose category is in `held_out`, train the others, both in the table's order.

    `option` and `noun` name the held-out list and its entries in the error for a name the data lacks (for a
    Natural-Instructions source, whose category is the task name: `test_tasks` and "tasks").
    """
    codes, present = _column_codes(table, "category")
    absent = [category for category in held_out if category not in present]
    if absent:
        raise ValueError(
            f"`{option}` lists {_preview(absent)}, absent from dataset {name!r}; "
            f"its {noun} are: {_preview(sorted(present))}."
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
        splits = dict(_split_by_category(table, test_tasks, name, "test_tasks", "tasks"))
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
