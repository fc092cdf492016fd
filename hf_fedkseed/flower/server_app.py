"""The FedKSeed Flower ServerApp: node registration, then rounds of selection, sync, validation and aggregation."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..callback import pro_seed_schedule
from ..federated.protocol import ProtocolError, SyncMessage, UpdateMessage
from ..federated.server import ClientUpdate, KSeedServer
from .task import (
    METRICS_RECORD,
    NODE_RECORD,
    QUERY,
    SYNC_RECORD,
    TRAIN,
    UPDATE_RECORD,
    FederatedTask,
    FlowerConfig,
    load_task,
)

logger = logging.getLogger(__name__)


def message_wire_bytes(message) -> int | None:
    """The bytes Flower serialises for a message (its metadata and every record), or None if this flwr cannot say."""
    try:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    except ImportError:  # an internal module of Flower; the protocol byte counts do not depend on it
        return None
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


@dataclass
class FlowerRun:
    """What a ServerApp run leaves behind: the server, the final sync and one record per round.

    Example:
        >>> run = FlowerRun()
        >>> run_server(grid, context, settings, run)
        >>> run.server.accumulators, run.history[-1]["bytes_up"]
    """

    server: KSeedServer | None = None
    history: list[dict] = field(default_factory=list)
    nodes: dict[int, int] = field(default_factory=dict)  # client id -> node id
    final_sync: SyncMessage | None = None


def wait_for_nodes(grid, expected: int, timeout: float, poll: float = 0.5) -> list[int]:
    """The connected node ids, once `expected` nodes are connected or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(poll)
        node_ids = list(grid.get_node_ids())
    return node_ids


def register_nodes(grid, node_ids, *, timeout: float) -> dict[int, int]:
    """Ask every node which partition it holds; returns `{client_id: node_id}` (the first node wins a duplicate).

    A node that does not answer within `timeout`, or answers without a valid `partition_id`, is not registered.
    """
    from flwr.app import ConfigRecord, Message, RecordDict

    messages = [
        Message(RecordDict({NODE_RECORD: ConfigRecord({})}), dst_node_id=node_id, message_type=QUERY)
        for node_id in node_ids
    ]
    nodes: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error() or NODE_RECORD not in reply.content:
            continue
        partition_id = reply.content[NODE_RECORD].get("partition_id")
        if isinstance(partition_id, int) and not isinstance(partition_id, bool) and partition_id >= 0:
            nodes.setdefault(partition_id, reply.metadata.src_node_id)
    return nodes


def read_update(
    reply, *, client_id: int, round_index: int, num_seeds: int | None = None
) -> tuple[ClientUpdate | None, int, list[float], str | None]:
    """Decode one train reply: `(update or None, payload bytes, step losses, why it is unusable or None)`.

    Nothing in a reply is trusted: an error reply, a missing record, a payload that is not bytes, a message that
    fails `UpdateMessage.decode` (bad length or CRC, NaN scalars, seed indices out of range), an update for another
    client or round or (when `num_seeds` is given) another K, or losses that are not a list of finite numbers all
    give a reason and no update. The update keeps its header's round and K, which `KSeedServer.aggregate` checks
    again; its claimed `num_samples` is carried but never used as a weight (the server weighs by known counts).
    """
    if reply.has_error():
        return None, 0, [], f"the client replied with an error: {reply.error.reason}"
    content = reply.content
    if UPDATE_RECORD not in content:
        return None, 0, [], f"the reply has no `{UPDATE_RECORD}` record"
    payload = content[UPDATE_RECORD].get("payload")
    if not isinstance(payload, bytes):
        return None, 0, [], f"the update payload is {type(payload).__name__}, not bytes"
    try:
        received = UpdateMessage.decode(payload)
    except ProtocolError as error:
        return None, len(payload), [], f"malformed UpdateMessage: {error}"
    if received.client_id != client_id or received.server_round != round_index:
        return (
            None,
            len(payload),
            [],
            f"the update is for client {received.client_id}, round {received.server_round}; expected client "
            f"{client_id}, round {round_index}",
        )
    if num_seeds is not None and received.num_seeds != num_seeds:
        return None, len(payload), [], f"the update is for K={received.num_seeds} seeds; the server has K={num_seeds}"
    losses = content[METRICS_RECORD].get("losses", []) if METRICS_RECORD in content else []
    if not isinstance(losses, list) or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses):
        losses = []  # a bad metric only loses the loss record; the update itself was validated above
    update = ClientUpdate(
        client_id=received.client_id,
        num_samples=received.num_samples,
        seed_indices=received.seed_indices,
        scalars=received.scalars,
        projected_grads=received.projected_grads,
        server_round=received.server_round,
        num_seeds=received.num_seeds,
    )
    return update, len(payload), [float(x) for x in losses], None


def run_round(grid, task: FederatedTask, server: KSeedServer, nodes: dict[int, int], round_index: int, *, timeout):
    """One FedKSeed round over Flower messages; returns the round's record (the emulation's fields and more).

    The server selects the round's clients, sends each the full `SyncMessage` (and its Pro seed schedule) with its
    `step_offset`, waits up to `timeout` seconds, decodes and checks the replies (client, round, K), and aggregates
    the valid ones, weighted by the partition sizes the server knows (`weighting` in the record).
    A client without a node, one that errs, one that does not answer in time, and one whose reply is malformed is
    left out of the round (`failed` or `rejected`, with the reason in `reasons`); the server state only ever
    changes through `KSeedServer.aggregate`, which validates every update again.
    """
    from flwr.app import ConfigRecord, Message, RecordDict

    started = time.perf_counter()
    config = task.federated
    selected = server.select_clients(round_index)
    record = {
        "round": round_index,
        "clients": selected,
        "bytes_up": 0,
        "bytes_down": 0,
        "flower_bytes_up": 0,
        "flower_bytes_down": 0,
    }
    reasons: dict[int, str] = {}
    messages, client_of_node = [], {}
    for slot, client_id in enumerate(selected):
        node_id = nodes.get(client_id)
        if node_id is None:
            reasons[client_id] = "no SuperNode holds this partition"
            continue
        schedule = None
        if config.pro:
            schedule = pro_seed_schedule(server, server.seed, round_index, client_id, config.local_steps)
        sync = SyncMessage.build(
            server_round=round_index, accumulators=server.accumulators, encoding="full", seed_schedule=schedule
        )
        payload = sync.encode()
        content = RecordDict(
            {
                SYNC_RECORD: ConfigRecord(
                    {
                        "payload": payload,
                        "client_id": client_id,
                        "step_offset": task.step_offset(round_index, slot),
                    }
                )
            }
        )
        message = Message(content, dst_node_id=node_id, message_type=TRAIN, group_id=str(round_index))
        messages.append(message)
        client_of_node[node_id] = client_id
        record["bytes_down"] += len(payload)
        record["flower_bytes_down"] += message_wire_bytes(message) or 0

    replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
    updates: dict[int, ClientUpdate] = {}
    losses: dict[int, list[float]] = {}
    rejected_on_receipt: set[int] = set()
    for reply in replies:
        client_id = client_of_node.get(reply.metadata.src_node_id)
        if client_id is None or client_id in updates or client_id in rejected_on_receipt:
            continue  # not a node of this round, or a second reply: ignored
        record["flower_bytes_up"] += message_wire_bytes(reply) or 0
        update, size, step_losses, reason = read_update(
            reply, client_id=client_id, round_index=round_index, num_seeds=server.num_seeds
        )
        record["bytes_up"] += size
        if update is None:
            reasons[client_id] = reason
            if size:
                rejected_on_receipt.add(client_id)
            continue
        updates[client_id] = update
        losses[client_id] = step_losses
    for client_id in selected:
        if client_id not in updates and client_id not in reasons:
            reasons[client_id] = f"no reply within round_timeout={timeout}s"

    # The server holds the partition (it built it from the recipe, as every node did), so it weighs each client by
    # the size it knows, never by the `num_samples` a client claims.
    sample_counts = {client_id: len(task.partition.clients[client_id]) for client_id in selected}
    result = server.aggregate(round_index, list(updates.values()), sample_counts=sample_counts)
    reasons.update(result.rejected)
    rejected = sorted(rejected_on_receipt | set(result.rejected))
    all_losses = [loss for client_id in selected for loss in losses.get(client_id, [])]  # slot order, as emulated
    record.update(
        accepted=result.accepted,
        failed=sorted(set(reasons) - set(rejected)),
        rejected=rejected,
        reasons={str(client_id): reasons[client_id] for client_id in sorted(reasons)},
        weighting=result.weighting,
        clipped={str(client_id): factor for client_id, factor in sorted(result.clipped.items())},
        train_loss=sum(all_losses) / max(len(all_losses), 1),
        bytes_per_client=(record["bytes_up"] + record["bytes_down"]) / len(selected),
        seeds_touched=result.seeds_touched,
        seconds=time.perf_counter() - started,
    )
    for client_id, reason in sorted(reasons.items()):
        logger.warning("Round %d: client %d left out: %s", round_index, client_id, reason)
    return record


def run_server(grid, context, settings: FlowerConfig | None = None, run: FlowerRun | None = None) -> FlowerRun:
    """The ServerApp's main loop: register the nodes, run the recipe's rounds, write `rounds.jsonl` and the state.

    Args:
        grid: the Flower `Grid`.
        context: the ServerApp's `Context` (its run config holds the settings when `settings` is None).
        settings: the Flower settings; None reads them from `context.run_config`.
        run: a `FlowerRun` to fill (the caller keeps a handle on the results); a new one when None.

    Returns:
        The `FlowerRun`: server, per-round records and the final `SyncMessage`.

    Raises:
        RuntimeError: if no node registered.
    """
    settings = settings or FlowerConfig.from_run_config(context.run_config)
    run = FlowerRun() if run is None else run
    task = load_task(settings.recipe, settings.overrides, with_model=False)
    server = task.make_server()
    run.server = server
    run.nodes = register_nodes(
        grid,
        wait_for_nodes(grid, settings.num_supernodes or task.partition.num_clients, settings.round_timeout),
        timeout=settings.round_timeout,
    )
    if not run.nodes:
        raise RuntimeError("No SuperNode answered the registration query; start them with a `partition-id`.")
    logger.info("FedKSeed over Flower: %d of %d clients have a node", len(run.nodes), task.partition.num_clients)
    output_dir = Path(task.training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rounds_path = output_dir / "rounds.jsonl"
    rounds_path.write_text("")
    for round_index in range(task.federated.rounds):
        entry = run_round(grid, task, server, run.nodes, round_index, timeout=settings.round_timeout)
        run.history.append(entry)
        with rounds_path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
        logger.info(
            "round %d/%d  loss %.4f  bytes/client %.0f (Flower messages: %d down, %d up)  %.1fs",
            round_index + 1,
            task.federated.rounds,
            entry["train_loss"],
            entry["bytes_per_client"],
            entry["flower_bytes_down"],
            entry["flower_bytes_up"],
            entry["seconds"],
        )
    run.final_sync = SyncMessage.build(
        server_round=task.federated.rounds, accumulators=server.accumulators, encoding="full"
    )
    from safetensors.torch import save_file

    save_file(
        {"accumulators": server.accumulators.clone(), "seed_pool": server.seed_pool.clone()},
        str(output_dir / "kseed_server_state.safetensors"),
    )
    return run


def make_server_app(settings: FlowerConfig | None = None, run: FlowerRun | None = None):
    """The FedKSeed `ServerApp`, bound to `settings` (or reading the run config) and filling `run` if given.

    Raises:
        ImportError: if Flower is not installed (`pip install "hf-fedkseed[flower]"`).

    Example:
        >>> run = FlowerRun()
        >>> server_app = make_server_app(FlowerConfig(recipe="recipes/quickstart.yaml"), run)
    """
    from .task import require_flwr

    require_flwr()
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        run_server(grid, context, settings, run)

    return app


def __getattr__(name: str):
    # `flwr run` loads `hf_fedkseed.flower.server_app:app`; built on first access, like the ClientApp.
    if name == "app":
        return make_server_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FlowerRun", "make_server_app", "message_wire_bytes", "read_update", "register_nodes", "run_round"]
