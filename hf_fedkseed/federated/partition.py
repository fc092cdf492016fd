"""Dataset partitioners that emulate federated clients: IID, Dirichlet label skew, and one client per column value."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

__all__ = ["STRATEGIES", "Partition", "dirichlet_partition", "iid_partition", "natural_partition", "partition_dataset"]

if TYPE_CHECKING:
    from datasets import Dataset

STRATEGIES = ("iid", "dirichlet", "natural")
# Long value lists (Natural-Instructions has ~1,600 tasks) are cut to this many in error messages.
_PREVIEW_LIMIT = 20


@dataclass(frozen=True)
class Partition:
    """Row indices of each emulated client, plus the rows kept out of every client.

    The lists `clients`, `held_out` and `dropped` are pairwise disjoint and together cover every row of the dataset
    the partition was built from.

    Args:
        clients: `clients[i]` holds the row indices of client `i`.
        held_out: rows whose `column` value was listed in `held_out` (e.g. an evaluation category), ascending.
        client_names: the column value each client stands for (natural partitions); None for iid and dirichlet.
        dropped: rows of natural clients smaller than `min_client_size`, ascending; empty for iid and dirichlet.

    Example:
        >>> from datasets import Dataset
        >>> dataset = Dataset.from_dict({"text": list("abcdef")})
        >>> partition = iid_partition(dataset, 2, seed=0)
        >>> partition.client_sizes
        [3, 3]
        >>> len(partition.shard(dataset, 1))
        3
    """

    clients: list[list[int]]
    held_out: list[int] = field(default_factory=list)
    client_names: list[Any] | None = None
    dropped: list[int] = field(default_factory=list)

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def client_sizes(self) -> list[int]:
        return [len(rows) for rows in self.clients]

    def shard(self, dataset: Dataset, client: int) -> Dataset:
        """Return `dataset.select(...)` of the rows of one client.

        Args:
            dataset: the dataset this partition was built from.
            client: the client's position in `clients` (and in `client_names`).

        Returns:
            The client's rows as a `datasets.Dataset`, in partition order.

        Raises:
            ValueError: if `client` is out of range or the dataset is shorter than the partition's indices.

        Example:
            >>> shard = partition.shard(dataset, 0)  # doctest: +SKIP
        """
        if isinstance(client, bool) or not isinstance(client, numbers.Integral) or not 0 <= client < self.num_clients:
            raise ValueError(
                f"Invalid `client`: {client!r}; this partition has {self.num_clients} clients, "
                f"pass an integer in [0, {self.num_clients - 1}]."
            )
        return _select(dataset, self.clients[client])

    def held_out_dataset(self, dataset: Dataset) -> Dataset:
        """Return `dataset.select(held_out)`: the rows excluded from every client (e.g. for evaluation).

        Args:
            dataset: the dataset this partition was built from.

        Returns:
            The held-out rows as a `datasets.Dataset` (empty when nothing was held out).

        Raises:
            ValueError: if the dataset is shorter than the partition's indices.

        Example:
            >>> eval_dataset = partition.held_out_dataset(dataset)  # doctest: +SKIP
        """
        return _select(dataset, self.held_out)


def iid_partition(
    dataset: Dataset,
    num_clients: int,
    *,
    seed: int,
    column: str | None = None,
    held_out: Any = None,
) -> Partition:
    """Shuffle the rows and deal them into `num_clients` clients whose sizes differ by at most one.

    Args:
        dataset: the dataset to split (only its length is read unless `column` is given).
        num_clients: how many clients to emulate.
        seed: seeds a private `numpy.random.default_rng` (the global RNGs are never touched).
        column: the column `held_out` refers to; only needed with `held_out`.
        held_out: a value (or list of values) of `column` whose rows go to no client and come back in
            `Partition.held_out`.

    Returns:
        A `Partition` with shuffled row indices per client.

    Raises:
        ValueError: on a non-positive `num_clients`, more clients than rows, a negative `seed`, `held_out` without
            `column`, an unknown `column`, or a `held_out` value absent from the column.

    Example:
        >>> from datasets import Dataset
        >>> dataset = Dataset.from_dict({"text": [str(i) for i in range(10)]})
        >>> iid_partition(dataset, 3, seed=0).client_sizes
        [4, 3, 3]
    """
    _check_positive_int("num_clients", num_clients)
    _check_seed(seed)
    if held_out is not None and column is None:
        raise ValueError("`held_out` needs `column`: pass the column whose values `held_out` lists.")
    if column is None:
        kept, excluded = np.arange(len(dataset), dtype=np.int64), []
    else:
        kept, excluded = _split_held_out(_column_values(dataset, column), column, held_out)
    _check_enough_rows(num_clients, len(kept), held_out)
    rng = np.random.default_rng(seed)
    order = rng.permutation(kept)
    return Partition(clients=[part.tolist() for part in np.array_split(order, num_clients)], held_out=excluded)


def dirichlet_partition(
    dataset: Dataset,
    num_clients: int,
    *,
    column: str,
    alpha: float,
    seed: int,
    min_client_size: int = 1,
    held_out: Any = None,
    max_attempts: int = 100,
) -> Partition:
    """Split each value of `column` across clients with proportions drawn from Dirichlet(`alpha`): label skew.

    This is the FedKSeed paper's Dolly-15K split (200 clients, `alpha=0.5` over `category`, `summarization` held
    out for evaluation) and follows the label-Dirichlet split of NIID-Bench that its code uses: values are visited
    in sorted order, each value's rows are shuffled and cut by the drawn proportions, and a client already holding
    its fair share (`rows / num_clients`) receives nothing more. If some client ends with fewer than
    `min_client_size` rows the whole draw is repeated, continuing the same generator, at most `max_attempts` times.

    Args:
        dataset: the dataset to split.
        num_clients: how many clients to emulate.
        column: the label or category column whose distribution becomes skewed across clients.
        alpha: Dirichlet concentration; small (0.1) gives each client few labels, large (100) approaches IID.
        seed: seeds a private `numpy.random.default_rng` (the global RNGs are never touched).
        min_client_size: the fewest rows any client may get.
        held_out: a value (or list of values) of `column` whose rows go to no client and come back in
            `Partition.held_out`.
        max_attempts: how many draws to try before giving up on `min_client_size`.

    Returns:
        A `Partition` with shuffled row indices per client.

    Raises:
        ValueError: on a non-positive `num_clients`, `min_client_size` or `max_attempts`, a non-positive or
            non-finite `alpha`, a negative `seed`, an unknown `column`, a `held_out` value absent from the column,
            more clients (or `num_clients * min_client_size`) than rows, or when no draw meets `min_client_size`.

    Example:
        >>> from datasets import Dataset
        >>> dataset = Dataset.from_dict({"category": ["qa", "qa", "chat", "chat", "sum", "sum"]})
        >>> partition = dirichlet_partition(dataset, 2, column="category", alpha=0.5, seed=0, held_out="sum")
        >>> partition.held_out
        [4, 5]
    """
    _check_positive_int("num_clients", num_clients)
    _check_positive_int("min_client_size", min_client_size)
    _check_positive_int("max_attempts", max_attempts)
    _check_seed(seed)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(
            f"Invalid `alpha`: {alpha!r}; the Dirichlet concentration must be a finite number > 0 "
            "(e.g. 0.1 for strong skew, 0.5 as in the FedKSeed paper, 100 for nearly IID)."
        )
    values = _column_values(dataset, column)
    kept, excluded = _split_held_out(values, column, held_out)
    _check_enough_rows(num_clients, len(kept), held_out)
    if num_clients * min_client_size > len(kept):
        raise ValueError(
            f"`num_clients`={num_clients} with `min_client_size`={min_client_size} needs "
            f"{num_clients * min_client_size} rows but only {len(kept)} are available; "
            "lower `num_clients` or `min_client_size`."
        )
    groups = _group_rows(values, kept)
    rows_per_value = [np.asarray(groups[value], dtype=np.int64) for value in _sorted_values(groups)]
    rng = np.random.default_rng(seed)
    smallest = 0
    for _ in range(max_attempts):
        clients = _dirichlet_draw(rows_per_value, num_clients, float(alpha), len(kept) / num_clients, rng)
        smallest = min(len(rows) for rows in clients)
        if smallest >= min_client_size:
            return Partition(clients=clients, held_out=excluded)
    raise ValueError(
        f"No Dirichlet draw gave every client at least `min_client_size`={min_client_size} rows in "
        f"`max_attempts`={max_attempts} tries (smallest client: {smallest} rows); raise `alpha`, lower "
        "`num_clients` or `min_client_size`, or raise `max_attempts`."
    )


def natural_partition(
    dataset: Dataset,
    *,
    column: str,
    held_out: Any = None,
    min_client_size: int = 1,
) -> Partition:
    """One client per distinct value of `column`, as the FedKSeed paper's Natural-Instructions split (one per task).

    Clients are ordered by sorted value and keep their rows in ascending order; nothing is random. Values with fewer
    than `min_client_size` rows become no client: their rows are listed in `Partition.dropped`.

    Args:
        dataset: the dataset to split.
        column: the column whose values name the clients (e.g. `task`).
        held_out: a value (or list of values, e.g. the test tasks) of `column` whose rows go to no client and come
            back in `Partition.held_out`.
        min_client_size: the fewest rows a value needs to become a client.

    Returns:
        A `Partition` whose `client_names` holds each client's value of `column`.

    Raises:
        ValueError: on a non-positive `min_client_size`, an unknown `column`, a `held_out` value absent from the
            column, or when no value is left with at least `min_client_size` rows.

    Example:
        >>> from datasets import Dataset
        >>> dataset = Dataset.from_dict({"task": ["t2", "t1", "t2", "t3"]})
        >>> partition = natural_partition(dataset, column="task", held_out=["t3"])
        >>> partition.client_names, partition.clients, partition.held_out
        (['t1', 't2'], [[1], [0, 2]], [3])
    """
    _check_positive_int("min_client_size", min_client_size)
    values = _column_values(dataset, column)
    kept, excluded = _split_held_out(values, column, held_out)
    groups = _group_rows(values, kept)
    clients: list[list[int]] = []
    client_names: list[Any] = []
    dropped: list[int] = []
    for value in _sorted_values(groups):
        if len(groups[value]) < min_client_size:
            dropped.extend(groups[value])
        else:
            clients.append(groups[value])
            client_names.append(value)
    if not clients:
        raise ValueError(
            f"No value of column `{column}` has at least `min_client_size`={min_client_size} rows outside "
            "`held_out`; lower `min_client_size` or hold out fewer values."
        )
    return Partition(clients=clients, held_out=excluded, client_names=client_names, dropped=sorted(dropped))


_PARTITIONERS: dict[str, Callable[..., Partition]] = {
    "iid": iid_partition,
    "dirichlet": dirichlet_partition,
    "natural": natural_partition,
}


def partition_dataset(dataset: Dataset, strategy: str, **kwargs: Any) -> Partition:
    """Split `dataset` with the partitioner named by `strategy`, passing `kwargs` through.

    Args:
        dataset: the dataset to split.
        strategy: one of `STRATEGIES`: "iid", "dirichlet" or "natural".
        **kwargs: the chosen partitioner's arguments (see `iid_partition`, `dirichlet_partition`,
            `natural_partition`).

    Returns:
        The `Partition` the chosen partitioner returns.

    Raises:
        ValueError: on an unknown `strategy` (the message lists the valid ones), or whatever the partitioner raises.
        TypeError: on an argument the chosen partitioner does not take (the message lists those it takes).

    Example:
        >>> from datasets import Dataset
        >>> dataset = Dataset.from_dict({"category": ["qa", "chat", "qa", "chat"]})
        >>> partition_dataset(dataset, "dirichlet", num_clients=2, column="category", alpha=0.5, seed=0).num_clients
        2
    """
    if strategy not in _PARTITIONERS:
        raise ValueError(f"Unknown partition `strategy`: {strategy!r}; choose one of {list(STRATEGIES)}.")
    partitioner = _PARTITIONERS[strategy]
    signature = inspect.signature(partitioner)
    try:
        signature.bind(dataset, **kwargs)
    except TypeError as err:
        accepted = [name for name in signature.parameters if name != "dataset"]
        raise TypeError(f"Strategy {strategy!r} does not accept these arguments ({err}); it takes {accepted}.") from err
    return partitioner(dataset, **kwargs)


def _dirichlet_draw(
    rows_per_value: list[np.ndarray], num_clients: int, alpha: float, fair_share: float, rng: np.random.Generator
) -> list[list[int]]:
    """One NIID-Bench label-Dirichlet draw: each value's shuffled rows cut by Dirichlet proportions."""
    sizes = np.zeros(num_clients, dtype=np.int64)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for rows in rows_per_value:
        shuffled = rng.permutation(rows)
        open_clients = sizes < fair_share  # a client already at its fair share takes no more rows
        proportions = rng.dirichlet(np.full(num_clients, alpha)) * open_clients
        total = proportions.sum()
        if not total > 0:  # every open client drew 0 (possible for tiny alpha): spread this value evenly instead
            proportions, total = open_clients.astype(np.float64), float(open_clients.sum())
        cuts = (np.cumsum(proportions / total) * len(shuffled)).astype(np.int64)[:-1]
        for client, part in enumerate(np.split(shuffled, cuts)):
            parts[client].append(part)
            sizes[client] += len(part)
    return [rng.permutation(np.concatenate(client_parts)).tolist() for client_parts in parts]


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"Invalid `{name}`: {value!r}; it must be a positive integer.")


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"Invalid `seed`: {seed!r}; pass a non-negative integer.")


def _check_enough_rows(num_clients: int, num_rows: int, held_out: Any) -> None:
    if num_clients > num_rows:
        where = "after excluding `held_out`" if held_out is not None else "in the dataset"
        raise ValueError(
            f"`num_clients`={num_clients} is more than the {num_rows} rows {where}; every client needs at least "
            f"one row, so lower `num_clients` to at most {num_rows}."
        )


def _column_values(dataset: Dataset, column: str) -> list[Any]:
    columns = list(dataset.column_names)
    if column not in columns:
        raise ValueError(f"Unknown `column`: {column!r}; the dataset has columns {columns}.")
    values = list(dataset[column])
    for value in values:
        if not isinstance(value, Hashable):
            raise TypeError(
                f"Column `{column}` holds unhashable values ({type(value).__name__}); partition on a column of "
                "strings or integers, e.g. one made with `dataset.map`."
            )
    return values


def _split_held_out(values: list[Any], column: str, held_out: Any) -> tuple[np.ndarray, list[int]]:
    """Return (rows kept for clients, held-out rows), both ascending, after checking every held-out value exists."""
    if held_out is None:
        return np.arange(len(values), dtype=np.int64), []
    excluded_values = set(_as_value_list(held_out))
    present = set(values)
    missing = [value for value in _as_value_list(held_out) if value not in present]
    if missing:
        raise ValueError(
            f"`held_out` value(s) {missing} not found in column `{column}`; it holds "
            f"{_preview(_sorted_values(present))}. Fix the spelling or remove them from `held_out`."
        )
    is_held = np.fromiter((value in excluded_values for value in values), dtype=bool, count=len(values))
    return np.flatnonzero(~is_held).astype(np.int64), np.flatnonzero(is_held).tolist()


def _as_value_list(held_out: Any) -> list[Any]:
    if isinstance(held_out, str | bytes) or not isinstance(held_out, Iterable):
        return [held_out]
    return list(held_out)


def _group_rows(values: list[Any], rows: np.ndarray) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = {}
    for row in rows.tolist():
        groups.setdefault(values[row], []).append(row)
    return groups


def _sorted_values(values: Iterable[Any]) -> list[Any]:
    values = list(values)
    try:
        return sorted(values)
    except TypeError:  # mixed types (e.g. None among strings): a stable order that still does not depend on hashing
        return sorted(values, key=lambda value: (type(value).__name__, repr(value)))


def _preview(values: list[Any]) -> str:
    if len(values) <= _PREVIEW_LIMIT:
        return str(values)
    return f"{values[:_PREVIEW_LIMIT]} ... ({len(values) - _PREVIEW_LIMIT} more)"


def _select(dataset: Dataset, indices: list[int]) -> Dataset:
    if indices and max(indices) >= len(dataset):
        raise ValueError(
            f"This partition indexes row {max(indices)} but the dataset has {len(dataset)} rows; pass the dataset "
            "the partition was built from."
        )
    return dataset.select(indices)
