"""The graphopt command: optimize end to end in a subprocess, inspect, passes, and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt.cli.entry import main

TESTS = Path(__file__).parent
ZOO_MODEL = "models:make_resnet_basic"  # tests/models.py, importable from the tests directory


def _run(*args, cwd=TESTS):
    env = {**os.environ, "GRAPHOPT_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "graphopt", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_optimize_end_to_end_writes_model_onnx_and_reports(tmp_path):
    out = tmp_path / "out"
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(8, 3, 32, 32), calib)
    proc = _run("optimize", ZOO_MODEL, "--input-shape", "1,3,32,32", "--out", str(out), "--calib", str(calib),
                "--passes", "fuse,prune-channels:ratio=0.5,remove-layers:n=1,protect=[],fake-quant")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.graphopt", "model.onnx", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["report"]["passes"]] == ["fuse", "prune-channels", "remove-layers", "fake-quant"]
    params_before, params_after = report["summary"]["params"]
    assert params_after < 0.3 * params_before
    onnx = report["onnx"]  # a fake-quant graph is written as QDQ with int8 weights and checked in onnxruntime
    assert onnx["quantize_nodes"] > 0 and onnx["int8_weights"] > 0 and onnx["max_abs_error"] is not None
    assert "| parameters |" in (out / "report.md").read_text()
    assert "graphopt: optimizing with passes" in proc.stderr  # long steps say what they are doing

    from models import make_resnet_basic

    loaded = graphopt.load(out / "model.graphopt", model=make_resnet_basic())
    assert graphopt.count_params(loaded.module) == params_after
    assert [r.name for r in loaded.report.records][-1] == "fake-quant"


def test_saved_file_is_a_model_argument(tmp_path):
    from models import build

    case = build("mlp")
    saved = graphopt.save(graphopt.optimize(case.model, "fuse", case.example_inputs), tmp_path / "mlp.graphopt")
    assert main(["optimize", str(saved), "--passes", "prune-channels:ratio=0.5", "--out", str(tmp_path / "o"),
                 "--no-onnx"]) == 0
    again = graphopt.load(tmp_path / "o" / "model.graphopt")
    assert graphopt.count_params(again.module) < graphopt.count_params(case.model)


def test_finetune_option_trains_after_the_passes(tmp_path, capsys):
    data = tmp_path / "train.pt"
    gen = torch.Generator().manual_seed(0)
    torch.save({"inputs": torch.randn(32, 64, generator=gen), "targets": torch.randint(0, 10, (32,), generator=gen)},
               data)
    cwd = os.getcwd()
    os.chdir(TESTS)
    try:
        code = main(["optimize", "models:make_mlp", "--input-shape", "2,64", "--passes", "prune-channels:ratio=0.5",
                     "--finetune", str(data), "--epochs", "2", "--lr", "1e-3", "--distill", "--no-onnx",
                     "--out", str(tmp_path / "o")])
    finally:
        os.chdir(cwd)
    assert code == 0
    assert "fine-tune loss per epoch: " in capsys.readouterr().err


def test_inspect_prints_groups_blocks_and_layers(capsys):
    assert main(["inspect", ZOO_MODEL, "--input-shape", "1,3,32,32"]) == 0  # tests/ is on sys.path
    out = capsys.readouterr().out
    assert "channel groups: 31 (7 prunable)" in out
    assert "frozen groups, by reason:" in out and "model input `x`" in out and "model output" in out
    assert "removable blocks: 2" in out and "layers.0 " in out
    assert "layers.3.conv2.0 " in out and "weight [64, 64, 3, 3]" in out


@pytest.mark.parametrize("args, message, hint", [
    (["optimize", "models:no_such_factory", "--input-shape", "1,3,32,32"],
     "graphopt: error: 'models' has no function 'no_such_factory' for MODEL 'models:no_such_factory'",
     "hint: name a function or class that builds the model with no arguments"),
    (["optimize", "no_such_package.models:build", "--input-shape", "1,3,32,32"],
     "graphopt: error: cannot import 'no_such_package.models' for MODEL 'no_such_package.models:build': "
     "No module named 'no_such_package'", "hint: run graphopt from the directory that holds the package"),
    (["optimize", ZOO_MODEL, "--input-shape", "1,3,a,32"],
     "graphopt: error: bad --input-shape '1,3,a,32': expected positive integers separated by commas, "
     "like 1,3,224,224", "hint: run `graphopt COMMAND --help` for the expected arguments"),
    (["optimize", ZOO_MODEL, "--input-shape", "1,3,32,32", "--passes", "fuse,prune-chanels"],
     "graphopt: error: unknown pass 'prune-chanels'; did you mean 'prune-channels'?",
     "hint: run `graphopt passes` to list the registered passes and their options"),
    (["optimize", ZOO_MODEL, "--passes", "fuse"],
     "graphopt: error: --input-shape is required for a model built from code",
     "hint: --input-shape 1,3,224,224 (repeat the option for several inputs)"),
    (["optimize", ZOO_MODEL, "--input-shape", "1,3,32,32", "--passes", "fuse,fake-quant"],  # the CLI's flag,
     "graphopt: error: fake-quant needs calibration data to choose its scales",  # not the API's calib_data=
     "hint: add --calib FILE.pt (a torch.save file of an (N, ...) tensor of real inputs), or --calib random:N"),
    (["optimize", ZOO_MODEL, "--input-shape", "1,3,32,32", "--passes", "remove-layers:n=1,protect=[]"],
     "graphopt: error: remove-layers: criterion 'block-influence' needs calibration batches",
     "hint: add --calib FILE.pt"),
])
def test_errors_are_one_line_and_a_hint(tmp_path, capsys, args, message, hint):
    cwd = os.getcwd()
    os.chdir(TESTS)
    try:
        code = main([*args, "--out", str(tmp_path / "o")])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-2].startswith(message), err
    assert err[-1].startswith(hint), err
    assert not (tmp_path / "o" / "model.graphopt").exists()


def test_corrupt_saved_file_is_an_error_in_a_subprocess(tmp_path):
    bad = tmp_path / "broken.graphopt"
    bad.write_bytes(b"PK\x03\x04 this is not a torch.save archive")
    proc = _run("optimize", str(bad), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-2] == (f"graphopt: error: {bad}: not a readable graphopt file (no torch.save archive); "
                         "it is corrupt, truncated or not written by graphopt.save")
    assert lines[-1] == "hint: write the file again with `graphopt optimize ... --out DIR` or graphopt.save"


def test_passes_lists_registered_passes_with_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in graphopt.registered_passes():
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert "prune-channels" in out and "ratio = 0.5" in out


def test_console_script_and_module_entry_points():
    script = Path(sys.executable).with_name("graphopt")
    for cmd in ([str(script), "passes"], [sys.executable, "-m", "graphopt", "passes"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        assert "remove-identity" in out.stdout


def test_unknown_command_exits_with_code_2():
    with pytest.raises(SystemExit) as info:
        main(["nonsense"])
    assert info.value.code == 2


def test_missing_calibration_data_names_the_flag_not_the_keyword(tmp_path):
    proc = _run("optimize", ZOO_MODEL, "--input-shape", "1,3,32,32", "--passes", "fake-quant",
                "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "--calib" in proc.stderr and "calib_data" not in proc.stderr, proc.stderr
    empty = tmp_path / "empty.pt"
    torch.save(torch.zeros(0, 3, 32, 32), empty)
    proc = _run("optimize", ZOO_MODEL, "--input-shape", "1,3,32,32", "--passes", "fake-quant", "--calib", str(empty),
                "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and f"--calib file '{empty}' holds no inputs" in proc.stderr, proc.stderr
