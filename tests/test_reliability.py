"""Reliability: nothing a client sends is trusted (counts, scalars, rounds, K), and a Byzantine client stays bounded.

Each section pins one defect of the "Reliability" issue; add new hostile cases to the tables (`HOSTILE_UPDATES`,
`ATTACKS`, `CLIENT_REFUSALS`) rather than new one-off tests.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama

from hf_fedkseed import KSeedZOOptimizer
from hf_fedkseed.federated import KSeedClient, SyncMessage, UpdateMessage
from hf_fedkseed.federated.server import (
    AGGREGATIONS,
    OUTLIER_NORM_FACTOR,
    OUTLIER_SCALAR_FACTOR,
    SANITY_MAX_ABS_ACCUMULATOR,
    SANITY_MAX_ABS_SCALAR,
    ClientUpdate,
    KSeedServer,
)

K = 4096
TAU = 20
UINT32_MAX = 2**32 - 1


def all_selected(num_clients: int = 5, **kwargs) -> KSeedServer:
    """Every client takes part in every round, which keeps the hostile rounds short."""
    kwargs.setdefault("num_seeds", K)
    return KSeedServer(num_clients, clients_per_round=num_clients, seed=1, **kwargs)


def honest_update(client_id: int, round_index: int = 0, *, scale: float = 1e-4, steps: int = TAU) -> ClientUpdate:
    """tau (seed index, lr * g) pairs of an honest client: seeds drawn uniformly, lr * g ~ N(0, scale)."""
    generator = torch.Generator().manual_seed(1000 * round_index + client_id)
    return ClientUpdate(
        client_id,
        100,
        torch.randint(0, K, (steps,), generator=generator),
        scale * torch.randn(steps, generator=generator, dtype=torch.float64),
        server_round=round_index,
        num_seeds=K,
    )


def state_reloads(server: KSeedServer) -> bool:
    twin = KSeedServer(server.num_clients, num_seeds=server.num_seeds, seed=server.seed, clients_per_round=1)
    twin.pro_clip = server.pro_clip
    twin.load_state_dict(server.state_dict())
    return torch.equal(twin.accumulators, server.accumulators)


# ---------------------------------------------------------------------- 8: sample counts are not trusted
def test_a_claimed_count_of_2_32_gets_only_its_known_weight():
    server = all_selected()
    updates = [honest_update(c) for c in range(5)]
    updates[0].num_samples = UINT32_MAX
    result = server.aggregate(0, updates, sample_counts={c: 100 for c in range(5)})
    assert result.weighting == "known_counts" and result.weights == {c: 0.2 for c in range(5)}


def test_without_known_counts_claims_are_capped_at_a_multiple_of_the_median():
    server = all_selected()
    updates = [honest_update(c) for c in range(5)]
    updates[0].num_samples = UINT32_MAX
    result = server.aggregate(0, updates)
    assert result.weighting == "capped"
    assert result.weights[0] == pytest.approx(400 / 800)  # capped at 4 x the median claim of 100


def test_known_counts_must_cover_every_update():
    with pytest.raises(ValueError, match="`sample_counts`"):
        all_selected().aggregate(0, [honest_update(0)], sample_counts={1: 10})


def test_the_emulation_weighs_by_partition_sizes_and_records_it(tmp_path, monkeypatch):
    from test_callback import config, run

    _, _, federated, _ = run(tmp_path / "honest", config(rounds=2, clients_per_round=3))
    original = KSeedClient.build_update

    def lying(self, **kwargs):
        return original(self, **{**kwargs, "num_samples": UINT32_MAX})

    monkeypatch.setattr(KSeedClient, "build_update", lying)
    _, _, lied_federated, _ = run(tmp_path / "lied", config(rounds=2, clients_per_round=3))
    assert all(entry["weighting"] == "known_counts" for entry in lied_federated.history)
    assert torch.equal(lied_federated.server.accumulators, federated.server.accumulators)


# ---------------------------------------------------------------------- 9: outlier scalars, the Byzantine bound
def test_scalars_of_3e38_are_rejected_and_never_reach_a_client_model():
    server = all_selected(num_seeds=64)
    updates = [ClientUpdate(c, 10, [c, 7], [1e-4, -2e-4], server_round=0) for c in range(5)]
    updates[3] = ClientUpdate(3, 10, [3, 7], [3e38, -3e38], server_round=0)
    result = server.aggregate(0, updates)
    assert 3 not in result.accepted and "sanity bound" in result.rejected[3]
    model = tiny_llama()
    optimizer = KSeedZOOptimizer(model, lr=1e-3, num_seeds=64, seed=1)
    client = KSeedClient(optimizer.named_params, engine=optimizer.engine, seed_pool=optimizer.seed_pool)
    client.catch_up(SyncMessage.build(server_round=1, accumulators=server.accumulators))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert state_reloads(server)


def test_a_single_client_is_held_by_the_absolute_bound():
    server = all_selected(num_clients=1, num_seeds=64)
    result = server.aggregate(0, [ClientUpdate(0, 10, [1], [2 * SANITY_MAX_ABS_SCALAR], server_round=0)])
    assert result.accepted == [] and server.accumulators.abs().sum() == 0


def test_a_scalar_outlier_among_five_is_rejected_with_its_reason():
    server = all_selected()
    updates = [honest_update(c) for c in range(5)]
    median_max = sorted(u.scalars.abs().max().item() for u in updates)[2]
    updates[4].scalars = updates[4].scalars.clone()
    updates[4].scalars[0] = 1.01 * OUTLIER_SCALAR_FACTOR * median_max * 2  # beyond the factor whatever its rank
    result = server.aggregate(0, updates)
    assert 4 in result.rejected and "median client maximum" in result.rejected[4]
    assert result.accepted == [0, 1, 2, 3]


def test_honest_rounds_keep_the_official_weighted_mean_bit_for_bit():
    for aggregation in ("samples", "equal"):
        server = all_selected(aggregation=aggregation)
        updates = [honest_update(c) for c in range(5)]
        for c, update in enumerate(updates):
            update.num_samples = 50 + 10 * c
        result = server.aggregate(0, updates)
        raw = [float(u.num_samples) if aggregation == "samples" else 1.0 for u in updates]
        expected = torch.zeros(K, dtype=torch.float64)
        for weight, update in zip(raw, updates, strict=True):
            local = torch.zeros(K, dtype=torch.float64).index_add_(0, update.seed_indices, update.scalars)
            expected += weight / sum(raw) * local
        assert result.clipped == {} and result.linear
        assert torch.equal(server.accumulators.view(torch.int64), expected.view(torch.int64))


def byzantine_scalars(honest: list[ClientUpdate], kind: str) -> ClientUpdate:
    """Client 4's update: the largest scalars the screening accepts, spread, concentrated or aligned."""
    maxima = sorted(u.scalars.abs().max().item() for u in honest[:4])
    bound = 0.999 * OUTLIER_SCALAR_FACTOR * maxima[1]  # under the factor x the (lower) median of the round
    generator = torch.Generator().manual_seed(99)
    if kind == "spread":  # every step at the bound, on its own seeds
        seeds = torch.randint(0, K, (TAU,), generator=generator)
        scalars = torch.full((TAU,), bound, dtype=torch.float64)
    elif kind == "one_seed":  # every step at the bound, all on one seed
        seeds = torch.full((TAU,), 5, dtype=torch.int64)
        scalars = torch.full((TAU,), bound, dtype=torch.float64)
    else:  # "aligned": omniscient, on the honest clients' seeds with the sign of their sum
        total = torch.zeros(K, dtype=torch.float64)
        for update in honest[:4]:
            total.index_add_(0, update.seed_indices, update.scalars)
        seeds = total.abs().argsort(descending=True)[:TAU]
        scalars = bound * total[seeds].sign()
    return ClientUpdate(4, 100, seeds, scalars, server_round=0, num_seeds=K)


ATTACKS = ["spread", "one_seed", "aligned"]


def displacement(accumulators: torch.Tensor, seed_pool: torch.Tensor) -> float:
    """||w - w_before_round|| on a tiny model for a round that moved the accumulators from 0 to `accumulators`."""
    model = tiny_llama()
    optimizer = KSeedZOOptimizer(model, lr=1e-3, num_seeds=K, seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    changed = accumulators.nonzero().flatten()
    with torch.no_grad():
        optimizer.engine.replay_(optimizer.named_params, seed_pool[changed].tolist(), (-accumulators[changed]).tolist())
    return math.sqrt(sum(((p.detach() - b) ** 2).sum().item() for p, b in zip(model.parameters(), before, strict=True)))


def byzantine_ratio(aggregation: str, kind: str) -> float:
    honest = [honest_update(c) for c in range(5)]
    counts = {c: 100 for c in range(5)}
    reference = all_selected(aggregation=aggregation)
    reference.aggregate(0, honest, sample_counts=counts)
    attacked = all_selected(aggregation=aggregation)
    attacked.aggregate(0, [*honest[:4], byzantine_scalars(honest, kind)], sample_counts=counts)
    assert torch.isfinite(attacked.accumulators).all()
    return displacement(attacked.accumulators, attacked.seed_pool) / displacement(
        reference.accumulators, reference.seed_pool
    )


@pytest.mark.parametrize("kind", ATTACKS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_one_byzantine_client_in_five_moves_the_model_at_most_twice_as_far(aggregation, kind):
    ratio = byzantine_ratio(aggregation, kind)
    print(f"{aggregation} {kind}: {ratio:.3f}x an honest round")
    assert ratio <= 2.0


def test_the_default_norm_bound_is_what_holds_the_attacker():
    honest = [honest_update(c) for c in range(5)]
    server = all_selected()
    result = server.aggregate(0, [*honest[:4], byzantine_scalars(honest, "one_seed")])
    assert 4 in result.accepted and result.clipped[4] < 1 and not result.linear
    norms = [torch.zeros(K, dtype=torch.float64).index_add_(0, u.seed_indices, u.scalars).norm() for u in honest[:4]]
    median = sorted(norms)[2].item()  # of the five norms; the attacker's is the largest
    attacker_norm = TAU * byzantine_scalars(honest, "one_seed").scalars[0].item()
    assert result.clipped[4] * attacker_norm == pytest.approx(OUTLIER_NORM_FACTOR * median, rel=1e-12)


def test_a_clipped_client_keeps_its_weight_share_and_only_its_contribution_shrinks():
    """Norm bounding as in FL (clip, then average with the original weights): s_c = c_c * n_c / sum(n)."""
    honest = [honest_update(c) for c in range(5)]
    updates = [*honest[:4], byzantine_scalars(honest, "one_seed")]
    counts = {0: 100, 1: 300, 2: 200, 3: 100, 4: 300}
    server = all_selected()
    result = server.aggregate(0, updates, sample_counts=counts)
    factor = result.clipped[4]
    assert list(result.clipped) == [4] and 0 < factor < 1
    # The unclipped clients keep n_c / sum(n) over the accepted clients, exactly as in a round without clipping.
    assert result.weights == {c: counts[c] / 1000 for c in range(5)}
    assert result.effective_weights == {**result.weights, 4: counts[4] / 1000 * factor}
    expected = torch.zeros(K, dtype=torch.float64)
    for update in updates:  # ascending client id, as the server sums
        local = torch.zeros(K, dtype=torch.float64).index_add_(0, update.seed_indices, update.scalars)
        expected += result.effective_weights[update.client_id] * local
    assert torch.equal(server.accumulators, expected)
    # Robust statistics are not weighted means of the updates: no effective weights to apply them by.
    for aggregation in ("trimmed_mean", "median"):
        assert all_selected(aggregation=aggregation).aggregate(0, updates).effective_weights is None


# ---------------------------------------------------------------------- 10: round, K, finite accumulators
HOSTILE_UPDATES = {
    "replayed round": (lambda: honest_update(0, round_index=0), "replayed"),
    "other K": (lambda: ClientUpdate(0, 10, [1], [1e-4], server_round=1, num_seeds=K // 2), "K=2048"),
    "two 1.7e308": (lambda: ClientUpdate(0, 10, [7, 7], [1.7e308, 1.7e308], server_round=1), "sanity bound"),
    "claims 2^32 samples": (None, None),  # accepted, with its known weight: see section 8
}


@pytest.mark.parametrize("kind", [k for k, v in HOSTILE_UPDATES.items() if v[0] is not None])
def test_a_hostile_update_is_rejected_whole_and_the_state_reloads(kind):
    server = all_selected(num_clients=1)
    server.aggregate(0, [honest_update(0, round_index=0)])
    before = server.accumulators.clone()
    make, reason = HOSTILE_UPDATES[kind]
    result = server.aggregate(1, [make()])
    assert result.accepted == [] and reason in result.rejected[0]
    assert torch.equal(server.accumulators, before) and state_reloads(server)


def test_an_update_that_would_push_an_accumulator_past_the_bound_is_rejected_whole():
    server = all_selected(num_clients=1, num_seeds=64)
    steps = int(SANITY_MAX_ABS_ACCUMULATOR / SANITY_MAX_ABS_SCALAR) // 2 + 1  # each round adds just over half
    push = [ClientUpdate(0, 1, [3] * steps, [SANITY_MAX_ABS_SCALAR] * steps, server_round=r) for r in range(2)]
    assert server.aggregate(0, [push[0]]).accepted == [0]
    before = server.accumulators.clone()
    result = server.aggregate(1, [push[1]])
    assert result.accepted == [] and "SANITY_MAX_ABS_ACCUMULATOR" in result.rejected[0]
    assert torch.equal(server.accumulators, before) and state_reloads(server)


def test_pro_gradients_that_would_overflow_the_statistics_are_rejected():
    server = all_selected(num_clients=1, num_seeds=64, pro=True, pro_clip=math.inf)
    result = server.aggregate(0, [ClientUpdate(0, 1, [2, 2], [0.0, 0.0], [1.7e308, 1.7e308], server_round=0)])
    assert result.accepted == [] and "Pro statistic" in result.rejected[0]
    assert torch.isfinite(server.pro_abs_sum).all()


def test_a_decoded_update_message_is_checked_for_its_round_as_it_is():
    server = all_selected(num_clients=1, num_seeds=64)
    message = UpdateMessage(server_round=0, client_id=0, num_samples=1, num_seeds=64, seed_indices=[7], scalars=[1.0])
    assert server.aggregate(0, [message]).accepted == [0]
    assert server.accumulators[7] == 1.0
    result = server.aggregate(1, [message])  # the same bytes again, a round later
    assert result.accepted == [] and server.accumulators[7] == 1.0


# ---------------------------------------------------------------------- 11: the Flower client and server refuse
def fake_task(local_steps: int = 4, total_steps: int = 40, num_seeds: int = 16):
    """What `FederatedTask.train_client` checks before it trains, without building a model."""
    return SimpleNamespace(
        model=object(),
        partition=SimpleNamespace(num_clients=3),
        optimizer=SimpleNamespace(num_seeds=num_seeds, directions=1),
        federated=SimpleNamespace(local_steps=local_steps),
        total_steps=total_steps,
    )


def sync(num_seeds: int = 16, schedule=None) -> SyncMessage:
    return SyncMessage.build(
        server_round=0, accumulators=torch.zeros(num_seeds, dtype=torch.float64), seed_schedule=schedule
    )


CLIENT_REFUSALS = {
    "short schedule": (dict(message=sync(schedule=[1, 2, 3])), "exactly one per step"),
    "long schedule": (dict(message=sync(schedule=[1, 2, 3, 4, 5])), "exactly one per step"),
    "offset beyond the run": (dict(step_offset=10**12), "outside this run"),
    "negative offset": (dict(step_offset=-4), "outside this run"),
    "bool offset": (dict(step_offset=True), "outside this run"),
    "other K": (dict(message=sync(num_seeds=32)), "K=32"),
}


@pytest.mark.parametrize("kind", list(CLIENT_REFUSALS))
def test_the_flower_client_refuses_a_bad_request_at_once(kind):
    from hf_fedkseed.flower.task import FederatedTask

    case, match = CLIENT_REFUSALS[kind]
    with pytest.raises(ValueError, match=match):
        FederatedTask.train_client(
            fake_task(), [case.get("message", sync())], client_id=0, step_offset=case.get("step_offset", 0)
        )


class FakeReply:
    """A Flower reply as `read_update` reads it (no flwr needed)."""

    def __init__(self, payload: bytes):
        self.content = {"update": {"payload": payload}}

    def has_error(self) -> bool:
        return False


def test_the_flower_server_refuses_an_update_for_another_k():
    from hf_fedkseed.flower.server_app import read_update

    payload = UpdateMessage(
        server_round=0, client_id=1, num_samples=UINT32_MAX, num_seeds=32, seed_indices=[3], scalars=[1.0]
    ).encode()
    update, size, _, reason = read_update(FakeReply(payload), client_id=1, round_index=0, num_seeds=16)
    assert update is None and size == len(payload) and "K=32" in reason
    update, _, _, reason = read_update(FakeReply(payload), client_id=1, round_index=0, num_seeds=32)
    assert reason is None and (update.server_round, update.num_seeds) == (0, 32)


def test_robust_statistics_by_hand_on_a_shared_seed():
    # Five clients all drew seed 2; one pulls hard (9.5, inside the scalar outlier factor). Seed 3 is only
    # client 0's: untrimmed, it moves exactly as under equal weights (value x 1/5).
    values = [1.0, 2.0, 3.0, 4.0, 9.5]
    updates = [ClientUpdate(c, 10, [2], [v], server_round=0) for c, v in enumerate(values)]
    updates[0] = ClientUpdate(0, 10, [2, 3], [1.0, 0.5], server_round=0)
    trimmed = all_selected(num_seeds=8, aggregation="trimmed_mean")
    trimmed.aggregate(0, updates)
    assert trimmed.accumulators[2].item() == pytest.approx(3.0)  # drop 1.0 and 9.5: mean(2, 3, 4) x 5/5
    assert trimmed.accumulators[3].item() == pytest.approx(0.5 / 5)
    median = all_selected(num_seeds=8, aggregation="median")
    median.aggregate(0, updates)
    assert median.accumulators[2].item() == pytest.approx(3.0) and median.accumulators[3].item() == pytest.approx(0.1)


# ====================================================================== losing work, bad input (recipes and runs)
# The rest of the "Reliability" issue: items 1-5 (resume and checkpoint integrity) and 6-7 (bad input) through the
# real `hf-fedkseed train` on the tiny smoke recipe (a random tiny Llama, byte tokenizer, the shipped tasks).
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from hf_fedkseed.artifacts import MANIFEST_NAME, latest_complete_checkpoint, verify_checkpoint  # noqa: E402
from hf_fedkseed.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "recipes/smoke.yaml"
# 8 rounds of 3 clients x 2 local steps = 48 Trainer steps; a checkpoint (with its manifest) after every round.
RUN_FLAGS = [
    "--rounds", "8", "--local_steps", "2", "--max_eval_samples", "2", "--max_new_tokens", "2",
    "--save_strategy", "steps", "--save_steps", "6", "--eval_every_rounds", "1",
]  # fmt: skip
STEPS_PER_ROUND = 6


def train_process(output_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "hf_fedkseed.cli", "train", SMOKE, *RUN_FLAGS, "--output_dir", str(output_dir), *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def without_timings(value):
    """A summary without its wall-clock fields (`seconds`, `train_seconds`, ...), which differ from run to run."""
    if isinstance(value, dict):
        return {key: without_timings(item) for key, item in value.items() if "seconds" not in key}
    if isinstance(value, list):
        return [without_timings(item) for item in value]
    return value


def summaries(output_dir: Path) -> dict:
    """Everything a run leaves that must not depend on being resumed: the weights, the delta, every summary file."""
    rounds = [json.loads(line) for line in (output_dir / "rounds.jsonl").read_text().splitlines()]
    return {
        "model.safetensors": (output_dir / "model.safetensors").read_bytes(),
        "kseed_delta.safetensors": (output_dir / "kseed_delta.safetensors").read_bytes(),
        "README.md": (output_dir / "README.md").read_text(),
        "kseed_config.json": json.loads((output_dir / "kseed_config.json").read_text()),
        "eval_results.json": without_timings(json.loads((output_dir / "eval_results.json").read_text())),
        "rounds.jsonl": without_timings(rounds),
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: the same run, never killed (its output directory has the same name as the resumed one's, which
    the card and the delta config record)."""
    output = tmp_path_factory.mktemp("uninterrupted") / "run"
    process = train_process(output)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return output


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything loads the model: bad input must be refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr("hf_fedkseed.pipeline.load_model", refuse)
    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the repository root
    import datasets

    datasets.disable_progress_bars()  # progress bars would add stderr lines to the one-line check
    yield
    datasets.enable_progress_bars()


def one_line_usage_error(code: int, err: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("hf-fedkseed train: error: ") and "Traceback" not in err
    assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------- 1-5: resume and integrity
@pytest.mark.slow
def test_a_killed_run_resumed_from_last_ends_identical_to_an_uninterrupted_one(uninterrupted, tmp_path):
    output = tmp_path / "run"
    process = train_process(output)
    deadline = time.monotonic() + 600
    while not list(output.glob(f"checkpoint-*/{MANIFEST_NAME}")):  # the first complete checkpoint
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # kill -9: no handler, no cleanup, maybe mid-write
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (output / "eval_results.json").exists()  # killed before the end
    complete = latest_complete_checkpoint(output)
    assert complete is not None
    # What a kill -9 while saving leaves (item 2): an empty checkpoint, and one with a 0-byte optimizer.pt and no
    # trainer_state.json; both newer than the complete one, so `last` must skip them. And a torn last line (item 4).
    step = int(complete.name.split("-")[1])
    (output / f"checkpoint-{step + 2 * STEPS_PER_ROUND}").mkdir(exist_ok=True)
    broken = output / f"checkpoint-{step + STEPS_PER_ROUND}"
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(complete, broken)
    (broken / "optimizer.pt").write_bytes(b"")
    (broken / "trainer_state.json").unlink()
    (broken / MANIFEST_NAME).unlink()
    with (output / "rounds.jsonl").open("a") as handle:
        handle.write('{"round": 5, "clients": [0, ')

    resumed = train_process(output, "--resume_from_checkpoint", "last")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"Resuming from {complete}" in err
    assert "Skipping checkpoint-" in err and "last line is torn" in err
    reference, after = summaries(uninterrupted), summaries(output)
    for name in reference:
        assert after[name] == reference[name], name
    assert after["eval_results.json"]["rounds"] == 8 and after["kseed_config.json"]["training"]["rounds_completed"] == 8
    # Every checkpoint of the run, the killed part's and the resumed part's, now carries a manifest that verifies.
    for directory in output.glob("checkpoint-*"):
        if int(directory.name.split("-")[1]) <= 8 * STEPS_PER_ROUND:
            verify_checkpoint(directory)


def flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x80
    path.write_bytes(bytes(data))


def flip_a_weight_sign(checkpoint: Path) -> None:
    data = (checkpoint / "model.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    flip_byte(checkpoint / "model.safetensors", 8 + header + 3)  # the sign bit of the first float32 weight


def flip_an_optimizer_byte(checkpoint: Path) -> None:
    path = checkpoint / "optimizer.pt"
    flip_byte(path, path.stat().st_size // 2)


def truncate_the_optimizer(checkpoint: Path) -> None:
    path = checkpoint / "optimizer.pt"
    path.write_bytes(path.read_bytes()[:100])


def empty_checkpoint(checkpoint: Path) -> None:
    shutil.rmtree(checkpoint)
    checkpoint.mkdir()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "resume", "fragment"),
    [
        (flip_a_weight_sign, "checkpoint", "model.safetensors does not match its sha256 in checkpoint_manifest.json"),
        (flip_an_optimizer_byte, "checkpoint", "optimizer.pt does not match its sha256"),
        (truncate_the_optimizer, "checkpoint", "optimizer.pt has 100 bytes but checkpoint_manifest.json records"),
        (empty_checkpoint, "checkpoint", "has no checkpoint_manifest.json: it is incomplete"),
        (empty_checkpoint, "last", "`resume_from_checkpoint: last` found no complete checkpoint"),
        (None, "missing", "is not a directory; pass a checkpoint-<step> directory"),
    ],
)
def test_a_damaged_or_missing_checkpoint_is_refused_with_exit_2(
    uninterrupted, tmp_path, no_model_load, capsys, damage, resume, fragment
):
    output = tmp_path / "run"
    checkpoint = output / "checkpoint-12"
    shutil.copytree(uninterrupted / "checkpoint-12", checkpoint)
    if damage is not None:
        damage(checkpoint)
    target = {"checkpoint": str(checkpoint), "last": "last", "missing": str(tmp_path / "nope")}[resume]
    code = main(["train", SMOKE, *RUN_FLAGS, "--output_dir", str(output), "--resume_from_checkpoint", target])
    one_line_usage_error(code, capsys.readouterr().err, fragment)
    assert not (output / "rounds.jsonl").exists()  # nothing of the run was touched


def test_the_manifest_lists_every_file_and_ignores_temporaries(tmp_path):
    from hf_fedkseed.artifacts import CheckpointError, write_checkpoint_manifest

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "b.json").write_text("{}")
    (tmp_path / ".a.bin.tmp").write_bytes(b"half")
    manifest = write_checkpoint_manifest(tmp_path)
    assert sorted(manifest["files"]) == ["a.bin", "sub/b.json"] and not (tmp_path / f".{MANIFEST_NAME}.tmp").exists()
    assert verify_checkpoint(tmp_path) == manifest
    (tmp_path / "sub" / "b.json").unlink()
    with pytest.raises(CheckpointError, match=r"b\.json is missing from the checkpoint"):
        verify_checkpoint(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"format": "hf_fedkseed.checkpoint_manifest", "fi')
    with pytest.raises(CheckpointError, match=r"checkpoint_manifest\.json is corrupted"):
        verify_checkpoint(tmp_path)


# ---------------------------------------------------------------------- 6-7: bad input, refused before the model
def write_smoke_variant(tmp_path: Path, **changes) -> str:
    """The smoke recipe with some keys changed (None removes a key)."""
    config = yaml.safe_load((ROOT / SMOKE).read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def write_file(name: str, data: bytes):
    def make(tmp_path: Path) -> str:
        path = tmp_path / name
        path.write_bytes(data)
        return str(path)

    return make


ALPACA_ROW = b'{"instruction": "Say hi", "input": "", "output": "hi"}\n'
BAD_FLAGS = [
    (["--num_seeds", "0"], "Invalid `num_seeds`: 0; it must be a positive integer"),
    (["--zo_eps", "0"], "Invalid `zo_eps`: 0.0; it must be a finite number > 0"),
    (["--zo_eps", "inf"], "Invalid `zo_eps`: inf"),
    (["--learning_rate", "nan"], "Invalid `learning_rate`: nan; it must be a finite number > 0"),
    (["--learning_rate", "-1e-3"], "Invalid `learning_rate`: -0.001"),  # a negative number parses as a value
    (["--clients_per_round", "100"], "Invalid `clients_per_round`: 100; it must be an integer in [1, num_clients=6]"),
    (["--max_length", "0"], "Invalid `max_length`: 0; it must be a positive integer"),
    (["--per_device_train_batch_size", "0"], "Invalid `per_device_train_batch_size`: 0"),
    (["--per_device_eval_batch_size", "0"], "Invalid `per_device_eval_batch_size`: 0"),
    (["--gradient_accumulation_steps", "0"], "Invalid `gradient_accumulation_steps`: 0"),
    (["--max_abs_scalar", "-1"], "Invalid `max_abs_scalar`: -1.0; it must be a finite number > 0"),
    (["--eval_every_rounds", "-1"], "Invalid `eval_every_rounds`: -1; it must be an integer >= 0"),
    (["--max_new_tokens", "0"], "Invalid `max_new_tokens`: 0; it must be a positive integer"),
    (["--max_eval_samples", "-1"], "Invalid `max_eval_samples`: -1"),
    (["--eval_fraction", "1.5"], "Invalid `eval_fraction`: 1.5; it must be a finite number >= 0 and < 1"),
    (["--grad_clip", "0"], "Invalid `grad_clip`: 0.0"),
    (["--engine", "warp-drive"], "Invalid `engine`: 'warp-drive'; choose one of"),
    (["--pro_clip", "inf"], "Invalid `pro_clip`: inf"),
    (["--dirichlet_alpha", "0"], "Invalid `dirichlet_alpha`: 0.0"),
    (["--partition_seed", "-1"], "Invalid `partition_seed`: -1"),
    (["--lora_r", "0"], "Invalid `lora_r`: 0"),
    (["--dataloader_num_workers", "2"], "Invalid `dataloader_num_workers`: 2"),
    (["--save_strategy", "steps", "--save_steps", "0"], "Invalid `save_steps`: 0"),
    (["--max_steps", "5"], "Invalid `max_steps`: 5; the rounds take"),
    (["--rounds", "1", "2"], "`rounds` takes a single value but got more (extra: '2')"),
    (["--resume_from_checkpoint", "/no/such/checkpoint-5"], "`resume_from_checkpoint`: '/no/such/checkpoint-5' is not"),
]
BAD_RECIPES = [
    ({"rounds": [1, 2]}, None, "`rounds` takes a single value, not a list ([1, 2])"),
    ({"rounds": [5]}, None, "`rounds` takes a single value, not a list ([5])"),
    ({"num_seeds": 0}, None, "Invalid `num_seeds`: 0"),
    ({"learning_rate": -0.001}, None, "Invalid `learning_rate`: -0.001"),
    ({"dataset_name": "data/missing.jsonl", "dataset_format": "alpaca"}, None, "'data/missing.jsonl' does not exist"),
    ({"dataset_format": "alpaca"}, write_file("empty.jsonl", b""), "is empty; pass a file with rows"),
    ({"dataset_format": "alpaca"}, write_file("latin1.jsonl", ALPACA_ROW.replace(b"hi", b"h\xe9")), "is not UTF-8"),
    ({"dataset_format": "alpaca"}, write_file("cols.jsonl", b'{"prompt": "x"}\n'), "has no columns `instruction`"),
    (
        {"dataset_format": "natural_instructions"},
        write_file("blank.jsonl", b"\n \n"),
        "is empty; pass a file with rows",
    ),
]


@pytest.mark.parametrize(("flags", "fragment"), BAD_FLAGS, ids=[" ".join(flags) for flags, _ in BAD_FLAGS])
def test_a_bad_flag_exits_2_with_one_line_before_the_model_loads(tmp_path, no_model_load, capsys, flags, fragment):
    output = tmp_path / "out"
    code = main(["train", SMOKE, "--output_dir", str(output), *flags])
    one_line_usage_error(code, capsys.readouterr().err, fragment)
    assert not output.exists()  # no empty output directory left behind


@pytest.mark.parametrize(
    ("changes", "make_data", "fragment"), BAD_RECIPES, ids=[fragment[:40] for _, _, fragment in BAD_RECIPES]
)
def test_a_bad_recipe_or_dataset_exits_2_with_one_line_before_the_model_loads(
    tmp_path, no_model_load, capsys, changes, make_data, fragment
):
    if make_data is not None:
        changes = dict(changes, dataset_name=make_data(tmp_path))
    output = tmp_path / "out"
    code = main(["train", write_smoke_variant(tmp_path, **changes), "--output_dir", str(output)])
    one_line_usage_error(code, capsys.readouterr().err, fragment)
    assert not output.exists()


def test_a_recipe_that_is_not_utf8_exits_2(tmp_path, no_model_load, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes((ROOT / SMOKE).read_bytes() + b"# caf\xe9\n")
    one_line_usage_error(main(["train", str(recipe)]), capsys.readouterr().err, "is not UTF-8 text (byte")


def test_an_output_dir_that_is_a_file_or_not_writable_exits_2(tmp_path, no_model_load, capsys):
    afile = tmp_path / "taken"
    afile.write_text("x")
    code = main(["train", SMOKE, "--output_dir", str(afile)])
    one_line_usage_error(code, capsys.readouterr().err, f"`output_dir`: '{afile}' is an existing file")
    if os.geteuid() == 0:  # root writes anywhere but in /proc
        code = main(["train", SMOKE, "--output_dir", "/proc/hf_fedkseed_out"])
        one_line_usage_error(code, capsys.readouterr().err, "`output_dir`: cannot write in '/proc/hf_fedkseed_out'")
        return
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        code = main(["train", SMOKE, "--output_dir", str(locked / "out")])
        one_line_usage_error(code, capsys.readouterr().err, "`output_dir`: cannot write in")
    finally:
        locked.chmod(0o700)


def test_the_console_script_prints_one_line_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hf_fedkseed.cli", "train", SMOKE, "--num_seeds", "0", "--output_dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        check=False,
    )
    one_line_usage_error(result.returncode, result.stderr, "Invalid `num_seeds`: 0")


def test_negative_values_parse_where_they_are_valid():
    from hf_fedkseed.configs import parse_recipe

    os.chdir(ROOT)
    *_, training_args = parse_recipe(SMOKE, ["--adam_beta1", "-1e-1", "--seed", "-3"])
    assert training_args.adam_beta1 == -0.1 and training_args.seed == -3


def test_the_fedavg_baseline_resumes_its_round_log_by_the_same_rule(tmp_path, caplog):
    """FedAvg/FedIT/FedZO runs keep the same rounds.jsonl rule as FedKSeed: a torn last line is dropped with a
    warning and the kept records become the history the summaries are written from."""
    from datasets import Dataset

    from hf_fedkseed.baselines.fedavg import FedAvgCallback
    from hf_fedkseed.callback import FederatedConfig
    from hf_fedkseed.federated.rounds import RoundLog
    from hf_fedkseed.trainer_rounds import FederatedRoundsCallback

    rows = Dataset.from_dict({"task": ["a", "b"], "input_ids": [[1, 2], [3, 4]], "labels": [[1, 2], [3, 4]]})
    config = FederatedConfig(
        rounds=3, local_steps=1, clients_per_round=1, partition="natural", partition_column="task", method="fedavg"
    )
    callback = FedAvgCallback(config, rows)
    assert isinstance(callback, FederatedRoundsCallback)  # the base that keeps the log for every method
    callback.log = RoundLog(tmp_path / "rounds.jsonl")
    callback.log.path.write_text('{"round": 0, "bytes_per_client": 1}\n{"round": 1, "bytes_per_client": 2}\n')
    with callback.log.path.open("a") as handle:
        handle.write('{"round": 2, "clients": [0, ')
    callback.history = callback.log.restore(keep_below=2)
    assert [record["round"] for record in callback.history] == [0, 1]
    assert [json.loads(line)["round"] for line in callback.log.path.read_text().splitlines()] == [0, 1]
    assert "last line is torn" in caplog.text
