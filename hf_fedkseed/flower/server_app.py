"""The FedKSeed Flower ServerApp: node registration, then rounds of selection, sync, validation and aggregation."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..federated.protocol import ProtocolError, SyncMessage
from ..federated.rounds import RoundLog, SyncChain, decode_update, full_sync, round_record, seed_schedule
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
    """What a ServerApp run leaves behind: the server, the final syncs and one record per round.

    `final_sync` carries the final accumulators (the paper's form, at the recipe's `sync_precision`); `final_syncs`
    moves `w0` to the final model round by round, the rule every runtime follows, so it rebuilds the emulation's
    model bit for bit.

    Example:
        >>> run = FlowerRun()
        >>> run_server(grid, context, settings, run)
        >>> run.server.accumulators, run.history[-1]["bytes_up"]
    """

    server: KSeedServer | None = None
    history: list[dict] = field(default_factory=list)
    nodes: dict[int, int] = field(default_factory=dict)  # client id -> node id
    final_sync: SyncMessage | None = None
    final_syncs: list[SyncMessage] = field(default_factory=list)  # w0 -> the final model, round by round


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
    reply, *, client_id: int, round_index: int, num_seeds: int
) -> tuple[ClientUpdate | None, int, list[float], str | None]:
    """Decode one train reply: `(update or None, payload bytes, step losses, why it is unusable or None)`.

    Nothing in a reply is trusted: an error reply, a missing record, or a payload that `decode_update` refuses
    (not bytes, a bad length or CRC, NaN scalars, seed indices out of range, another client, round or K) gives a
    reason and no update; losses that are not a list of finite numbers are dropped. The server weighs clients by
    the counts it knows, never by the `num_samples` an update claims.
    """
    if reply.has_error():
        return None, 0, [], f"the client replied with an error: {reply.error.reason}"
    content = reply.content
    if UPDATE_RECORD not in content:
        return None, 0, [], f"the reply has no `{UPDATE_RECORD}` record"
    payload = content[UPDATE_RECORD].get("payload")
    size = len(payload) if isinstance(payload, bytes) else 0
    try:
        update = decode_update(payload, client_id=client_id, round_index=round_index, num_seeds=num_seeds)
    except ProtocolError as error:
        return None, size, [], f"malformed UpdateMessage: {error}"
    except ValueError as error:
        return None, size, [], str(error)
    losses = content[METRICS_RECORD].get("losses", []) if METRICS_RECORD in content else []
    if not isinstance(losses, list) or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses):
        losses = []  # a bad metric only loses the loss record; the update itself was validated above
    return update, size, [float(x) for x in losses], None


def run_round(
    grid,
    task: FederatedTask,
    server: KSeedServer,
    nodes: dict[int, int],
    round_index: int,
    *,
    timeout,
    chain=None,
    sync_from: str = "node",
):
    """One FedKSeed round over Flower messages; returns the round's record (`round_record`'s fields and more).

    The server selects the round's clients and sends each, with its `step_offset`, the syncs that bring its model to
    this round (`SyncChain`: one sparse `SyncMessage` per round since the node last synced, the last one carrying
    the Pro seed schedule), waits up to `timeout` seconds, decodes and checks the replies (client, round, K), and
    aggregates the valid ones, weighted by the partition sizes the server knows (`weighting` in the record).
    A client without a node, one that errs, one that does not answer in time, and one whose reply is malformed is
    left out of the round (`failed` or `rejected`, with the reason in `reasons`), and its next syncs start from
    round 0 (with `sync_from="start"` every node's syncs start there: nodes that share a process, as in the local
    simulation, skip what their process holds); the server state only ever changes through `KSeedServer.aggregate`,
    which validates every update again.
    `bytes_down_full` is what the paper's full syncs (K accumulators each) would have sent instead. With
    `sync_precision: int8` each of a node's syncs is a full int8 message (K bytes + 34, see `SyncChain`): one per
    round when the node was selected in the round before.
    """
    from flwr.app import ConfigRecord, Message, RecordDict

    started = time.perf_counter()
    config = task.federated
    if chain is None:  # a first round on its own: every node starts at w0
        if round_index != 0:
            raise ValueError(f"Round {round_index} needs the run's SyncChain (`chain=`): it knows what nodes hold.")
        chain = SyncChain(server.num_seeds, server.sync_precision)
    if len(chain.starts) == round_index:
        chain.open_round(round_index, server.published_accumulators())
    selected = server.select_clients(round_index)
    bytes_down = bytes_down_full = flower_down = 0
    full_bytes = None
    failed: dict[int, str] = {}
    rejected: dict[int, str] = {}  # a reply with a payload that did not decode as this round's update
    messages, client_of_node = [], {}
    for slot, client_id in enumerate(selected):
        node_id = nodes.get(client_id)
        if node_id is None:
            failed[client_id] = "no SuperNode holds this partition"
            continue
        directions = task.zo_args.zo_directions
        schedule = seed_schedule(server, config, round_index, client_id, directions) if config.pro else None
        if sync_from == "start":
            syncs = chain.since(None, round_index, schedule)
        else:
            syncs = chain.for_client(client_id, round_index, schedule)
        payloads = [sync.encode() for sync in syncs]
        sync_record = {"payloads": payloads, "client_id": client_id, "step_offset": task.step_offset(round_index, slot)}
        message = Message(
            RecordDict({SYNC_RECORD: ConfigRecord(sync_record)}),
            dst_node_id=node_id,
            message_type=TRAIN,
            group_id=str(round_index),
        )
        messages.append(message)
        client_of_node[node_id] = client_id
        bytes_down += sum(len(payload) for payload in payloads)
        if full_bytes is None:  # every selected client's full sync has the same length: encode one
            full_bytes = len(full_sync(server, round_index, schedule).encode())
        bytes_down_full += full_bytes
        flower_down += message_wire_bytes(message) or 0

    replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
    updates: dict[int, ClientUpdate] = {}
    losses: dict[int, list[float]] = {}
    bytes_up = flower_up = 0
    for reply in replies:
        client_id = client_of_node.get(reply.metadata.src_node_id)
        if client_id is None or client_id in updates or client_id in failed or client_id in rejected:
            continue  # not a node of this round, or a second reply: ignored
        flower_up += message_wire_bytes(reply) or 0
        update, size, step_losses, reason = read_update(
            reply, client_id=client_id, round_index=round_index, num_seeds=server.num_seeds
        )
        bytes_up += size
        if update is None:
            (rejected if size else failed)[client_id] = reason
            continue
        updates[client_id] = update
        losses[client_id] = step_losses
    for client_id in selected:
        if client_id not in updates and client_id not in failed and client_id not in rejected:
            failed[client_id] = f"no reply within round_timeout={timeout}s"
    for client_id in selected:  # a node that answered holds this round's model; the others' state is unknown
        if client_id in updates:
            chain.mark_synced(client_id, round_index)
        else:
            chain.forget(client_id)

    # The server holds the partition (it built it from the recipe, as every node did), so it weighs each client by
    # the size it knows, never by the `num_samples` a client claims.
    sample_counts = {client_id: len(task.partition.clients[client_id]) for client_id in selected}
    result = server.aggregate(round_index, list(updates.values()), sample_counts=sample_counts)
    record = round_record(
        round_index,
        selected,
        result,
        losses=[loss for client_id in selected for loss in losses.get(client_id, [])],  # slot order, as emulated
        bytes_up=bytes_up,
        bytes_down=bytes_down,
        failed=failed,
        seconds=time.perf_counter() - started,
        rejected=rejected,
    )
    record.update(bytes_down_full=bytes_down_full, flower_bytes_down=flower_down, flower_bytes_up=flower_up)
    for client_id, reason in sorted({**failed, **rejected, **result.rejected}.items()):
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
    log = RoundLog(output_dir / "rounds.jsonl")
    log.restore()
    chain = SyncChain(server.num_seeds, server.sync_precision)
    for round_index in range(task.federated.rounds):
        entry = run_round(
            grid,
            task,
            server,
            run.nodes,
            round_index,
            timeout=settings.round_timeout,
            chain=chain,
            sync_from=settings.sync_from,
        )
        run.history.append(entry)
        log.append(entry)
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
    rounds = task.federated.rounds
    run.final_sync = full_sync(server, rounds)
    chain.open_round(rounds, server.published_accumulators())
    run.final_syncs = chain.since(None, rounds)
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
