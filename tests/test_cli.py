"""The `hf-fedkseed` console script: version, environment report, usage errors."""

from __future__ import annotations

import subprocess
import sys

from hf_fedkseed import __version__
from hf_fedkseed.cli import main


def test_version_and_env(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == __version__
    assert main(["env"]) == 0
    report = capsys.readouterr().out
    assert f"hf-fedkseed {__version__}" in report and "torch " in report and "transformers " in report


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: hf-fedkseed" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error():
    result = subprocess.run(
        [sys.executable, "-m", "hf_fedkseed.cli", "fly"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "invalid choice: 'fly'" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_public_name_resolves():
    import hf_fedkseed

    assert sorted(hf_fedkseed.__all__) == sorted(hf_fedkseed._EXPORTS)
    for name in hf_fedkseed.__all__:
        assert getattr(hf_fedkseed, name) is not None
