"""Write the synthetic Natural-Instructions-format quickstart data shipped in `hf_fedkseed/resources/quickstart/`.

Deterministic (seeded `random.Random`, fixed word lists, sorted JSON output), standard library only, no network:
re-running it reproduces the shipped files byte for byte (a test checks this).

    python scripts/make_quickstart_data.py --output_dir hf_fedkseed/resources/quickstart
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent.parent / "hf_fedkseed" / "resources" / "quickstart"
DEFAULT_SEED = 0
NUM_INSTANCES = 48  # per task: enough for a few local steps per client, small enough to keep the folder ~100 KB

# Short, common, lower-case words (3-6 letters), so a byte-level model sees short inputs and answers.
WORDS = (
    "apple", "bread", "chair", "dance", "eagle", "field", "grape", "house", "island", "juice",
    "kite", "lemon", "money", "night", "ocean", "paper", "queen", "river", "stone", "table",
    "uncle", "voice", "water", "yellow", "zebra", "bird", "cloud", "door", "egg", "fish",
    "garden", "hat", "ink", "jam", "king", "lamp", "moon", "nest", "orange", "pen",
    "rain", "sun", "tree", "wind", "box", "cat", "dog", "frog", "goat", "horse",
    "milk", "rice", "salt", "ship", "snow", "star", "tiger", "train", "wolf", "bell",
)  # fmt: skip

# Pairs of opposites; the task asks for either member, so each pair gives two instances.
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("yes", "no"), ("day", "night"),
    ("open", "closed"), ("fast", "slow"), ("old", "new"), ("good", "bad"), ("left", "right"),
    ("in", "out"), ("on", "off"), ("high", "low"), ("long", "short"), ("full", "empty"),
    ("happy", "sad"), ("early", "late"), ("light", "dark"), ("hard", "soft"), ("wet", "dry"),
    ("first", "last"), ("win", "lose"), ("push", "pull"), ("buy", "sell"), ("rich", "poor"),
    ("thick", "thin"), ("true", "false"), ("black", "white"), ("loud", "quiet"), ("near", "far"),
)  # fmt: skip


@dataclass(frozen=True)
class TaskFamily:
    """One synthetic task: its NI-style name, definition, and how an input and its answer are drawn."""

    name: str
    definition: str
    category: str
    draw_items: Callable[[random.Random, int], list[tuple[str, str]]]  # (rng, count) -> [(input, output), ...]


def _word_items(answer: Callable[[str], str]) -> Callable[[random.Random, int], list[tuple[str, str]]]:
    """Distinct words from WORDS, each paired with `answer(word)`."""

    def draw(rng: random.Random, count: int) -> list[tuple[str, str]]:
        return [(word, answer(word)) for word in rng.sample(WORDS, count)]

    return draw


def _draw_sums(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """Distinct ordered pairs of one-digit numbers and their sum."""
    pairs = rng.sample([(a, b) for a in range(10) for b in range(10)], count)
    return [(f"{a} + {b}", str(a + b)) for a, b in pairs]


def _draw_opposites(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """Distinct words from OPPOSITES (either side of a pair) and their opposite."""
    both_ways = [(a, b) for a, b in OPPOSITES] + [(b, a) for a, b in OPPOSITES]
    return rng.sample(both_ways, count)


# Six training families; the two held-out (test) families recombine their skills, so a model tuned on the training
# tasks has something to transfer: "write twice" extends "repeat", "first letter in upper case" composes two tasks.
TRAIN_TASKS = (
    TaskFamily(
        "task001_repeat_word",
        "Repeat the word given in the input exactly as it is written.",
        "Text Generation",
        _word_items(lambda word: word),
    ),
    TaskFamily(
        "task002_upper_case",
        "Write the word given in the input in upper case letters.",
        "Text Transformation",
        _word_items(str.upper),
    ),
    TaskFamily(
        "task003_first_letter",
        "Give the first letter of the word given in the input.",
        "Text Transformation",
        _word_items(lambda word: word[0]),
    ),
    TaskFamily(
        "task004_reverse_word",
        "Write the word given in the input backwards, from its last letter to its first.",
        "Text Transformation",
        _word_items(lambda word: word[::-1]),
    ),
    TaskFamily(
        "task005_add_numbers",
        "Add the two numbers given in the input and answer with their sum as digits.",
        "Arithmetic",
        _draw_sums,
    ),
    TaskFamily(
        "task006_opposite_word",
        "Answer with the word that means the opposite of the word given in the input.",
        "Word Semantics",
        _draw_opposites,
    ),
)
TEST_TASKS = (
    TaskFamily(
        "task007_write_word_twice",
        "Write the word given in the input twice, separated by a single space.",
        "Text Generation",
        _word_items(lambda word: f"{word} {word}"),
    ),
    TaskFamily(
        "task008_first_letter_upper_case",
        "Give the first letter of the word given in the input, written in upper case.",
        "Text Transformation",
        _word_items(lambda word: word[0].upper()),
    ),
)

README = """# Quickstart data (synthetic, Natural-Instructions format)

Generated by `scripts/make_quickstart_data.py` (seed {seed}, standard library only, no network):

    python scripts/make_quickstart_data.py --output_dir hf_fedkseed/resources/quickstart

Do not edit these files by hand: change the script and re-run it (a test checks that it reproduces them byte for byte).

The layout is that of [allenai/natural-instructions](https://github.com/allenai/natural-instructions):
`tasks/<task>.json` (a `Definition`, 2 `Positive Examples`, {num_instances} `Instances` whose `output` is a list), and
`splits/default/{{train,test}}_tasks.txt`. Load it with

    from hf_fedkseed.data import QUICKSTART_DATA_DIR, load_instruction_dataset
    dataset = load_instruction_dataset(QUICKSTART_DATA_DIR, "natural_instructions")

The answers are a few bytes long, so a tiny byte-level model can start to learn them. The held-out (test) tasks reuse
the skills of training tasks, so held-out evaluation measures transfer rather than chance.

| task | split | definition |
|---|---|---|
{table}
"""


def task_json(family: TaskFamily, rng: random.Random) -> dict:
    """An NI task file: the positive examples and the instances are disjoint draws."""
    items = family.draw_items(rng, NUM_INSTANCES + 2)
    examples, instances = items[:2], items[2:]
    return {
        "Contributors": ["hf_fedkseed quickstart generator"],
        "Source": ["synthetic"],
        "Categories": [family.category],
        "Definition": [family.definition],
        "Input_language": ["English"],
        "Output_language": ["English"],
        "Instruction_language": ["English"],
        "Domains": ["Synthetic"],
        "Positive Examples": [
            {"input": source, "output": target, "explanation": f"The answer to '{source}' is '{target}'."}
            for source, target in examples
        ],
        "Negative Examples": [],
        "Instances": [
            {"id": f"{family.name}-{position:03d}", "input": source, "output": [target]}
            for position, (source, target) in enumerate(instances)
        ],
        "Instance License": ["Apache 2.0"],
    }


def write_quickstart(output_dir: Path, seed: int = DEFAULT_SEED) -> list[Path]:
    """Write tasks/*.json, splits/default/{train,test}_tasks.txt and README.md under `output_dir`.

    Args:
        output_dir: the folder to (over)write; created if needed.
        seed: seeds one `random.Random` per task (`seed * 1000 + task number`), so tasks are independent.

    Returns:
        The paths written, in writing order.
    """
    output_dir = Path(output_dir)
    (output_dir / "tasks").mkdir(parents=True, exist_ok=True)
    (output_dir / "splits" / "default").mkdir(parents=True, exist_ok=True)
    written = []
    for number, family in enumerate(TRAIN_TASKS + TEST_TASKS, start=1):
        path = output_dir / "tasks" / f"{family.name}.json"
        text = json.dumps(task_json(family, random.Random(seed * 1000 + number)), indent=1, ensure_ascii=False)
        path.write_text(text + "\n", encoding="utf-8")
        written.append(path)
    for split, families in (("train", TRAIN_TASKS), ("test", TEST_TASKS)):
        path = output_dir / "splits" / "default" / f"{split}_tasks.txt"
        path.write_text("".join(f"{family.name}\n" for family in families), encoding="utf-8")
        written.append(path)
    table = "\n".join(
        f"| `{family.name}` | {split} | {family.definition} |"
        for split, families in (("train", TRAIN_TASKS), ("test", TEST_TASKS))
        for family in families
    )
    path = output_dir / "README.md"
    path.write_text(README.format(seed=seed, num_instances=NUM_INSTANCES, table=table), encoding="utf-8")
    written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="Folder to write (overwritten).")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="Seed of the instance draws.")
    args = parser.parse_args()
    written = write_quickstart(args.output_dir, args.seed)
    total = sum(path.stat().st_size for path in written)
    print(f"Wrote {len(written)} files ({total / 1024:.1f} KiB) to {args.output_dir}")


if __name__ == "__main__":
    main()
