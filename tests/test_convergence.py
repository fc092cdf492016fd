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
    methods = ["fedkseed", "tensor_subset", "fzoo", "fzoo_subset"]
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
        assert kseed["engine"] == ("counter@tensors=0.25" if "subset" in name else "counter")
    # FZOO uploads one (seed, g) pair per direction: 2 steps x 4 directions against 5 two-point steps
    assert summary["fzoo"]["bytes_per_client_per_round"] > summary["fedkseed"]["bytes_per_client_per_round"]
    assert summary["fedkseed"]["forward_passes_to_target_ratio"] is not None
    assert out.with_suffix(".png").stat().st_size > 10_000
    table = out.with_suffix(".md").read_text()
    assert all(convergence.LABELS[name] in table for name in methods) and "forward passes to target" in table

    # a method added later beside the baseline's runs, which are reused rather than run again
    again = tmp_path / "again.json"
    argv = ["--quick", "--methods", "fedkseed", "shift", "--reuse", str(out), "--output-dir", str(tmp_path / "more")]
    assert convergence.main([*argv, "--json", str(again)]) == 0
    report = json.loads(again.read_text())
    assert report["reused"]["runs"] == [["fedkseed", 42]] and not (tmp_path / "more" / "fedkseed").exists()
    assert report["runs"][0] == json.loads(out.read_text())["runs"][0]
    kseed = json.loads((tmp_path / "more" / "shift" / "seed42" / "kseed_config.json").read_text())
    assert (kseed["engine"], kseed["engine_version"]) == ("counter-shift", 1)
    assert list(report["methods"]) == ["fedkseed", "shift"]
    with pytest.raises(SystemExit):  # another profile's runs are not comparable
        convergence.main(["--methods", "fedkseed", "--reuse", str(out), "--output-dir", str(tmp_path / "other")])
