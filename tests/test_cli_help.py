"""Every console entry point's --help runs (issue: `python -m merge_tools --help` crashed on a "100%")."""

from __future__ import annotations

import subprocess
import sys

import pytest

from merge_tools import methods

ENTRY_POINTS = [
    ["train_surge_sdxl.py"],
    ["-m", "merge_tools"],
    ["-m", "sd_scripts_surge.tiny"],
    ["-m", "sd_scripts_surge.gui"],
    ["-m", "sd_scripts_surge.models.prune"],
    ["-m", "sd_scripts_surge.install_kohya"],
]


@pytest.mark.parametrize("argv", ENTRY_POINTS, ids=lambda a: " ".join(a))
def test_help_runs(argv):
    result = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


def test_every_merge_method_help_runs():
    from merge_tools.cli import build_parser

    parser = build_parser()
    for name in methods.REGISTRY:
        with pytest.raises(SystemExit) as info:
            parser.parse_args([name, "--help"])
        assert info.value.code == 0, name


def test_registry_refuses_a_duplicate_and_suggests_a_near_name():
    spec = methods.get("ties")
    with pytest.raises(ValueError, match="already registered"):
        methods.register(spec)
    with pytest.raises(KeyError, match="did you mean 'ties'"):
        methods.get("tiez")
