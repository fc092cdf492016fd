"""The compact sync (`sync_precision: int8`): codec, wire form, byte budget, error feedback, runtimes and resume."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from test_callback import config, run

from hf_fedkseed import FederatedCallback, FederatedConfig
from hf_fedkseed.configs import RecipeError, parse_recipe
from hf_fedkseed.federated import ClientUpdate, KSeedClient, KSeedServer, ProtocolError, SyncMessage
from hf_fedkseed.federated.codecs import dequantise_int8, quantise_int8
from hf_fedkseed.federated.rounds import SyncChain, full_sync

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
HEADER, CRC, SCALE = 26, 4, 4
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


@pytest.fixture
def message_bytes_report(monkeypatch):
    """`message_bytes_report` of benchmarks/bytes_report.py, imported as tests/test_protocol.py imports it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("bytes_report", None)
    from bytes_report import message_bytes_report

    return message_bytes_report


def half_scale_bound(scale: float) -> float:
    """`scale / 2`, plus the float64 rounding of `values / scale` (a few ulps of the largest value, 127 scales)."""
    return scale / 2 + 127 * scale * 2**-50


# ---- the codec ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("magnitude", [1e-30, 1e-7, 1.0, 1e5])
def test_int8_codec_is_within_half_a_scale_and_canonical(magnitude):
    values = torch.randn(4096, generator=torch.Generator().manual_seed(1), dtype=torch.float64).numpy() * magnitude
    scale, codes = quantise_int8(values)
    assert codes.dtype == np.int8 and codes.shape == values.shape
    assert scale == float(np.float32(np.abs(values).max() / 127)) and scale == float(np.float32(scale))
    assert int(np.abs(codes).max()) == 127 and int(codes.min()) >= -127
    restored = dequantise_int8(scale, codes)
    assert restored.dtype == np.float64
    assert np.abs(restored - values).max() <= half_scale_bound(scale)
    # Quantising the dequantised values gives the same scale and codes: what the server publishes is a fixed point.
    again_scale, again_codes = quantise_int8(restored)
    assert again_scale == scale and np.array_equal(again_codes, codes)


def test_int8_codec_edge_cases():
    scale, codes = quantise_int8(np.zeros(8))
    assert scale == 0.0 and not codes.any() and not dequantise_int8(scale, codes).any()
    scale, codes = quantise_int8(np.array([-0.0, 0.0]))
    assert scale == 0.0 and np.array_equal(dequantise_int8(scale, codes), [0.0, 0.0])
    scale, codes = quantise_int8(np.array([]))
    assert scale == 0.0 and codes.size == 0
    tiny = np.array([1e-36, -3e-37, 0.0])  # max / 127 is below the smallest normal float32: the scale stops there
    scale, codes = quantise_int8(tiny)
    assert scale == FLOAT32_TINY and codes.tolist() == [85, -26, 0]
    assert np.abs(dequantise_int8(scale, codes) - tiny).max() <= scale / 2
    again_scale, again_codes = quantise_int8(dequantise_int8(scale, codes))
    assert again_scale == scale and np.array_equal(again_codes, codes)
    scale, codes = quantise_int8(np.array([1e-42, -1e-45]))  # below half of it: zero, with the canonical scale 0
    assert scale == 0.0 and not codes.any()
    with pytest.raises(ProtocolError, match="overflow the float32 scale"):
        quantise_int8(np.array([1e300]))


# ---- the wire form -----------------------------------------------------------------------------------------------


def accumulators(num_seeds: int = 4096, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_seeds, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1e-4


@pytest.mark.parametrize("pro", [False, True], ids=["fedkseed", "pro-schedule"])
def test_int8_sync_round_trips_at_its_exact_length(pro):
    acc = accumulators()
    schedule = torch.randint(4096, (200,), generator=torch.Generator().manual_seed(2)) if pro else None
    message = SyncMessage.build(server_round=5, accumulators=acc, value_dtype=torch.int8, seed_schedule=schedule)
    payload = message.encode()
    assert len(payload) == message.encoded_size() == HEADER + SCALE + 4096 + (400 if pro else 0) + CRC
    assert len(payload) == (4530 if pro else 4130)
    assert payload[5] == (0x30 if pro else 0x20)  # the int8 flag, and the schedule's
    received = SyncMessage.decode(payload)
    assert received == message and received.encode() == payload
    assert received.value_dtype == torch.int8 and not received.is_sparse
    values = received.apply_to(None)
    assert values.dtype == torch.float64
    assert torch.equal(values, torch.from_numpy(dequantise_int8(*quantise_int8(acc.numpy()))))
    scale = float(np.float32(acc.abs().max().item() / 127))
    assert (values - acc).abs().max().item() <= half_scale_bound(scale)
    if pro:
        assert torch.equal(received.seed_schedule, schedule)
    # An int8 sync is self-contained: a client's cache does not matter.
    assert torch.equal(received.apply_to(torch.ones(4096), client_round=2), values)


def test_int8_sync_of_all_zero_accumulators():
    message = SyncMessage.build(server_round=0, accumulators=torch.zeros(300), value_dtype=torch.int8)
    payload = message.encode()
    assert len(payload) == HEADER + SCALE + 300 + CRC and payload[HEADER : HEADER + SCALE] == struct.pack("<f", 0.0)
    assert torch.equal(SyncMessage.decode(payload).apply_to(None), torch.zeros(300, dtype=torch.float64))


def patched(payload: bytes, offset: int, new: bytes) -> bytes:
    """`payload` with bytes replaced at `offset` and the CRC32 recomputed, so the content checks are reached."""
    import zlib

    body = payload[:offset] + new + payload[offset + len(new) : -CRC]
    return body + struct.pack("<I", zlib.crc32(body))


def test_int8_decode_refuses_what_no_encoder_writes():
    payload = SyncMessage.build(server_round=1, accumulators=accumulators(300), value_dtype=torch.int8).encode()
    codes_at = HEADER + SCALE
    with pytest.raises(ProtocolError, match=f"truncated SyncMessage: expected {len(payload)} bytes, got"):
        SyncMessage.decode(payload[:-1])
    with pytest.raises(ProtocolError, match="trailing bytes after SyncMessage"):
        SyncMessage.decode(payload + b"\x00")
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ProtocolError, match=r"int8 scale .* is not a finite number >= 0"):
            SyncMessage.decode(patched(payload, HEADER, struct.pack("<f", bad)))
    codes = np.frombuffer(payload, dtype=np.int8, count=300, offset=codes_at)
    halved = (codes // 2).astype(np.int8).tobytes()
    with pytest.raises(ProtocolError, match="not in canonical form"):  # codes that do not reach 127
        SyncMessage.decode(patched(payload, codes_at, halved))
    (scale,) = struct.unpack_from("<f", payload, HEADER)
    doubled = SyncMessage.decode(patched(payload, HEADER, struct.pack("<f", scale * 2)))  # another valid message
    assert torch.equal(doubled.apply_to(None), SyncMessage.decode(payload).apply_to(None) * 2)
    with pytest.raises(ProtocolError, match="not in canonical form"):  # codes without a scale
        SyncMessage.decode(patched(payload, HEADER, struct.pack("<f", 0.0)))
    zero = SyncMessage.build(server_round=1, accumulators=torch.zeros(300), value_dtype=torch.int8).encode()
    with pytest.raises(ProtocolError, match="not in canonical form"):  # a scale without codes
        SyncMessage.decode(patched(zero, HEADER, struct.pack("<f", 1e-3)))
    with pytest.raises(ProtocolError, match="code -128"):
        SyncMessage.decode(patched(payload, codes_at, b"\x80"))
    for other in (0x01, 0x02):  # int8 with the sparse or the float64 flag
        with pytest.raises(ProtocolError, match="int8 is full only"):
            SyncMessage.decode(patched(payload, 5, bytes([0x20 | other])))


def test_int8_syncs_are_full_form_only():
    acc = accumulators(16)
    changed = dict(changed_indices=[0], base_round=0)
    with pytest.raises(ProtocolError, match="int8 accumulators is full form only"):
        SyncMessage(
            server_round=1,
            num_seeds=16,
            accumulator_values=acc[:2],
            accumulator_indices=[0, 1],
            base_round=0,
            value_dtype=torch.int8,
        )
    with pytest.raises(ValueError, match="int8 accumulators travel in the full form only"):
        SyncMessage.build(server_round=1, accumulators=acc, value_dtype=torch.int8, **changed, encoding="sparse")
    auto = SyncMessage.build(server_round=1, accumulators=acc, value_dtype=torch.int8, **changed)
    assert not auto.is_sparse and auto.value_dtype == torch.int8


# ---- the byte budget ---------------------------------------------------------------------------------------------


def test_int8_round_fits_9_kb_and_float32_is_unchanged(message_bytes_report):
    assert message_bytes_report(4096, 200) == {"down": 16_414, "up": 1_230, "total": 17_644}
    assert message_bytes_report(4096, 200, pro=True)["total"] == 18_048
    fedkseed = message_bytes_report(4096, 200, sync_precision="int8")
    pro = message_bytes_report(4096, 200, pro=True, sync_precision="int8")
    assert fedkseed == {"down": 4_130, "up": 1_230, "total": 5_360}
    assert pro == {"down": 4_530, "up": 1_234, "total": 5_764}
    assert fedkseed["total"] <= 9_000 and pro["total"] <= 9_000
    assert message_bytes_report(4096, 200, pro=True, constant_lr=False, sync_precision="int8")["total"] == 6_560
    assert message_bytes_report(4096, 200, changed_seeds=100, sync_precision="int8")["down"] == 4_130  # always full
    with pytest.raises(ValueError, match="Invalid `sync_precision`"):
        message_bytes_report(16, 4, sync_precision="int4")


# ---- error feedback ----------------------------------------------------------------------------------------------


def test_published_accumulators_track_the_exact_sums_where_quantised_deltas_drift():
    """Small, steady updates on a pool whose largest accumulator sets the scale: each round's change is below half
    a quantisation step, so a client fed quantised per-round changes (at the published resolution) never sees them,
    while the published values, quantised afresh from the exact sums, stay within half a step every round."""
    num_seeds, rounds = 64, 300
    server = KSeedServer(4, num_seeds=num_seeds, seed=0, clients_per_round=2, sync_precision="int8")
    generator = torch.Generator().manual_seed(0)
    naive = server.published_accumulators()
    previous = server.accumulators.clone()
    worst_published = worst_naive = 0.0
    for round_index in range(rounds):
        updates = []
        for client_id in server.select_clients(round_index):
            indices = torch.randint(1, num_seeds, (8,), generator=generator)
            scalars = 1e-3 * (1 + 0.5 * torch.randn(8, generator=generator, dtype=torch.float64))
            if round_index == 0:  # one large coefficient fixes the scale near 1 / 127
                indices, scalars = torch.cat([torch.tensor([0]), indices]), torch.cat([torch.tensor([2.0]), scalars])
            updates.append(ClientUpdate(client_id, 10, indices.tolist(), scalars.tolist()))
        result = server.aggregate(round_index, updates)
        assert sorted(result.accepted) == server.select_clients(round_index)
        exact = server.accumulators
        published = server.published_accumulators()
        scale = float(np.float32(exact.abs().max().item() / 127))
        worst_published = max(worst_published, (published - exact).abs().max().item() / scale)
        change = (exact - previous).numpy()  # the naive alternative: send the round's change at the same resolution
        if round_index:
            assert np.abs(change).max() < scale / 2  # so it rounds to zero
        naive += torch.from_numpy(np.clip(np.rint(change / scale), -127, 127) * scale)
        worst_naive = max(worst_naive, (naive - exact).abs().max().item() / scale)
        previous = exact.clone()
    assert worst_published <= 0.5 + 1e-9  # nothing lost: within half a step of the exact sums, every round
    assert worst_naive > 2.0  # the per-round changes were rounded away and the error grew past two steps
    assert (server.accumulators[1:].abs() > 0).all()  # every small seed moved
    # The published sum of the small seeds is the exact one, up to half a step per seed.
    small = server.published_accumulators()[1:].sum() - server.accumulators[1:].sum()
    assert abs(small.item()) <= (num_seeds - 1) * scale / 2


def test_float32_mode_publishes_exactly_what_the_paper_sends():
    server = KSeedServer(4, num_seeds=300, seed=0, clients_per_round=2)
    server.accumulators = accumulators(300)
    published = server.published_accumulators()
    assert torch.equal(published, SyncMessage.build(server_round=0, accumulators=server.accumulators).apply_to(None))
    assert torch.equal(published, server.accumulators.float().double())
    payload = full_sync(server, 3).encode()
    assert len(payload) == HEADER + 4 * 300 + CRC and payload[5] == 0
    with pytest.raises(ValueError, match="Invalid `sync_precision`: 'fp16'; choose one of"):
        KSeedServer(4, num_seeds=16, clients_per_round=2, sync_precision="fp16")


def test_the_int8_chain_sends_one_full_message_per_round():
    chain = SyncChain(16, sync_precision="int8")
    starts = [torch.zeros(16, dtype=torch.float64), accumulators(16, 1), accumulators(16, 2)]
    for round_index, values in enumerate(starts):
        chain.open_round(round_index, values)
    schedule = torch.tensor([3, 4])
    messages = chain.since(None, 2, schedule)
    assert [(m.server_round, m.value_dtype, m.is_sparse) for m in messages] == [(1, torch.int8, False)] * 1 + [
        (2, torch.int8, False)
    ]
    assert messages[-1].seed_schedule.tolist() == [3, 4] and messages[0].seed_schedule is None
    for message, values in zip(messages, starts[1:], strict=True):
        assert torch.equal(message.apply_to(None), torch.from_numpy(dequantise_int8(*quantise_int8(values.numpy()))))
    (current,) = chain.since(2, 2)  # nothing new: the current round, still self-contained
    assert current.server_round == 2 and torch.equal(current.apply_to(None), messages[-1].apply_to(None))


# ---- the emulation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pro", [False, True], ids=["fedkseed", "pro"])
def test_an_int8_run_holds_the_published_accumulators_bit_for_bit(tmp_path, monkeypatch, pro):
    caught_up: list[tuple[torch.Tensor, torch.Tensor]] = []
    after_rounds: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
    begin_client, end_round = FederatedCallback.begin_client, FederatedCallback.end_round

    def record_client(self, slot, optimizer):
        begin_client(self, slot, optimizer)
        caught_up.append((self.client.synced.clone(), self.server.published_accumulators()))

    def record_round(self, round_index):
        entry = end_round(self, round_index)
        weights = [p.detach().clone() for _, p in self.optimizer.named_params]
        after_rounds.append((self.server.published_accumulators(), weights))
        return entry

    monkeypatch.setattr(FederatedCallback, "begin_client", record_client)
    monkeypatch.setattr(FederatedCallback, "end_round", record_round)
    model, optimizer, federated, _ = run(tmp_path, config(sync_precision="int8", pro=pro))
    server = federated.server
    assert server.sync_precision == "int8" and server.accumulators.abs().sum() > 0
    # Every client, after catch-up, holds the server's published accumulators, bit for bit.
    assert len(caught_up) == 3 * 2
    for synced, published in caught_up:
        assert torch.equal(synced, published)
    published = server.published_accumulators()
    assert torch.equal(optimizer.accumulators, published)  # the delta the run saves is the published model
    assert not torch.equal(published, server.accumulators.float().double())  # int8 really was in effect
    # The logged bytes are the int8 syncs: 26 header + 4 scale + K=32 codes + 4 CRC per client (+ 4 uint8 indices).
    for record in json.loads("[" + ",".join((tmp_path / "rounds.jsonl").read_text().splitlines()) + "]"):
        assert record["bytes_down"] == 2 * (HEADER + SCALE + 32 + CRC + (4 if pro else 0))
        assert record["bytes_up"] == 2 * (4 * 5 + 30 + (4 if pro else 0))
    # The weights are w0 replayed round by round over the published accumulators, bit for bit ...
    fresh = tiny_llama()
    client = KSeedClient(list(fresh.named_parameters()), engine=optimizer.engine, seed_pool=optimizer.seed_pool)
    for round_index, (values, weights) in enumerate(after_rounds):
        client.catch_up(SyncMessage.build(server_round=round_index + 1, accumulators=values, value_dtype=torch.int8))
        for (_, param), expected in zip(fresh.named_parameters(), weights, strict=True):
            assert torch.equal(param, expected)
    for a, b in zip(fresh.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    # ... and, up to float32 rounding, w0 - sum_j published_j z_j replayed at once.
    base = tiny_llama()
    with torch.no_grad():
        optimizer.engine.replay_(list(base.named_parameters()), server.seed_pool.tolist(), (-published).tolist())
    for trained, rebuilt in zip(model.parameters(), base.parameters(), strict=True):
        torch.testing.assert_close(trained, rebuilt, rtol=0, atol=1e-5)


def test_int8_resume_ends_bit_identical_and_a_changed_precision_is_refused(tmp_path):
    uninterrupted, _, full, _ = run(tmp_path / "full", config(rounds=4, pro=True, sync_precision="int8"))
    run(
        tmp_path / "killed",
        config(rounds=2, pro=True, sync_precision="int8"),
        save_strategy="steps",
        save_steps=8,
        max_steps=16,
    )
    checkpoint = str(tmp_path / "killed" / "checkpoint-8")
    resumed, optimizer, again, _ = run(
        tmp_path / "killed", config(rounds=4, pro=True, sync_precision="int8"), resume=checkpoint
    )
    for a, b in zip(uninterrupted.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(full.server.accumulators, again.server.accumulators)
    assert torch.equal(optimizer.accumulators, again.server.published_accumulators())
    with pytest.raises(ValueError, match="sync_precision differ"):
        run(tmp_path / "other", config(rounds=4, pro=True), resume=checkpoint)
    # A checkpoint written before the field existed took its default, float32: it still resumes as float32 ...
    state = full.state_dict()
    saved = json.loads(state["config"])
    del saved["sync_precision"]
    state["config"] = json.dumps(saved)
    with pytest.raises(ValueError, match="sync_precision differ"):
        full.load_state_dict(state)  # ... and not as int8
    full.config.sync_precision = "float32"
    full.load_state_dict(state)


# ---- the settings ------------------------------------------------------------------------------------------------


def test_sync_precision_is_validated_and_reaches_the_server(tmp_path):
    with pytest.raises(ValueError, match=r"Invalid `sync_precision` 'int4'; choose one of \('float32', 'int8'\)"):
        FederatedConfig(rounds=1, clients_per_round=1, num_clients=2, sync_precision="int4")
    with pytest.raises(ValueError, match="`method: fedit` sends no accumulators: set `sync_precision: float32`"):
        FederatedConfig(rounds=1, clients_per_round=1, num_clients=2, sync_precision="int8", method="fedit")
    *_, federated, _ = parse_recipe("recipes/smoke.yaml", ["--sync_precision", "int8"])
    assert federated.sync_precision == "int8"
    recipe = tmp_path / "int4.yaml"
    recipe.write_text(Path("recipes/smoke.yaml").read_text() + "sync_precision: int4\n")
    with pytest.raises(RecipeError, match=r"--sync_precision.*invalid choice: 'int4'"):
        parse_recipe(recipe)
    *_, default, _ = parse_recipe("recipes/quickstart.yaml")
    assert default.sync_precision == "float32"  # the paper's sync stays the default


def test_the_summary_and_the_card_record_the_precision():
    from hf_fedkseed.artifacts import run_summary
    from hf_fedkseed.model_card import render_model_card

    summary = run_summary(None, None, None, config(sync_precision="int8"), None)
    assert summary["sync_precision"] == "int8"  # kseed_config.json's `training` holds the summary
    card = str(render_model_card({**summary, "num_seeds": 32}, delta_config={}))  # the rows of a KSeed run
    assert "| accumulators sent to clients | int8 (one float32 scale" in card
    default = str(render_model_card({"method": "fedkseed"}, delta_config={}))
    assert "| accumulators sent to clients | float32 |" in default
