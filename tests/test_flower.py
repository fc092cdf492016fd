"""The Flower runtime: handlers called directly (no network), a hostile round, and agreement with the emulation."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

pytest.importorskip("flwr", reason='the Flower tests need `pip install "hf-fedkseed[flower]"`')

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from hf_fedkseed.cli import main
from hf_fedkseed.federated.protocol import SyncMessage, UpdateMessage
from hf_fedkseed.federated.rounds import SyncChain
from hf_fedkseed.flower.client_app import handle_query, handle_train
from hf_fedkseed.flower.server_app import run_round
from hf_fedkseed.flower.task import FederatedTask, FlowerConfig

RECIPE = "recipes/smoke.yaml"
OVERRIDES = ["--rounds", "2", "--local_steps", "3", "--max_length", "320", "--num_seeds", "64", "--pro", "false"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    output = str(tmp_path_factory.mktemp("flower"))
    return FederatedTask(RECIPE, [*OVERRIDES, "--output_dir", output])


@pytest.fixture
def identity():
    """Messages built outside a Flower run need the ids the runtime would set."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def node_context(partition_id: int) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition_id,
        node_config={"partition-id": partition_id},
        state=RecordDict(),
        run_config={},
    )


def train_request(task, server, round_index: int, slot: int, client_id: int) -> Message:
    sync = SyncMessage.build(server_round=round_index, accumulators=server.accumulators, encoding="full")
    record = ConfigRecord(
        {"payloads": [sync.encode()], "client_id": client_id, "step_offset": task.step_offset(round_index, slot)}
    )
    return Message(RecordDict({"sync": record}), dst_node_id=100 + client_id, message_type="train", group_id="0")


def test_query_reports_the_nodes_partition(identity):
    request = Message(RecordDict({"node": ConfigRecord({})}), dst_node_id=103, message_type="query")
    assert handle_query(request, node_context(3)).content["node"]["partition_id"] == 3


def test_train_handler_replies_an_update_and_leaves_the_weights_at_the_sync(task, identity):
    server = task.make_server()
    client_id = server.select_clients(0)[0]
    before = [p.detach().clone() for p in task.model.parameters()]
    reply = handle_train(train_request(task, server, 0, 0, client_id), node_context(client_id), task)
    update = UpdateMessage.decode(reply.content["update"]["payload"])
    assert (update.client_id, update.server_round, update.seed_indices.numel()) == (client_id, 0, 3)
    assert update.num_samples == len(task.partition.clients[client_id])
    assert len(reply.content["metrics"]["losses"]) == 3 and torch.count_nonzero(update.scalars) > 0
    for a, b in zip(before, task.model.parameters(), strict=True):  # local drift undone: the node holds w(sync)
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="this node holds partition"):
        handle_train(train_request(task, server, 0, 0, client_id), node_context(client_id + 1), task)


def _patched(payload: bytes, offset: int, value: bytes) -> bytes:
    """The payload with bytes replaced at `offset` and a recomputed CRC: malformed content, valid framing."""
    body = bytearray(payload[:-4])
    body[offset : offset + len(value)] = value
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


class FakeGrid:
    """A Grid without a network: the good nodes run the real handler; the others misbehave or never answer."""

    def __init__(self, task, behaviour: dict[int, str]):
        self.task, self.behaviour, self.timeouts = task, behaviour, []

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        replies = []
        for message in messages:
            client_id = message.content["sync"]["client_id"]
            reply = handle_train(message, node_context(client_id), self.task)
            payload = reply.content["update"]["payload"]
            kind = self.behaviour.get(client_id, "good")
            if kind == "silent":
                continue  # the node never answers: the server's timeout expires
            header = 26
            if kind == "nan":  # the first scalar (after 3 uint8 seed indices) becomes NaN
                payload = _patched(payload, header + 3, struct.pack("<f", float("nan")))
            elif kind == "out_of_range":  # a seed index of 200 with K = 64
                payload = _patched(payload, header, bytes([200]))
            elif kind == "wrong_type":
                payload = "not bytes"
            content = RecordDict(
                {"update": ConfigRecord({"payload": payload}), "metrics": MetricRecord({"losses": [1.0]})}
            )
            replies.append(Message(content, reply_to=message))
        return replies


@pytest.mark.parametrize("kind", ["nan", "out_of_range", "wrong_type"])
def test_a_malformed_reply_and_a_silent_node_leave_the_server_state_as_the_good_updates_make_it(task, kind, identity):
    server = task.make_server()
    selected = server.select_clients(0)
    assert len(selected) == 3
    bad, silent, good = selected
    nodes = {client_id: 100 + client_id for client_id in range(task.partition.num_clients)}
    grid = FakeGrid(task, {bad: kind, silent: "silent"})
    record = run_round(grid, task, server, nodes, 0, timeout=5.0)
    assert grid.timeouts == [5.0]
    assert record["accepted"] == [good]
    assert record["rejected"] == ([bad] if kind != "wrong_type" else [])
    assert sorted(record["failed"]) == sorted([silent] + ([bad] if kind == "wrong_type" else []))
    assert "no reply within round_timeout=5.0s" in record["reasons"][str(silent)]
    # The state equals a server that saw only the good update.
    reference = task.make_server()
    good_reply = handle_train(train_request(task, reference, 0, 2, good), node_context(good), task)
    received = UpdateMessage.decode(good_reply.content["update"]["payload"])
    reference.aggregate(0, [received])
    assert torch.equal(server.accumulators, reference.accumulators)
    assert server.last_round == 0 and torch.isfinite(server.accumulators).all()


def test_the_cli_refuses_a_missing_recipe_with_a_usage_error(capsys):
    assert main(["flower", "missing.yaml"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["flower", str(RECIPE), "--base_evaluation", "outputs/smoke"]) == 2
    assert "`base_evaluation` applies to `hf-fedkseed train`" in capsys.readouterr().err
    with pytest.raises(ValueError, match="`round_timeout`"):
        FlowerConfig(recipe=RECIPE, round_timeout=0)


def emulate(overrides: list[str]):
    """The same recipe through `FederatedCallback` inside the stock Trainer, as `hf-fedkseed train` runs it."""
    from transformers import Trainer

    from hf_fedkseed.callback import FederatedCallback

    task = FederatedTask(RECIPE, overrides)
    federated = FederatedCallback(task.federated, task.train_rows)
    task.training_args.max_steps = federated.total_steps
    trainer = Trainer(
        model=task.model,
        args=task.training_args,
        train_dataset=federated.train_dataset,
        data_collator=task.collator,
        optimizers=(task.optimizer, None),
        callbacks=[federated],
    )
    trainer.train()
    return task, federated


def test_int8_rounds_over_flower_messages_end_where_the_emulation_ends(tmp_path, identity):
    """`sync_precision: int8` over the ServerApp's round (the real handlers, no network): each node gets one full
    int8 sync per round it lacks, and the run ends with the emulation's accumulators and weights bit for bit."""
    overrides = [*OVERRIDES, "--pro", "true", "--sync_precision", "int8"]
    emulated_task, federated = emulate([*overrides, "--output_dir", str(tmp_path / "emulated")])
    task = FederatedTask(RECIPE, [*overrides, "--output_dir", str(tmp_path / "flower")])
    server = task.make_server()
    assert server.sync_precision == "int8"
    nodes = {client_id: 100 + client_id for client_id in range(task.partition.num_clients)}
    chain = SyncChain(server.num_seeds, server.sync_precision)
    full_int8 = 26 + 4 + 64 + 3 + 4  # header, scale, K = 64 codes, 3 scheduled uint8 indices, CRC
    for round_index, emulated in enumerate(federated.history):
        record = run_round(FakeGrid(task, {}), task, server, nodes, round_index, timeout=5.0, chain=chain)
        for key in ("clients", "accepted", "bytes_up", "seeds_touched"):  # FakeGrid replies no real losses
            assert emulated[key] == record[key], key
        assert record["bytes_down"] == record["bytes_down_full"] == emulated["bytes_down"] == 3 * full_int8
    assert torch.equal(server.accumulators, federated.server.accumulators)
    chain.open_round(len(federated.history), server.published_accumulators())
    for sync in chain.since(task.client.synced_round, len(federated.history)):
        assert sync.value_dtype == torch.int8 and not sync.is_sparse
        task.client.catch_up(SyncMessage.decode(sync.encode()))
    assert torch.equal(task.client.synced, server.published_accumulators())
    for a, b in zip(task.model.parameters(), emulated_task.model.parameters(), strict=True):
        assert torch.equal(a, b)


FZOO_SUBSET = ["--zo_estimator", "fzoo", "--zo_directions", "3", "--zo_tensor_fraction", "0.5"]
INT8 = ["--sync_precision", "int8"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "pro, extra",
    # Pro's float32 sync is the pro-fzoo-subset case (a plain Pro case repeated it: 36 s of the suite's budget)
    [(False, []), (True, FZOO_SUBSET), (True, INT8)],
    ids=["fedkseed", "pro-fzoo-subset", "pro-int8"],
)
def test_a_flower_simulation_ends_where_the_emulation_ends(tmp_path, pro, extra):
    from hf_fedkseed.flower.simulation import simulate

    overrides = [*OVERRIDES, *extra, "--pro", str(pro).lower(), "--lr_scheduler_type", "linear"]
    emulated_task, federated = emulate([*overrides, "--output_dir", str(tmp_path / "emulated")])
    flower_overrides = [*overrides, "--output_dir", str(tmp_path / "flower")]
    run = simulate(FlowerConfig(recipe=RECIPE, recipe_overrides=" ".join(flower_overrides), client_num_cpus=2))

    for emulated, flowered in zip(federated.history, run.history, strict=True):
        for key in ("clients", "accepted", "bytes_up", "seeds_touched", "train_loss"):
            assert emulated[key] == flowered[key], key
        assert emulated["bytes_down"] == flowered["bytes_down_full"]  # the paper's full syncs
        assert flowered["flower_bytes_down"] > flowered["bytes_down"]  # the envelope around the same payloads
    # One round core, one local-step path (the stock Trainer) and one catch-up rule (round by round): the two
    # runtimes take the same steps from the same weights, so they agree bit for bit.
    assert torch.equal(run.server.accumulators, federated.server.accumulators)
    assert run.server.accumulators.abs().sum() > 0
    # The model: w0 caught up round by round to the Flower server's accumulators is the emulation's trained model.
    rebuilt = FederatedTask(RECIPE, flower_overrides)
    for sync in run.final_syncs:
        rebuilt.client.catch_up(sync)
    for a, b in zip(rebuilt.model.parameters(), emulated_task.model.parameters(), strict=True):
        assert torch.equal(a, b)

    # `hf-fedkseed flower` ends as `hf-fedkseed train` does: the same files, and a delta of the same accumulators.
    from hf_fedkseed.delta import load_kseed_delta
    from hf_fedkseed.flower_run import finish_flower_run

    results = finish_flower_run(run, FlowerConfig(recipe=RECIPE, recipe_overrides=" ".join(flower_overrides)))
    written = {path.name for path in (tmp_path / "flower").iterdir()}
    expected = {"kseed_config.json", "kseed_delta.safetensors", "README.md", "rounds.jsonl", "eval_results.json"}
    assert expected | {"model.safetensors", "predictions.jsonl", "training.png"} <= written
    delta = load_kseed_delta(tmp_path / "flower")
    assert torch.equal(delta.accumulators.double(), emulated_task.optimizer.accumulators.double())
    assert results["rounds"] == len(run.history) and results["rougeL_after"] is not None
