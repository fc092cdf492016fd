"""The FedKSeed Flower ClientApp: registration and one round's local ZO steps, as plain handler functions."""

from __future__ import annotations

from .task import METRICS_RECORD, NODE_RECORD, SYNC_RECORD, UPDATE_RECORD, FederatedTask, FlowerConfig, load_task

__all__ = ["handle_query", "handle_train", "make_client_app", "node_partition"]


def node_partition(context) -> int:
    """The partition (client id) this SuperNode trains on: its `partition-id` node config.

    Raises:
        ValueError: if the node was started without an integer `partition-id`.
    """
    partition_id = context.node_config.get("partition-id")
    if not isinstance(partition_id, int) or isinstance(partition_id, bool) or partition_id < 0:
        raise ValueError(
            f"This SuperNode's `partition-id` is {partition_id!r}; start it with "
            '`flower-supernode ... --node-config "partition-id=3"` (the simulation sets it).'
        )
    return partition_id


def handle_query(message, context):
    """Reply which partition this node holds, so the server can address the clients it selects.

    Example:
        >>> reply = handle_query(message, context)
        >>> reply.content["node"]["partition_id"]
        3
    """
    from flwr.app import ConfigRecord, Message, RecordDict

    return Message(RecordDict({NODE_RECORD: ConfigRecord({"partition_id": node_partition(context)})}), reply_to=message)


def handle_train(message, context, task: FederatedTask):
    """Run one client's round: decode the `SyncMessage`s, catch up, take the local ZO steps, reply the update.

    The request's `sync` record holds `payloads` (the SyncMessages, applied in order), `client_id` and `step_offset`;
    the reply's `update` record holds `payload` (the UpdateMessage bytes) and its `metrics` record the loss of every
    step.

    Raises:
        ValueError: for a request that is not for this node's partition, or whose payload is not a valid
            SyncMessage (`ProtocolError`); Flower sends the error back to the server, which leaves this node out.
    """
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from ..federated.protocol import SyncMessage

    record = message.content.get(SYNC_RECORD)
    if record is None:
        raise ValueError(f"The train message has no `{SYNC_RECORD}` record; it was not sent by the FedKSeed ServerApp.")
    payloads, client_id, step_offset = (record.get(key) for key in ("payloads", "client_id", "step_offset"))
    if (
        not isinstance(payloads, list)
        or not all(isinstance(payload, bytes) for payload in payloads)
        or not isinstance(client_id, int)
        or not isinstance(step_offset, int)
    ):
        raise ValueError("The `sync` record needs `payloads` (a list of bytes), `client_id` and `step_offset` (ints).")
    partition_id = node_partition(context)
    if client_id != partition_id:
        raise ValueError(f"Asked to train client {client_id}, but this node holds partition {partition_id}.")
    syncs = [SyncMessage.decode(payload) for payload in payloads]
    update, losses = task.train_client(syncs, client_id=client_id, step_offset=step_offset)
    content = RecordDict(
        {
            UPDATE_RECORD: ConfigRecord({"payload": update.encode()}),
            METRICS_RECORD: MetricRecord({"losses": [float(loss) for loss in losses]}),
        }
    )
    return Message(content, reply_to=message)


def make_client_app(settings: FlowerConfig | None = None):
    """The FedKSeed `ClientApp`, bound to `settings` or, when None, reading them from the run config (`flwr run`).

    Raises:
        ImportError: if Flower is not installed (`pip install "hf-fedkseed[flower]"`).

    Example:
        >>> client_app = make_client_app(FlowerConfig(recipe="recipes/quickstart.yaml"))
    """
    from .task import require_flwr

    require_flwr()
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query()
    def query(message, context):
        return handle_query(message, context)

    @app.train()
    def train(message, context):
        config = settings or FlowerConfig.from_run_config(context.run_config)
        return handle_train(message, context, load_task(config.recipe, config.overrides))

    return app


def __getattr__(name: str):
    # `flwr run` loads `hf_fedkseed.flower.client_app:app`; building it on first access keeps this module importable
    # (and its handlers testable) before Flower is asked for.
    if name == "app":
        return make_client_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
