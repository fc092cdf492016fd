"""benchmarks/convergence.py --quick: every method runs its own estimator at the same forward budget, and the summary
measures forward passes, bytes and memory against FedKSeed from the runs' own records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def convergence(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("convergence", None)
    import convergence

    return convergence


@pytest.mark.slow
def test_quick_profile_runs_every_method_and_reports_the_targets(convergence, tmp_path):
    out = tmp_path / "conv.json"
    methods = ["fedkseed", "tensor_subset", "fzoo", "shift"]  # fzoo_subset: fzoo's flags plus tensor_subset's
    assert (
        convergence.main(["--quick", "--methods", *methods, "--output-dir", str(tmp_path / "runs"), "--json", str(out)])
        == 0
    )
    report = json.loads(out.read_text())
    assert report["best_new_method"] in methods[1:]
    summary = report["methods"]
    assert list(summary) == methods
    for name, entry in summary.items():
        run = next(run for run in report["runs"] if run["method"] == name)
        # the same forward budget per client-round (10): 5 two-point steps, or 2 FZOO steps of 4 directions + 1
        assert entry["forwards_per_step"] == convergence.METHODS[name]["points"]
        assert entry["local_steps"] == 10 // entry["forwards_per_step"]
        assert [p["round"] for p in entry["curve"]] == [0, 1, 2]
        assert entry["total_forward_passes"] == 2 * 3 * entry["local_steps"] * entry["forwards_per_step"]
        assert entry["peak_rss_mib"] > 100 and entry["bytes_per_client_per_round"] > 0
        assert run["curve"][-1]["bytes_per_client"] == 2 * entry["bytes_per_client_per_round"]
        kseed = json.loads((tmp_path / "runs" / name / "seed42" / "kseed_config.json").read_text())
        engines = {"tensor_subset": "counter@tensors=0.25", "shift": "counter-shift"}
        assert kseed["engine"] == engines.get(name, "counter")
    # FZOO uploads one (seed, g) pair per direction: 2 steps x 4 directions against 5 two-point steps
    assert summary["fzoo"]["bytes_per_client_per_round"] > summary["fedkseed"]["bytes_per_client_per_round"]
    assert summary["fedkseed"]["forward_passes_to_target_ratio"] is not None
    assert out.with_suffix(".png").stat().st_size > 10_000
    table = out.with_suffix(".md").read_text()
    assert all(convergence.LABELS[name] in table for name in methods) and "forward passes to target" in table

    # a report of other methods beside stored runs, which are reused rather than run again
    again = tmp_path / "again.json"
    argv = ["--quick", "--methods", "fedkseed", "shift", "--reuse", str(out), "--output-dir", str(tmp_path / "more")]
    assert convergence.main([*argv, "--json", str(again)]) == 0
    report = json.loads(again.read_text())
    assert report["reused"]["runs"] == [["fedkseed", 42], ["shift", 42]] and not (tmp_path / "more").exists()
    stored = {run["method"]: run for run in json.loads(out.read_text())["runs"]}
    assert report["runs"] == [stored["fedkseed"], stored["shift"]]
    assert report["methods"]["shift"] == summary["shift"]
    with pytest.raises(SystemExit):  # another profile's runs are not comparable
        convergence.main(["--methods", "fedkseed", "--reuse", str(out), "--output-dir", str(tmp_path / "other")])
