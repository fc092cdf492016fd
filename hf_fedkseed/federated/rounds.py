"""The round core every runtime calls: the server, the syncs, update decoding, the round record and its log."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from .config import FederatedConfig
from .protocol import SyncMessage, UpdateMessage
from .schedule import client_seed_schedule, resolve_clients_per_round
from .server import AggregationResult, KSeedServer
from .sync_message import sync_value_dtype

__all__ = ["RoundLog", "SyncChain", "decode_update", "full_sync", "make_server", "round_record", "seed_schedule"]

logger = logging.getLogger(__name__)


def make_server(config: FederatedConfig, num_clients: int, *, num_seeds: int, seed: int) -> KSeedServer:
    """The `KSeedServer` of a run: K and the seed (the optimizer's, `training_args.seed`) and the recipe's setting.

    Example:
        >>> server = make_server(config, partition.num_clients, num_seeds=4096, seed=42)
    """
    return KSeedServer(
        num_clients,
        num_seeds=num_seeds,
        seed=seed,
        clients_per_round=resolve_clients_per_round(num_clients, config),
        aggregation=config.aggregation,
        pro=config.pro,
        pro_clip=config.pro_clip,
        max_abs_scalar=config.max_abs_scalar,
        sync_precision=config.sync_precision,
    )


def full_sync(server: KSeedServer, round_index: int, schedule: torch.Tensor | None = None) -> SyncMessage:
    """The paper's sync of a round: all K accumulators clients receive (`server.published_accumulators()`) at the
    server's `sync_precision` (float32, or int8: one scale and K codes), with the Pro seed schedule if given.

    Example:
        >>> payload = full_sync(server, round_index, schedule).encode()  # 4,530 bytes at K=4096, tau=200, int8
    """
    return SyncMessage.build(
        server_round=round_index,
        accumulators=server.published_accumulators(),
        encoding="full",
        value_dtype=sync_value_dtype(server.sync_precision),
        seed_schedule=schedule,
    )


def seed_schedule(
    server: KSeedServer, config: FederatedConfig, round_index: int, client: int, directions: int = 1
) -> torch.Tensor:
    """The seed indices of a client's local steps, `directions` per step (the optimizer's: FZOO takes several):
    FedKSeed-Pro draws them from the server's distribution (and the sync carries them), FedKSeed uniformly; both
    keyed by (seed, round, client)."""
    probabilities = server.probabilities() if config.pro else None
    return client_seed_schedule(
        server.seed, round_index, client, config.local_steps * directions, server.num_seeds, probabilities=probabilities
    )


class SyncChain:
    """The syncs that bring a client that keeps its model between rounds to the current round, bit for bit.

    Catch-up follows one rule in every runtime: the model moves round by round, replaying each round's change of
    the accumulators (`KSeedClient.catch_up`). The emulation's shared model does so after every round; a Flower node
    that last synced at round `s` and is selected at round `r` receives the changes of rounds `s+1 .. r`, one sparse
    `SyncMessage` each, and replays them in order, so its float arithmetic, and therefore its weights, equal the
    emulation's. A node never seen (or one that lost its state) starts from `w0` and receives every round's change.

    With `sync_precision="int8"` every published accumulator moves whenever the largest one does (the scale
    changes), so a sparse message would not be smaller: the chain then holds one full int8 message per round
    (`full_sync`'s form, K bytes + 34), and the node still replays the rounds in order, as the emulation does.

    The server keeps the accumulators at the start of every round (K float64 each).

    Example:
        >>> chain = SyncChain(num_seeds=4096, sync_precision=server.sync_precision)
        >>> chain.open_round(0, server.published_accumulators())
        >>> messages = chain.for_client(client_id=3, round_index=0, seed_schedule=schedule)
    """

    def __init__(self, num_seeds: int, sync_precision: str = "float32"):
        self.num_seeds = num_seeds
        self.value_dtype = sync_value_dtype(sync_precision)
        self.starts: list[torch.Tensor] = []  # the accumulators at the start of each round, as the wire rounds them
        self.synced: dict[int, int] = {}  # client id -> the round of its last sync

    def open_round(self, round_index: int, accumulators: torch.Tensor) -> None:
        """Record the accumulators a round starts from (call once per round, in order), at the wire's precision."""
        if round_index != len(self.starts):
            raise ValueError(f"Round {round_index} opened after {len(self.starts)} rounds; open them in order.")
        sync = SyncMessage.build(server_round=round_index, accumulators=accumulators, value_dtype=self.value_dtype)
        self.starts.append(sync.apply_to(None))

    def for_client(self, client_id: int, round_index: int, seed_schedule: torch.Tensor | None = None):
        """The sparse syncs of rounds `last sync + 1 .. round_index` (one empty sync when there is none to send);
        the last one carries `seed_schedule`."""
        return self.since(self.synced.get(client_id), round_index, seed_schedule)

    def since(self, last: int | None, round_index: int, seed_schedule: torch.Tensor | None = None):
        """The sparse syncs from a model synced at round `last` (None: at `w0`) to round `round_index` (int8: full)."""
        first = 1 if last is None else last + 1
        if self.value_dtype == torch.int8:  # self-contained messages; re-quantising published values is exact
            opened = range(first, round_index + 1) or [round_index]
            messages = [
                SyncMessage.build(server_round=r, accumulators=self.starts[r], value_dtype=torch.int8) for r in opened
            ]
            if seed_schedule is not None:
                messages[-1] = replace(messages[-1], seed_schedule=seed_schedule)
            return messages
        messages = []
        for opened in range(first, round_index + 1):
            before, after = self.starts[opened - 1], self.starts[opened]
            changed = (after != before).nonzero().flatten()
            messages.append(
                SyncMessage(
                    server_round=opened,
                    num_seeds=self.num_seeds,
                    accumulator_values=after[changed],
                    accumulator_indices=changed,
                    base_round=opened - 1,
                )
            )
        if not messages:
            base = round_index if last is None else last
            empty = torch.zeros(0)
            messages.append(
                SyncMessage(
                    server_round=round_index,
                    num_seeds=self.num_seeds,
                    accumulator_values=empty,
                    accumulator_indices=empty.long(),
                    base_round=base,
                )
            )
        if seed_schedule is not None:
            messages[-1] = replace(messages[-1], seed_schedule=seed_schedule)
        return messages

    def mark_synced(self, client_id: int, round_index: int) -> None:
        self.synced[client_id] = round_index

    def forget(self, client_id: int) -> None:
        """The client's state is unknown (it failed): its next chain starts from round 0."""
        self.synced.pop(client_id, None)


def decode_update(payload, *, client_id: int, round_index: int, num_seeds: int) -> UpdateMessage:
    """Decode and check one client's update payload for the server; the message is the update `aggregate` takes.

    Nothing in it is trusted: the bytes must decode (`UpdateMessage.decode` checks length, CRC, finite values and
    indices in range) and be for this client, this round and this K. The claimed `num_samples` is carried but the
    server weighs clients by the counts it knows.

    Raises:
        ProtocolError: for bytes that are not a valid `UpdateMessage`.
        ValueError: for a valid update of another client, round or K.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ValueError(f"the update payload is {type(payload).__name__}, not bytes")
    received = UpdateMessage.decode(payload)
    if received.client_id != client_id or received.server_round != round_index:
        raise ValueError(
            f"the update is for client {received.client_id}, round {received.server_round}; expected client "
            f"{client_id}, round {round_index}"
        )
    if received.num_seeds != num_seeds:
        raise ValueError(f"the update is for K={received.num_seeds} seeds; the server has K={num_seeds}")
    return received


def round_record(
    round_index: int,
    clients: list[int],
    result: AggregationResult,
    *,
    losses: list[float],
    bytes_up: int,
    bytes_down: int,
    failed: dict[int, str],
    seconds: float,
    rejected: dict[int, str] | None = None,
) -> dict:
    """The JSON record of one FedKSeed round, the same fields from every runtime (`rounds.jsonl`).

    `failed` holds the clients that sent nothing (with the reason), `rejected` those whose update the runtime
    refused on receipt (it did not decode, or was for another client, round or K); the server's rejections come
    from `result`. `bytes_per_client` is the encoded bytes of the round, down and up, per selected client.
    """
    refused = {**(rejected or {}), **result.rejected}
    reasons = {**failed, **refused}
    return {
        "round": round_index,
        "clients": clients,
        "accepted": result.accepted,
        "failed": sorted(set(failed) - set(refused)),
        "rejected": sorted(refused),
        "reasons": {str(client_id): reasons[client_id] for client_id in sorted(reasons)},
        "weighting": result.weighting,
        "clipped": {str(client_id): factor for client_id, factor in sorted(result.clipped.items())},
        "train_loss": sum(losses) / max(len(losses), 1),
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "bytes_per_client": (bytes_up + bytes_down) / max(len(clients), 1),
        "seeds_touched": result.seeds_touched,
        "seconds": seconds,
    }


class RoundLog:
    """`OUTPUT/rounds.jsonl`: one JSON line per round, appended as rounds end, and repaired on resume.

    Example:
        >>> log = RoundLog(Path(args.output_dir) / "rounds.jsonl")
        >>> history = log.restore(keep_below=resumed_round, resumed_from=checkpoint)
        >>> log.append(record)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def restore(self, keep_below: int = 0, resumed_from: str | None = None) -> list[dict]:
        """Keep the records of the rounds before `keep_below` (the resumed round) and return them.

        A killed run may have logged later rounds (dropped here) or torn its last line mid-write (dropped with a
        warning). Without a `rounds.jsonl` in the output directory, the one beside the checkpoint `resumed_from` is
        read. A fresh run (`keep_below=0`) starts an empty file.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        source = self.path
        if not source.exists() and resumed_from:
            source = Path(resumed_from).parent / "rounds.jsonl"
        kept: list[dict] = []
        if keep_below and source.exists():
            lines = source.read_text(encoding="utf-8", errors="replace").splitlines()
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    round_index = record["round"]
                except (json.JSONDecodeError, TypeError, KeyError):
                    where = "its last line is torn (a run killed mid-write)" if number == len(lines) else "a line"
                    logger.warning("%s: %s; dropped line %d: %.60s", source, where, number, line)
                    continue
                if isinstance(round_index, int) and round_index < keep_below:
                    kept.append(record)
        kept = list({record["round"]: record for record in kept}.values())  # a repeated round: its last record
        kept.sort(key=lambda record: record["round"])
        if keep_below and [record["round"] for record in kept] != list(range(keep_below)):
            logger.warning(
                "%s holds records of %d of the %d rounds before the resumed one; the run's summaries cover only the "
                "rounds recorded.",
                source,
                len(kept),
                keep_below,
            )
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
        temporary.replace(self.path)
        return kept
