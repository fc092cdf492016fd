"""Dataset partitioners: determinism, disjoint cover, sizes, label skew, held-out rows, dispatch and validation."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_fedkseed.federated.partition import (
    STRATEGIES,
    Partition,
    dirichlet_partition,
    iid_partition,
    natural_partition,
    partition_dataset,
)

CATEGORIES = ("brainstorming", "classification", "closed_qa", "open_qa", "summarization")


@pytest.fixture
def labelled() -> Dataset:
    """400 rows, 80 per category, categories interleaved so row order carries no label information."""
    return Dataset.from_dict({"category": [CATEGORIES[i % 5] for i in range(400)], "id": list(range(400))})


@pytest.fixture
def tasks() -> Dataset:
    """Natural-Instructions-like rows: tasks of different sizes, rows out of task order."""
    names = ["task_b"] * 5 + ["task_a"] * 3 + ["task_c"] * 1 + ["task_test"] * 4
    order = np.random.default_rng(0).permutation(len(names))
    return Dataset.from_dict({"task": [names[i] for i in order]})


def assert_disjoint_cover(partition: Partition, num_rows: int) -> None:
    rows = [row for client in partition.clients for row in client] + partition.held_out + partition.dropped
    assert len(rows) == len(set(rows)), "a row was given out twice"
    assert sorted(rows) == list(range(num_rows)), "a row was lost"


def mean_label_entropy(partition: Partition, labels: list[str]) -> float:
    entropies = []
    for client in partition.clients:
        counts = np.array(list(Counter(labels[row] for row in client).values()), dtype=np.float64)
        probs = counts / counts.sum()
        entropies.append(float(-(probs * np.log(probs)).sum()))
    return float(np.mean(entropies))


# ---- IID -------------------------------------------------------------------------------------------------------


def test_iid_is_deterministic_and_seed_dependent(labelled):
    first = iid_partition(labelled, 7, seed=0)
    assert first == iid_partition(labelled, 7, seed=0)
    assert first.clients != iid_partition(labelled, 7, seed=1).clients


def test_iid_is_a_shuffled_disjoint_cover_with_sizes_within_one(labelled):
    partition = iid_partition(labelled, 7, seed=3)
    assert_disjoint_cover(partition, len(labelled))
    assert partition.num_clients == 7
    assert max(partition.client_sizes) - min(partition.client_sizes) <= 1
    assert partition.clients[0] != sorted(partition.clients[0])  # shuffled, not contiguous blocks
    assert partition.held_out == [] and partition.client_names is None


def test_iid_holds_out_a_column_value(labelled):
    partition = iid_partition(labelled, 4, seed=0, column="category", held_out="summarization")
    assert_disjoint_cover(partition, len(labelled))
    assert partition.held_out == [i for i in range(400) if i % 5 == 4]
    assert max(partition.client_sizes) - min(partition.client_sizes) <= 1


# ---- Dirichlet -------------------------------------------------------------------------------------------------


def test_dirichlet_is_deterministic_and_seed_dependent(labelled):
    kwargs = {"column": "category", "alpha": 0.5}
    first = dirichlet_partition(labelled, 10, seed=0, **kwargs)
    assert first == dirichlet_partition(labelled, 10, seed=0, **kwargs)
    assert first.clients != dirichlet_partition(labelled, 10, seed=1, **kwargs).clients


def test_dirichlet_is_a_disjoint_cover_excluding_held_out_values(labelled):
    partition = dirichlet_partition(
        labelled, 10, column="category", alpha=0.5, seed=0, held_out=["summarization", "open_qa"]
    )
    assert_disjoint_cover(partition, len(labelled))
    labels = list(labelled["category"])
    assert {labels[row] for row in partition.held_out} == {"summarization", "open_qa"}
    assert len(partition.held_out) == 160
    assert all(labels[row] not in ("summarization", "open_qa") for client in partition.clients for row in client)


def test_small_alpha_gives_more_label_skew_than_large_alpha(labelled):
    labels = list(labelled["category"])

    def entropy(alpha: float) -> float:  # averaged over a few seeds so the comparison does not hinge on one draw
        draws = [dirichlet_partition(labelled, 10, column="category", alpha=alpha, seed=s) for s in range(4)]
        return float(np.mean([mean_label_entropy(partition, labels) for partition in draws]))

    skewed, even = entropy(0.05), entropy(100.0)
    assert even > 0.9 * math.log(5)  # near-uniform over the 5 labels
    assert skewed < 0.6 * even


def test_dirichlet_resamples_until_min_client_size_is_met(labelled):
    kwargs = {"column": "category", "alpha": 0.5, "seed": 1, "min_client_size": 8}
    with pytest.raises(ValueError, match=r"No Dirichlet draw"):  # this seed's first draw leaves a client short
        dirichlet_partition(labelled, 20, max_attempts=1, **kwargs)
    partition = dirichlet_partition(labelled, 20, **kwargs)
    assert min(partition.client_sizes) >= 8
    assert partition == dirichlet_partition(labelled, 20, **kwargs)  # resampling is deterministic too
    assert_disjoint_cover(partition, len(labelled))


def test_dirichlet_raises_when_no_draw_meets_min_client_size(labelled):
    with pytest.raises(ValueError, match=r"No Dirichlet draw .* `min_client_size`=19 .* raise `alpha`"):
        dirichlet_partition(labelled, 20, column="category", alpha=0.01, seed=0, min_client_size=19, max_attempts=3)


# ---- natural ---------------------------------------------------------------------------------------------------


def test_natural_gives_one_client_per_value_in_sorted_order(tasks):
    partition = natural_partition(tasks, column="task")
    names = list(tasks["task"])
    assert partition.client_names == ["task_a", "task_b", "task_c", "task_test"]
    assert partition.client_sizes == [3, 5, 1, 4]
    for name, client in zip(partition.client_names, partition.clients, strict=True):
        assert client == sorted(i for i, value in enumerate(names) if value == name)
    assert_disjoint_cover(partition, len(tasks))


def test_natural_holds_out_test_tasks_and_drops_small_ones(tasks):
    partition = natural_partition(tasks, column="task", held_out=["task_test"], min_client_size=2)
    names = list(tasks["task"])
    assert partition.client_names == ["task_a", "task_b"]
    assert partition.held_out == sorted(i for i, value in enumerate(names) if value == "task_test")
    assert partition.dropped == [names.index("task_c")]
    assert_disjoint_cover(partition, len(tasks))


# ---- shards, dispatch, RNG hygiene -----------------------------------------------------------------------------


def test_shard_and_held_out_dataset_select_the_rows(tasks):
    partition = natural_partition(tasks, column="task", held_out="task_test")
    shard = partition.shard(tasks, 1)
    assert shard["task"] == ["task_b"] * 5
    assert partition.held_out_dataset(tasks)["task"] == ["task_test"] * 4
    with pytest.raises(ValueError, match=r"Invalid `client`: 3; this partition has 3 clients"):
        partition.shard(tasks, 3)
    with pytest.raises(ValueError, match=r"pass the dataset the partition was built from"):
        partition.shard(tasks.select(range(2)), 1)


def test_partition_dataset_dispatches_to_each_strategy(labelled):
    assert partition_dataset(labelled, "iid", num_clients=4, seed=0) == iid_partition(labelled, 4, seed=0)
    assert partition_dataset(labelled, "dirichlet", num_clients=4, column="category", alpha=1.0, seed=0) == (
        dirichlet_partition(labelled, 4, column="category", alpha=1.0, seed=0)
    )
    assert partition_dataset(labelled, "natural", column="category").client_names == sorted(CATEGORIES)
    assert set(STRATEGIES) == {"iid", "dirichlet", "natural"}


def test_partition_dataset_rejects_unknown_strategy_and_arguments(labelled):
    with pytest.raises(ValueError, match=r"Unknown partition `strategy`: 'pathological'; choose one of \['iid'"):
        partition_dataset(labelled, "pathological", num_clients=2, seed=0)
    with pytest.raises(TypeError, match=r"Strategy 'natural' does not accept .* it takes \['column'"):
        partition_dataset(labelled, "natural", column="category", num_clients=3)


def test_partitioners_leave_global_rngs_untouched(labelled):
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    iid_partition(labelled, 5, seed=0)
    dirichlet_partition(labelled, 5, column="category", alpha=0.5, seed=0, held_out="summarization")
    natural_partition(labelled, column="category")
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:]
    assert random.getstate() == python_state


# ---- validation messages ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda ds: iid_partition(ds, 0, seed=0), r"Invalid `num_clients`: 0; it must be a positive integer"),
        (lambda ds: iid_partition(ds, -2, seed=0), r"Invalid `num_clients`: -2"),
        (lambda ds: iid_partition(ds, 401, seed=0), r"`num_clients`=401 is more than the 400 rows in the dataset"),
        (lambda ds: iid_partition(ds, 2, seed=-1), r"Invalid `seed`: -1; pass a non-negative integer"),
        (lambda ds: iid_partition(ds, 2, seed=0, held_out="qa"), r"`held_out` needs `column`"),
        (
            lambda ds: dirichlet_partition(ds, 2, column="label", alpha=0.5, seed=0),
            r"Unknown `column`: 'label'; the dataset has columns \['category', 'id'\]",
        ),
        (
            lambda ds: dirichlet_partition(ds, 2, column="category", alpha=0.0, seed=0),
            r"Invalid `alpha`: 0.0; the Dirichlet concentration must be a finite number > 0",
        ),
        (
            lambda ds: dirichlet_partition(ds, 2, column="category", alpha=-1, seed=0),
            r"Invalid `alpha`: -1",
        ),
        (
            lambda ds: dirichlet_partition(ds, 2, column="category", alpha=float("nan"), seed=0),
            r"Invalid `alpha`: nan",
        ),
        (
            lambda ds: dirichlet_partition(ds, 0, column="category", alpha=0.5, seed=0),
            r"Invalid `num_clients`: 0",
        ),
        (
            lambda ds: dirichlet_partition(ds, 100, column="category", alpha=0.5, seed=0, held_out=CATEGORIES[1:]),
            r"`num_clients`=100 is more than the 80 rows after excluding `held_out`; .* at most 80",
        ),
        (
            lambda ds: dirichlet_partition(ds, 50, column="category", alpha=0.5, seed=0, min_client_size=9),
            r"`num_clients`=50 with `min_client_size`=9 needs 450 rows but only 400 are available",
        ),
        (
            lambda ds: dirichlet_partition(ds, 2, column="category", alpha=0.5, seed=0, min_client_size=0),
            r"Invalid `min_client_size`: 0",
        ),
        (
            lambda ds: dirichlet_partition(ds, 2, column="category", alpha=0.5, seed=0, held_out="summarisation"),
            r"`held_out` value\(s\) \['summarisation'\] not found in column `category`; it holds \['brainstorming'",
        ),
        (
            lambda ds: natural_partition(ds, column="task"),
            r"Unknown `column`: 'task'; the dataset has columns \['category', 'id'\]",
        ),
        (
            lambda ds: natural_partition(ds, column="category", held_out=["closed_qa", "creative_writing"]),
            r"`held_out` value\(s\) \['creative_writing'\] not found in column `category`",
        ),
        (
            lambda ds: natural_partition(ds, column="category", min_client_size=81),
            r"No value of column `category` has at least `min_client_size`=81 rows",
        ),
    ],
)
def test_impossible_requests_raise_clear_errors(labelled, call, message):
    with pytest.raises(ValueError, match=message):
        call(labelled)


def test_unhashable_column_values_raise_type_error():
    dataset = Dataset.from_dict({"tags": [["a"], ["b"]]})
    with pytest.raises(TypeError, match=r"Column `tags` holds unhashable values \(list\)"):
        natural_partition(dataset, column="tags")


def test_long_value_lists_are_cut_in_error_messages():
    dataset = Dataset.from_dict({"task": [f"task_{i:03d}" for i in range(50)]})
    with pytest.raises(ValueError, match=r"\.\.\. \(30 more\)"):
        natural_partition(dataset, column="task", held_out="task_999")
