"""The command lines in README.md and docs/command-line.md run as written (test_readme runs the python blocks).

Every line of a plain fenced block that starts with ``graphopt``, ``$ graphopt`` or ``torchrun`` is run in a fresh
temporary directory through ``python -m graphopt`` (``graphopt demo`` too, in full: the quick variant's
accuracy check fails, see test_demo). Substituted, and only this: torchrun runs 2 ranks with
``--standalone`` (this machine has 2 cores, and other tests may hold the default rendezvous port) on data files
the test writes (the README's ``{rank}`` files are the user's own data). A ``$ graphopt ...`` line is followed
by the output it shows, which must match (``...`` stands for the rest of a line).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docs" / "command-line.md"]
OPTIMIZE_FILES = ["model.graphopt", "model.onnx", "report.json", "report.md"]


@dataclass(frozen=True)
class Command:
    """One documented command line: its words and the output the page shows for it (empty if none)."""

    where: str
    argv: tuple[str, ...]
    shown: tuple[str, ...] = ()


def plain_blocks(text: str) -> list[str]:
    """Every fenced block without a language (the pages' shell examples), in order."""
    return [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S) if not lang]


def commands(page: Path) -> list[Command]:
    """The graphopt / torchrun command lines of ``page``, continuation lines joined, comments dropped."""
    found = []
    for i, block in enumerate(plain_blocks(page.read_text())):
        lines = block.replace("\\\n", " ").splitlines()
        for j, line in enumerate(lines):
            prompt = line.startswith("$ ")
            if not line.removeprefix("$ ").startswith(("graphopt ", "torchrun ")):
                continue  # prose, output lines, other tools (make)
            words = shlex.split(line.removeprefix("$ "), comments=True)
            shown = tuple(_output_after(lines[j + 1:])) if prompt else ()
            found.append(Command(f"{page.name} block {i}", tuple(words), shown))
    return found


def _output_after(lines: list[str]):
    for line in lines:
        if line.startswith("$ "):
            return
        yield line


def documented() -> list[Command]:
    unique = {}
    for page in PAGES:
        for c in commands(page):
            unique.setdefault(c.argv, c)  # the README and the page share some lines: run each once
    return list(unique.values())


def test_the_pages_show_every_command():
    names = {c.argv[1] if c.argv[0] == "graphopt" else "torchrun" for c in documented()}
    assert names == {"optimize", "inspect", "passes", "demo", "torchrun"}, names


@pytest.mark.parametrize("cmd", documented(), ids=lambda c: f"{c.where}: {' '.join(c.argv[:2])}")
def test_documented_command_runs_as_written(cmd, tmp_path):
    argv = runnable(cmd.argv, tmp_path)
    env = {**os.environ, "GRAPHOPT_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if cmd.shown:  # an example of an error: exit code 2 and the lines the page shows
        assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert_shown(proc.stderr, cmd.shown)
        return
    assert proc.returncode == 0, f"{' '.join(cmd.argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    check_outputs(cmd.argv, proc.stdout, tmp_path)


def runnable(words: tuple[str, ...], folder: Path) -> list[str]:
    """The subprocess argv for a documented command line (the substitutions the module docstring lists)."""
    if words[0] == "graphopt":
        return [sys.executable, "-m", "graphopt", *words[1:]]
    launcher_end = words.index("-m")
    write_rank_files(words, folder)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            *words[launcher_end:]]


def write_rank_files(words: tuple[str, ...], folder: Path, ranks: int = 2) -> None:
    """The user's data the torchrun example names: inputs shaped like --input-shape, per rank where {rank}."""
    shape = [int(s) for s in words[words.index("--input-shape") + 1].split(",")][1:]
    gen = torch.Generator().manual_seed(0)
    for flag, make in (("--calib", lambda: torch.randn(8, *shape, generator=gen)),
                       ("--finetune", lambda: {"inputs": torch.randn(16, *shape, generator=gen),
                                               "targets": torch.randint(0, 10, (16,), generator=gen)})):
        if flag in words:
            name = words[words.index(flag) + 1]
            for r in range(ranks):
                torch.save(make(), folder / name.replace("{rank}", str(r)))


def check_outputs(words: tuple[str, ...], stdout: str, folder: Path) -> None:
    """What each command promises: files under --out, or the text it prints."""
    command = words[words.index("-m") + 2] if words[0] == "torchrun" else words[1]
    out = folder / words[words.index("--out") + 1] if "--out" in words else None
    if command == "optimize":
        hf = any("tiny_llama" in w for w in words)  # a Hugging Face model also comes back as save_pretrained
        assert sorted(p.name for p in out.iterdir()) == sorted(OPTIMIZE_FILES + (["hf_model"] if hf else []))
        assert "| parameters |" in stdout
        if hf:
            from transformers import AutoModelForCausalLM
            reloaded = AutoModelForCausalLM.from_pretrained(out / "hf_model")
            assert reloaded.config.hidden_size < 64
    elif command == "inspect":
        assert "channel groups:" in stdout and "removable blocks:" in stdout and "layers:" in stdout
    elif command == "passes":
        assert "fake-quant" in stdout and "prune-channels" in stdout
    elif command == "demo":
        out = out or folder / "demo_out"
        for name in ("table.md", "digits_final.graphopt", "accuracy_vs_ratio.png"):
            assert (out / name).stat().st_size > 0, name
    else:
        raise AssertionError(f"no expectations for `{' '.join(words)}`")


def assert_shown(stderr: str, shown: tuple[str, ...]) -> None:
    """Each shown line is a line of stderr; a trailing ``...`` matches the rest of the line."""
    got = stderr.splitlines()
    for line in shown:
        if line.endswith("..."):
            assert any(g.startswith(line[:-3]) for g in got), (line, stderr)
        else:
            assert line in got, (line, stderr)
