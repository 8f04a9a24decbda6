"""The graphopt command: pass listing, the demo, and one-line errors."""

import subprocess
import sys
from pathlib import Path

from graphopt.cli import main


def test_passes_lists_builtins_with_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("dce", "fuse", "remove-identity"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert "Fold eval-mode BatchNorm" in out


def test_demo_runs_and_checks_itself(capsys):
    assert main(["demo", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "captured with: export" in out
    assert "fuse" in out and "fused=7" in out
    assert "max abs difference to the original model on a batch of 8" in out


def test_console_script_and_module_entry_points():
    script = Path(sys.executable).with_name("graphopt")
    for cmd in ([str(script), "passes"], [sys.executable, "-m", "graphopt", "passes"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        assert "remove-identity" in out.stdout


def test_unknown_command_exits_with_code_2(capsys):
    assert main(["passes"]) == 0
    capsys.readouterr()
    import pytest

    with pytest.raises(SystemExit) as info:
        main(["nonsense"])
    assert info.value.code == 2
