"""Wire protocol: round trips, index widths, byte budgets, client agreement, every decode error and a fuzz test."""

from __future__ import annotations

import dataclasses
import math
import random
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_fedkseed.federated.protocol import (
    PROTOCOL_MAGIC,
    PROTOCOL_VERSION,
    ProtocolError,
    SyncMessage,
    UpdateMessage,
    decode_message,
    seed_index_dtype,
)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def message_bytes_report(monkeypatch):
    """`message_bytes_report` of benchmarks/bytes_report.py, imported as tests/test_paper_table.py imports one."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("bytes_report", None)
    from bytes_report import message_bytes_report

    return message_bytes_report


KS = (16, 300, 4096, 70_000)  # uint8, uint16, uint16, uint32 seed indices
INDEX_WIDTH = {16: 1, 300: 2, 4096: 2, 70_000: 4}
HEADER, CRC = 26, 4


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pro_probabilities(num_seeds: int, seed: int = 0) -> torch.Tensor:
    """The official FedKSeed-Pro distribution over random importances: softmax of min-max normalised values."""
    importance = torch.randn(num_seeds, generator=gen(seed), dtype=torch.float64).abs()
    return torch.softmax((importance - importance.min()) / (importance.max() - importance.min() + 1e-10), 0)


def sync_variants(num_seeds: int) -> dict[str, SyncMessage]:
    g = gen(num_seeds)
    acc = torch.randn(num_seeds, generator=g, dtype=torch.float64) * 1e-3
    changed = torch.randperm(num_seeds, generator=g)[: max(1, num_seeds // 10)]
    schedule = torch.randint(num_seeds, (37,), generator=g)
    probs = pro_probabilities(num_seeds, seed=num_seeds)
    full = dict(server_round=9, accumulators=acc, encoding="full")
    sparse = dict(server_round=9, accumulators=acc, changed_indices=changed, base_round=4, encoding="sparse")
    return {
        "full": SyncMessage.build(**full),
        "full_float64": SyncMessage.build(**full, value_dtype=torch.float64),
        "sparse": SyncMessage.build(**sparse),
        "sparse_float64": SyncMessage.build(**sparse, value_dtype=torch.float64),
        "probabilities_float32": SyncMessage.build(**full, seed_probabilities=probs),
        "probabilities_log_uint8": SyncMessage.build(
            **sparse, seed_probabilities=probs, probability_encoding="log_uint8"
        ),
        "schedule": SyncMessage.build(**full, seed_schedule=schedule),
        "everything": SyncMessage.build(
            **sparse, seed_probabilities=probs, probability_encoding="log_uint8", seed_schedule=schedule
        ),
        "empty_sparse": SyncMessage.build(**{**sparse, "changed_indices": []}),
        "int8": SyncMessage.build(**full, value_dtype=torch.int8),
        "int8_everything": SyncMessage.build(
            **full,
            value_dtype=torch.int8,
            seed_probabilities=probs,
            probability_encoding="log_uint8",
            seed_schedule=schedule,
        ),
        "int8_zero": SyncMessage.build(**{**full, "accumulators": torch.zeros(num_seeds)}, value_dtype=torch.int8),
    }


def update_variants(num_seeds: int) -> dict[str, UpdateMessage]:
    g = gen(num_seeds + 1)
    steps = 53
    indices = torch.randint(num_seeds, (steps,), generator=g)
    indices[0] = num_seeds - 1  # the largest index must fit the narrowest type
    grads = torch.randn(steps, generator=g, dtype=torch.float64)
    common = dict(server_round=9, client_id=2**32 - 1, num_samples=812, num_seeds=num_seeds, seed_indices=indices)
    return {
        "scalars": UpdateMessage.from_steps(**common, projected_grads=grads, learning_rates=1e-6),
        "pro_constant_lr": UpdateMessage.from_steps(**common, projected_grads=grads, learning_rates=1e-6, pro=True),
        "pro_per_step_lr": UpdateMessage.from_steps(
            **common, projected_grads=grads, learning_rates=torch.linspace(1e-6, 0.0, steps), pro=True
        ),
        "no_steps": UpdateMessage(**{**common, "seed_indices": []}, scalars=[]),
    }


def with_crc(data: bytes) -> bytes:
    """Recompute the CRC32 trailer after a test edits the body (to reach the content checks)."""
    body = data[:-CRC]
    return body + struct.pack("<I", zlib.crc32(body))


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    return with_crc(data[:offset] + new + data[offset + len(new) :])


# ---- index types and round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_seeds", "width"), [(1, 1), (16, 1), (256, 1), (257, 2), (4096, 2), (65536, 2), (65537, 4), (2**32 - 1, 4)]
)
def test_seed_index_dtype_is_the_smallest_that_holds_k(num_seeds, width):
    dtype = seed_index_dtype(num_seeds)
    assert dtype.itemsize == width and dtype.kind == "u"
    assert np.iinfo(dtype).max >= num_seeds - 1


@pytest.mark.parametrize("num_seeds", KS)
def test_sync_round_trips(num_seeds):
    for name, message in sync_variants(num_seeds).items():
        payload = message.encode()
        decoded = SyncMessage.decode(payload)
        assert decoded == message, name
        assert decoded.encode() == payload, name
        assert decode_message(payload) == message, name
        assert len(payload) == message.encoded_size(), name
        assert payload[:3] == PROTOCOL_MAGIC and payload[3] == PROTOCOL_VERSION


@pytest.mark.parametrize("num_seeds", KS)
def test_update_round_trips(num_seeds):
    for name, message in update_variants(num_seeds).items():
        payload = message.encode()
        decoded = UpdateMessage.decode(payload)
        assert decoded == message, name
        assert decoded.encode() == payload, name
        assert decode_message(payload) == message, name
        assert len(payload) == message.encoded_size(), name
        assert torch.equal(decoded.scalars, message.scalars), name


@pytest.mark.parametrize("num_seeds", KS)
def test_encoded_lengths_use_the_narrowest_index_type(num_seeds):
    width = INDEX_WIDTH[num_seeds]
    updates = update_variants(num_seeds)
    steps = updates["scalars"].seed_indices.numel()
    assert len(updates["scalars"].encode()) == HEADER + steps * (width + 4) + CRC
    assert len(updates["pro_constant_lr"].encode()) == HEADER + steps * (width + 4) + 4 + CRC
    assert len(updates["pro_per_step_lr"].encode()) == HEADER + steps * (width + 8) + CRC
    syncs = sync_variants(num_seeds)
    assert len(syncs["full"].encode()) == HEADER + 4 * num_seeds + CRC
    assert len(syncs["full_float64"].encode()) == HEADER + 8 * num_seeds + CRC
    changed = syncs["sparse"].accumulator_indices.numel()
    assert len(syncs["sparse"].encode()) == HEADER + changed * (width + 4) + CRC
    assert len(syncs["schedule"].encode()) == HEADER + 4 * num_seeds + 37 * width + CRC
    assert len(syncs["probabilities_float32"].encode()) == HEADER + 8 * num_seeds + CRC
    assert len(syncs["int8"].encode()) == HEADER + 4 + num_seeds + CRC  # one float32 scale, one byte per seed


# ---- byte budgets at K = 4096, tau = 200 -----------------------------------------------------------------------


def test_fedkseed_round_fits_the_papers_18_kb(message_bytes_report):
    sizes = message_bytes_report(4096, 200)
    assert sizes == {"down": 16_414, "up": 1_230, "total": 17_644}
    assert sizes["total"] <= 17_984  # 4096 * 4 + 200 * (2 + 4) = 17,584 bytes of payload plus headers
    assert message_bytes_report(4096, 200, constant_lr=False) == sizes  # FedKSeed never sends the rate


def test_fedkseed_pro_costs(message_bytes_report):
    schedule = message_bytes_report(4096, 200, pro=True)
    assert schedule == {"down": 16_814, "up": 1_234, "total": 18_048}
    assert schedule["total"] <= 18_432
    assert message_bytes_report(4096, 200, pro=True, constant_lr=False)["total"] == 18_844
    assert message_bytes_report(4096, 200, pro=True, pro_encoding="log_uint8")["total"] == 21_748
    assert message_bytes_report(4096, 200, pro=True, pro_encoding="float32")["total"] == 34_032


def test_sparse_sync_sizes_and_the_automatic_choice(message_bytes_report):
    assert message_bytes_report(4096, 200, changed_seeds=1000)["down"] == HEADER + 1000 * 6 + CRC
    assert message_bytes_report(4096, 200, changed_seeds=4000)["down"] == 16_414  # the full form is smaller
    acc = torch.randn(4096, generator=gen(), dtype=torch.float64)
    # Sparse costs 6 bytes per changed seed, full 4 per seed: sparse wins below 4096 * 4 / 6 = 2730.7 changes.
    for changed, sparse in ((2730, True), (2731, False)):
        message = SyncMessage.build(server_round=1, accumulators=acc, changed_indices=range(changed), base_round=0)
        assert message.is_sparse is sparse
    no_cache = SyncMessage.build(server_round=1, accumulators=acc, changed_indices=range(5))  # no base_round
    assert not no_cache.is_sparse


# ---- agreement: the client holds exactly what the server sent ---------------------------------------------------


def test_full_sync_rounds_to_float32_and_float64_is_exact():
    acc = torch.randn(300, generator=gen(), dtype=torch.float64)
    received = SyncMessage.decode(SyncMessage.build(server_round=0, accumulators=acc).encode())
    assert torch.equal(received.apply_to(None), acc.to(torch.float32).to(torch.float64))
    exact = SyncMessage.decode(
        SyncMessage.build(server_round=0, accumulators=acc, value_dtype=torch.float64).encode()
    ).apply_to(None)
    assert torch.equal(exact, acc) and exact.dtype == torch.float64


def test_sparse_syncs_give_the_client_what_a_full_sync_would():
    g = gen(3)
    num_seeds = 4096
    server = torch.zeros(num_seeds, dtype=torch.float64)
    last_change = torch.full((num_seeds,), -1)
    client = SyncMessage.decode(SyncMessage.build(server_round=0, accumulators=server).encode()).apply_to(None)
    client_round = 0
    for server_round in range(1, 8):
        touched = torch.randint(num_seeds, (200,), generator=g)  # one client's tau steps
        server.index_add_(0, touched, torch.randn(200, generator=g, dtype=torch.float64) * 1e-6)
        last_change[touched] = server_round
        if server_round % 2:  # this client syncs every other round
            continue
        changed = (last_change > client_round).nonzero().flatten()
        message = SyncMessage.build(
            server_round=server_round, accumulators=server, changed_indices=changed, base_round=client_round
        )
        assert message.is_sparse
        client = SyncMessage.decode(message.encode()).apply_to(client, client_round=client_round)
        client_round = server_round
        full = SyncMessage.build(server_round=server_round, accumulators=server).apply_to(None)
        assert torch.equal(client, full)  # bit for bit


def test_messages_are_frozen_copies_of_their_inputs():
    acc = torch.zeros(16, dtype=torch.float64)
    message = SyncMessage.build(server_round=0, accumulators=acc)
    acc += 1.0
    assert message.accumulator_values.abs().sum() == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.server_round = 5


def test_apply_to_refuses_a_sparse_sync_it_cannot_apply():
    acc = torch.ones(16, dtype=torch.float64)
    message = SyncMessage.build(server_round=5, accumulators=acc, changed_indices=[3], base_round=4)
    with pytest.raises(ProtocolError, match="pass the client's cached accumulators"):
        message.apply_to(None)
    with pytest.raises(ProtocolError, match="builds on round 4 but the client's accumulators are from round 3"):
        message.apply_to(torch.zeros(16), client_round=3)
    with pytest.raises(ProtocolError, match="15 entries but K is 16"):
        message.apply_to(torch.zeros(15))
    assert message.apply_to(torch.zeros(16), client_round=4).tolist() == [0.0] * 3 + [1.0] + [0.0] * 12


def test_log_uint8_probabilities_stay_within_the_documented_bound():
    for seed, num_seeds in enumerate(KS):
        probs = pro_probabilities(num_seeds, seed)
        message = SyncMessage(
            server_round=0,
            num_seeds=num_seeds,
            accumulator_values=torch.zeros(num_seeds),
            seed_probabilities=probs,
            probability_encoding="log_uint8",
        )
        step = math.log(probs.max() / probs.min()) / 254
        relative = (message.seed_probabilities / probs - 1).abs().max().item()
        assert relative <= math.expm1(step) <= math.expm1(1 / 254)  # Pro's log-range is at most 1 nat
        assert math.isclose(message.seed_probabilities.sum().item(), 1.0, rel_tol=1e-12)


def test_log_uint8_keeps_zeros_and_uniform_exactly():
    probs = torch.tensor([0.5, 0.0, 0.25, 0.25], dtype=torch.float64)
    common = dict(server_round=0, num_seeds=4, accumulator_values=torch.zeros(4), probability_encoding="log_uint8")
    decoded = SyncMessage.decode(SyncMessage(**common, seed_probabilities=probs).encode())
    assert decoded.seed_probabilities[1] == 0.0
    assert torch.allclose(decoded.seed_probabilities, probs, rtol=3e-3)
    uniform = SyncMessage(**common, seed_probabilities=torch.full((4,), 0.25, dtype=torch.float64))
    assert torch.equal(uniform.seed_probabilities, torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(ProtocolError, match="use probability_encoding='float32'"):
        SyncMessage(**common, seed_probabilities=torch.tensor([1.0, 1e-60, 1.0, 1.0], dtype=torch.float64))


def test_pro_update_carries_exact_scalars_and_collapses_a_constant_rate():
    grads = torch.tensor([0.3, -1.7, 2.5], dtype=torch.float64)
    common = dict(server_round=1, client_id=4, num_samples=10, num_seeds=16, seed_indices=[1, 2, 3])
    update = UpdateMessage(**common, projected_grads=grads, learning_rates=[1e-3, 1e-3, 1e-3])
    assert update.learning_rates.numel() == 1  # a constant rate travels once
    lr32, g32 = torch.tensor(1e-3, dtype=torch.float32).double(), grads.to(torch.float32).double()
    assert torch.equal(update.scalars, lr32 * g32)
    assert dataclasses.replace(update, client_id=5).scalars.equal(update.scalars)
    plain = UpdateMessage.from_steps(**common, projected_grads=grads, learning_rates=1e-3)
    assert plain.projected_grads is None and not plain.is_pro
    assert torch.equal(plain.scalars, (1e-3 * grads).to(torch.float32).double())


def test_decoded_updates_feed_the_server():
    server_module = pytest.importorskip("hf_fedkseed.federated.server")
    server = server_module.KSeedServer(4, num_seeds=300, seed=1, clients_per_round=4, pro=True)
    updates = [
        UpdateMessage.decode(
            UpdateMessage.from_steps(
                server_round=0,
                client_id=client,
                num_samples=10 + client,
                num_seeds=300,
                seed_indices=[client, 299],
                projected_grads=[0.5, -0.25],
                learning_rates=0.5,
                pro=True,
            ).encode()
        )
        for client in server.select_clients(0)
    ]
    result = server.aggregate(0, updates)
    assert not result.rejected and len(result.accepted) == 4
    assert server.accumulators[299].item() == pytest.approx(-0.125)


# ---- errors: decode --------------------------------------------------------------------------------------------


@pytest.fixture
def update_bytes() -> bytes:
    return update_variants(300)["scalars"].encode()  # 53 steps, uint16 indices


@pytest.fixture
def sync_bytes() -> bytes:
    return sync_variants(300)["sparse"].encode()  # 30 changed seeds, uint16 indices


def test_truncated_messages_name_the_expected_length(update_bytes, sync_bytes):
    expected = len(update_bytes)
    with pytest.raises(ProtocolError, match=f"truncated UpdateMessage: expected {expected} bytes, got {expected - 7}"):
        UpdateMessage.decode(update_bytes[:-7])
    with pytest.raises(ProtocolError, match="truncated UpdateMessage: expected at least 26 header bytes, got 20"):
        UpdateMessage.decode(update_bytes[:20])
    with pytest.raises(ProtocolError, match="truncated SyncMessage: expected at least 6 bytes, got 3"):
        SyncMessage.decode(sync_bytes[:3])
    with pytest.raises(ProtocolError, match=f"truncated SyncMessage: expected {len(sync_bytes)} bytes"):
        SyncMessage.decode(sync_bytes[:-1])
    with pytest.raises(ProtocolError, match="truncated message"):
        decode_message(b"")


def test_trailing_garbage_is_refused(update_bytes, sync_bytes):
    with pytest.raises(ProtocolError, match=f"trailing bytes after UpdateMessage: expected {len(update_bytes)} bytes"):
        UpdateMessage.decode(update_bytes + b"\x00")
    with pytest.raises(ProtocolError, match="trailing bytes after SyncMessage"):
        SyncMessage.decode(sync_bytes + b"junk")


def test_wrong_magic_version_and_type(update_bytes, sync_bytes):
    with pytest.raises(ProtocolError, match=r"bad magic in UpdateMessage: expected b'KSD', got b'XSD'"):
        UpdateMessage.decode(b"X" + update_bytes[1:])
    with pytest.raises(ProtocolError, match="bad magic"):
        decode_message(b"PK\x03\x04\x00\x00")
    with pytest.raises(
        ProtocolError, match="unsupported SyncMessage version 2: this hf_fedkseed reads protocol version 1"
    ):
        SyncMessage.decode(sync_bytes[:3] + b"\x02" + sync_bytes[4:])
    with pytest.raises(ProtocolError, match=r"wrong message type: expected UpdateMessage \(type 2\), got type 1"):
        UpdateMessage.decode(sync_bytes)
    with pytest.raises(ProtocolError, match=r"wrong message type: expected SyncMessage \(type 1\), got type 2"):
        SyncMessage.decode(update_bytes)
    with pytest.raises(ProtocolError, match="neither SyncMessage"):
        decode_message(update_bytes[:4] + b"\x07" + update_bytes[5:])
    with pytest.raises(ProtocolError, match="needs bytes, got str"):
        UpdateMessage.decode("KSD")


def test_unknown_and_inconsistent_flags(update_bytes, sync_bytes):
    with pytest.raises(ProtocolError, match="unknown flags 0x80"):
        UpdateMessage.decode(patch(update_bytes, 5, b"\x80"))
    with pytest.raises(ProtocolError, match="unknown flags 0x40"):
        SyncMessage.decode(patch(sync_bytes, 5, bytes([sync_bytes[5] | 0x40])))
    with pytest.raises(ProtocolError, match="per-step learning rates but carry no projected_grads"):
        UpdateMessage.decode(patch(update_bytes, 5, b"\x02"))
    with pytest.raises(ProtocolError, match="log_uint8 probabilities but carry no probabilities"):
        SyncMessage.decode(patch(sync_bytes, 5, bytes([sync_bytes[5] | 0x08])))


def test_crc_mismatch(update_bytes):
    flipped = bytearray(update_bytes)
    flipped[40] ^= 0x10
    with pytest.raises(ProtocolError, match="corrupted UpdateMessage: CRC32 mismatch"):
        UpdateMessage.decode(bytes(flipped))


def test_header_fields_that_no_encoder_writes(sync_bytes):
    full = sync_variants(16)["full"].encode()
    with pytest.raises(ProtocolError, match="full SyncMessage carries 15 accumulators but K is 16"):
        SyncMessage.decode(patch(full, 18, struct.pack("<I", 15)))
    with pytest.raises(ProtocolError, match="full SyncMessage has base_round 3"):
        SyncMessage.decode(patch(full, 14, struct.pack("<I", 3)))
    with pytest.raises(ProtocolError, match="K = 0"):
        SyncMessage.decode(patch(sync_bytes, 6, struct.pack("<I", 0)))
    huge = patch(sync_bytes, 18, struct.pack("<I", 2**32 - 1))  # a length bomb is refused before any allocation
    with pytest.raises(ProtocolError, match="truncated SyncMessage: expected 25769803800 bytes"):
        SyncMessage.decode(huge)


def test_out_of_range_seed_index_is_refused(update_bytes, sync_bytes):
    with pytest.raises(ProtocolError, match=r"`seed_indices` holds seed index 300 at position 0, out of range"):
        UpdateMessage.decode(patch(update_bytes, HEADER, struct.pack("<H", 300)))
    with pytest.raises(ProtocolError, match=r"`accumulator_indices` holds seed index 65535 at position 0"):
        SyncMessage.decode(patch(sync_bytes, HEADER, struct.pack("<H", 65535)))
    with pytest.raises(ProtocolError, match="strictly ascending"):
        SyncMessage.decode(patch(sync_bytes, HEADER, sync_bytes[HEADER + 2 : HEADER + 4]))
    schedule = sync_variants(16)["schedule"].encode()
    with pytest.raises(ProtocolError, match=r"`seed_schedule` holds seed index 200 at position 36"):
        SyncMessage.decode(patch(schedule, len(schedule) - CRC - 1, b"\xc8"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(update_bytes, sync_bytes, bad):
    value = struct.pack("<f", bad)
    with pytest.raises(ProtocolError, match=r"`scalars` holds a non-finite value \((nan|inf|-inf)\) at position 2"):
        UpdateMessage.decode(patch(update_bytes, HEADER + 53 * 2 + 2 * 4, value))
    with pytest.raises(ProtocolError, match="`accumulator_values` holds a non-finite value"):
        SyncMessage.decode(patch(sync_bytes, HEADER + 30 * 2, value))
    pro = update_variants(16)["pro_per_step_lr"].encode()
    with pytest.raises(ProtocolError, match="`projected_grads` holds a non-finite value"):
        UpdateMessage.decode(patch(pro, HEADER + 53, value))
    with pytest.raises(ProtocolError, match="`learning_rates` holds a non-finite value"):
        UpdateMessage.decode(patch(pro, len(pro) - CRC - 4, value))
    probs = sync_variants(16)["probabilities_float32"].encode()
    with pytest.raises(ProtocolError, match="`seed_probabilities` holds a non-finite value"):
        SyncMessage.decode(patch(probs, HEADER + 16 * 4, value))


def test_bad_rates_and_probabilities_on_the_wire():
    pro = update_variants(16)["pro_constant_lr"].encode()
    with pytest.raises(ProtocolError, match="`learning_rates` must be >= 0"):
        UpdateMessage.decode(patch(pro, len(pro) - CRC - 4, struct.pack("<f", -1e-3)))
    probs = sync_variants(16)["probabilities_float32"].encode()
    with pytest.raises(ProtocolError, match="non-negative with a positive sum"):
        SyncMessage.decode(patch(probs, HEADER + 16 * 4, struct.pack("<f", -0.5)))
    log = sync_variants(16)["probabilities_log_uint8"].encode()
    offset = HEADER + 1 * (1 + 4)  # one changed seed, then the float32 step and 16 codes
    with pytest.raises(ProtocolError, match="log_uint8 step nan"):
        SyncMessage.decode(patch(log, offset, struct.pack("<f", float("nan"))))
    with pytest.raises(ProtocolError, match="no code 0"):
        SyncMessage.decode(patch(log, offset + 4, b"\x05" * 16))
    with pytest.raises(ProtocolError, match="not in canonical form"):
        SyncMessage.decode(patch(log, offset + 4, b"\x00" + b"\x07" * 15))


# ---- errors: construction --------------------------------------------------------------------------------------


def test_update_construction_errors():
    common = dict(server_round=0, client_id=0, num_samples=1, num_seeds=16)
    with pytest.raises(ProtocolError, match=r"holds seed index 16 at position 1, out of range: .*\[0, K=16\)"):
        UpdateMessage(**common, seed_indices=[0, 16], scalars=[1.0, 2.0])
    with pytest.raises(ProtocolError, match="seed index -1"):
        UpdateMessage(**common, seed_indices=[-1], scalars=[1.0])
    with pytest.raises(ProtocolError, match="must hold integer seed indices"):
        UpdateMessage(**common, seed_indices=[0.5], scalars=[1.0])
    with pytest.raises(ProtocolError, match=r"non-finite value \(nan\)"):
        UpdateMessage(**common, seed_indices=[0], scalars=[float("nan")])
    with pytest.raises(ProtocolError, match=r"non-finite value \(inf\) at position 0 \(as float32\)"):
        UpdateMessage(**common, seed_indices=[0], scalars=torch.tensor([1e39], dtype=torch.float64))
    with pytest.raises(ProtocolError, match="2 seed indices but 1 scalars"):
        UpdateMessage(**common, seed_indices=[0, 1], scalars=[1.0])
    with pytest.raises(ProtocolError, match="needs `scalars`"):
        UpdateMessage(**common, seed_indices=[0])
    with pytest.raises(ProtocolError, match="needs `learning_rates`"):
        UpdateMessage(**common, seed_indices=[0], projected_grads=[1.0])
    with pytest.raises(ProtocolError, match="`learning_rates` go with `projected_grads`"):
        UpdateMessage(**common, seed_indices=[0], scalars=[1.0], learning_rates=1.0)
    with pytest.raises(ProtocolError, match="3 learning_rates for 2 steps"):
        UpdateMessage(**common, seed_indices=[0, 1], projected_grads=[1.0, 2.0], learning_rates=[1.0, 2.0, 3.0])
    with pytest.raises(ProtocolError, match="differ from `learning_rates \\* projected_grads`"):
        UpdateMessage(**common, seed_indices=[0], projected_grads=[1.0], learning_rates=0.5, scalars=[1.0])
    with pytest.raises(ProtocolError, match="must be 1-D"):
        UpdateMessage(**common, seed_indices=[[0]], scalars=[[1.0]])
    with pytest.raises(ProtocolError, match=r"`client_id` must be an integer in \[0, 2\*\*32 - 1\], got 4294967296"):
        UpdateMessage(**{**common, "client_id": 2**32}, seed_indices=[0], scalars=[1.0])
    with pytest.raises(ProtocolError, match="`num_samples` must be an integer"):
        UpdateMessage(**{**common, "num_samples": 1.5}, seed_indices=[0], scalars=[1.0])
    with pytest.raises(ProtocolError, match="`server_round` must be an integer"):
        UpdateMessage(**{**common, "server_round": -1}, seed_indices=[0], scalars=[1.0])
    with pytest.raises(ProtocolError, match=r"`num_seeds` must be an integer in \[1,"):
        UpdateMessage(**{**common, "num_seeds": 0}, seed_indices=[], scalars=[])
    with pytest.raises(ProtocolError, match="2 learning_rates for 3 steps"):
        UpdateMessage.from_steps(**common, seed_indices=[0, 1, 2], projected_grads=[1, 2, 3], learning_rates=[1, 2])


def test_sync_construction_errors(message_bytes_report):
    zeros = torch.zeros(16)
    common = dict(server_round=0, num_seeds=16)
    with pytest.raises(ProtocolError, match="carries 15 accumulators in full form but K is 16"):
        SyncMessage(**common, accumulator_values=torch.zeros(15))
    with pytest.raises(ProtocolError, match="needs `base_round`"):
        SyncMessage(**common, accumulator_values=[1.0], accumulator_indices=[3])
    with pytest.raises(ProtocolError, match="`base_round` is only for sparse messages"):
        SyncMessage(**common, accumulator_values=zeros, base_round=2)
    with pytest.raises(ProtocolError, match="strictly ascending"):
        SyncMessage(**common, accumulator_values=[1.0, 2.0], accumulator_indices=[3, 3], base_round=0)
    with pytest.raises(ProtocolError, match="2 accumulator indices but 1 values"):
        SyncMessage(**common, accumulator_values=[1.0], accumulator_indices=[3, 4], base_round=0)
    with pytest.raises(ProtocolError, match="`accumulator_values` holds a non-finite value"):
        SyncMessage(**common, accumulator_values=torch.full((16,), float("inf")))
    with pytest.raises(ProtocolError, match=r"`value_dtype` must be torch\.float32, torch\.float64 or torch\.int8"):
        SyncMessage(**common, accumulator_values=zeros, value_dtype=torch.float16)
    with pytest.raises(ProtocolError, match="has 15 entries; it needs one per seed"):
        SyncMessage(**common, accumulator_values=zeros, seed_probabilities=torch.ones(15))
    with pytest.raises(ProtocolError, match="non-negative with a positive sum"):
        SyncMessage(**common, accumulator_values=zeros, seed_probabilities=torch.zeros(16))
    with pytest.raises(ProtocolError, match="`probability_encoding` must be one of"):
        SyncMessage(**common, accumulator_values=zeros, seed_probabilities=torch.ones(16), probability_encoding="f16")
    with pytest.raises(ProtocolError, match="`seed_schedule` holds seed index 16"):
        SyncMessage(**common, accumulator_values=zeros, seed_schedule=[16])
    with pytest.raises(ValueError, match="Invalid `encoding`"):
        SyncMessage.build(server_round=0, accumulators=zeros, encoding="delta")
    with pytest.raises(ValueError, match="needs `changed_indices` and `base_round`"):
        SyncMessage.build(server_round=0, accumulators=zeros, encoding="sparse")
    with pytest.raises(ValueError, match="Invalid `pro_encoding`"):
        message_bytes_report(16, 4, pro=True, pro_encoding="float16")


# ---- fuzz --------------------------------------------------------------------------------------------------------


def _mutations(payload: bytes, rng: random.Random, count: int):
    for _ in range(count):
        kind = rng.randrange(5)
        data = bytearray(payload)
        if kind == 0:  # truncate
            yield bytes(data[: rng.randrange(len(data))])
        elif kind == 1:  # flip bits
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            yield bytes(data)
        elif kind == 2:  # insert or append bytes
            position = rng.randrange(len(data) + 1)
            yield bytes(data[:position]) + rng.randbytes(rng.randint(1, 8)) + bytes(data[position:])
        elif kind == 3:  # change the body and fix the CRC, so the content checks are what has to catch it
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data) - CRC)] = rng.randrange(256)
            yield with_crc(bytes(data))
        else:  # random bytes behind a valid prefix
            yield bytes(data[:6]) + rng.randbytes(rng.randrange(64))


def test_fuzzed_messages_decode_or_raise_protocol_error():
    rng = random.Random(20240601)
    payloads = [m.encode() for k in (16, 300, 70_000) for m in update_variants(k).values()]
    payloads += [m.encode() for k in (16, 300) for m in sync_variants(k).values()]
    outcomes = {"decoded": 0, "refused": 0}
    for payload in payloads:
        for data in _mutations(payload, rng, 150):
            try:
                message = decode_message(data)
            except ProtocolError:
                outcomes["refused"] += 1
                continue
            # Whatever decodes is a valid message that encodes back to the same bytes.
            assert message.encode() == data
            outcomes["decoded"] += 1
    assert outcomes["refused"] > 0 and outcomes["decoded"] > 0
