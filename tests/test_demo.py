"""The demo (what `make demo` runs), in its quick variant: every step runs, the files and the table appear."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("sklearn", reason="the demo's digits dataset ships with scikit-learn (a dev dependency)")
pytest.importorskip("matplotlib", reason="the demo's plots need matplotlib (a dev dependency)")

import graphopt  # noqa: E402
from graphopt.examples.demo import run_demo  # noqa: E402


def test_quick_demo_compresses_exports_and_plots(tmp_path, capsys):
    code = run_demo(quick=True, out=tmp_path, repeats=3)
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| stage")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| original (fp32)", "| fused + pruned 50%, fine-tuned", rows[2].split(" | ")[0], "| int8 (fake-quant + QAT)"]
    assert "removed, fine-tuned" in rows[2]
    params = [graphopt_num(r.split(" | ")[3]) for r in rows]
    assert params[1] < 0.5 * params[0] and params[2] < params[1], rows
    for name in ("accuracy_vs_ratio.png", "channels_per_layer.png", "table.md", "digits_final.graphopt",
                 "stage0.onnx", "stage3.onnx"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "accuracy_vs_ratio.png").read_bytes()[:4] == b"\x89PNG"
    final = graphopt.load(tmp_path / "digits_final.graphopt")  # the saved final model loads and checks itself
    assert abs(graphopt.count_params(final.module) - params[3]) <= 10  # the table rounds to 4 digits


def graphopt_num(text: str) -> float:
    """'51.40K' -> 51400."""
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1], 1)
    return float(text.rstrip("KMG")) * scale


def _demo_in_a_process(out, hash_seed: str) -> list:
    """The quick demo in a fresh interpreter; its table without the timing columns (those vary by design)."""
    env = {**os.environ, "GRAPHOPT_PROGRESS": "0", "PYTHONHASHSEED": hash_seed}
    proc = subprocess.run([sys.executable, "-m", "graphopt", "demo", "--quick", "--repeats", "1", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    # exit code 1 (a torch/onnxruntime accuracy check failing) is the other test's business: this one compares
    assert proc.returncode in (0, 1) and (out / "table.md").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = (out / "table.md").read_text().splitlines()[2:]
    return [proc.returncode, *(row.split(" | ")[:-2] for row in rows)]  # stage, accuracies, params, MACs, ONNX size


def test_demo_numbers_are_the_same_in_every_process(tmp_path):
    """Two interpreters (different string-hash seeds, so any set/dict-order dependence shows) print one table."""
    first = _demo_in_a_process(tmp_path / "a", "1")
    assert first == _demo_in_a_process(tmp_path / "b", "2")
