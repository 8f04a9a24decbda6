"""graphopt inside a torch.distributed job: two gloo ranks on the CPU, each with its own data.

tests/distributed_worker.py runs once under torchrun (module fixture, ~20 s) and saves each rank's results;
the tests compare them: the distributed plans and scales are bit-identical on both ranks, the per-rank ones
(``local_only``) are not (so the data really differed), and they match one process that saw all the data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import graphopt
from graphopt.util import distributed
from graphopt.training.loop import finetune

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def torchrun(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc-per-node 2 ARGS`` and fail with its output if it fails."""
    env = {**os.environ, "GRAPHOPT_PROGRESS": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    torchrun([str(ROOT / "tests" / "distributed_worker.py"), str(out)], cwd=ROOT)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def identical(a, b) -> bool:
    """Bit-identical tensors, or containers of them with identical structure."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


def check_synchronized(ranks: list[dict], key: str) -> None:
    """Same on both ranks in the job; different when each rank uses its own data."""
    assert identical(ranks[0]["distributed"][key], ranks[1]["distributed"][key]), f"{key} differs between ranks"
    assert not identical(ranks[0]["local"][key], ranks[1]["local"][key]), f"{key}: the ranks' data did not matter"


def test_taylor_pruning_plan_is_identical_on_both_ranks_and_equals_one_process_on_all_data(ranks):
    check_synchronized(ranks, "taylor")
    dist_state, union = ranks[0]["distributed"]["taylor"], ranks[0]["union"]["taylor"]
    assert identical(dist_state, union)  # same channels kept: the pruned weights are the same slices
    local_shapes = [{k: v.shape for k, v in r["local"]["taylor"].items()} for r in ranks]
    assert local_shapes[0] == local_shapes[1]  # same counts per group, different channels
    assert dist_state["blocks.0.conv1.weight"].shape[0] == 16


@pytest.mark.parametrize("key", ["sparsegpt", "wanda", "recalibrate-bn"])
def test_one_shot_masks_weights_and_batchnorm_statistics_are_identical_on_both_ranks(ranks, key):
    check_synchronized(ranks, key)
    union, dist_state = ranks[0]["union"][key], ranks[0]["distributed"][key]
    masks = [k for k in dist_state if k.endswith(".mask")]
    assert masks or key == "recalibrate-bn"
    assert all(torch.equal(dist_state[k], union[k]) for k in masks)  # the masks one process on all data picks
    for k, v in dist_state.items():  # weights and statistics equal up to the order the ranks' sums were added in
        if v.is_floating_point():
            torch.testing.assert_close(v, union[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("criterion", ["block-influence", "output-error", "angular"])
def test_layer_removal_scores_are_identical_on_both_ranks(ranks, criterion):
    key = f"remove/{criterion}"
    check_synchronized(ranks, key)
    got, union = ranks[0]["distributed"][key], ranks[0]["union"][key]
    assert got["removed"] == union["removed"]
    assert got["scores"] == pytest.approx(union["scores"], rel=1e-9)


def test_ranks_alone_would_remove_different_blocks(ranks):
    """The job's choice is not just any one rank's: alone, the ranks disagree on block-influence."""
    alone = {r["local"]["remove/block-influence"]["removed"].split()[0] for r in ranks}
    assert len(alone) == 2
    assert ranks[0]["distributed"]["remove/block-influence"]["removed"].split()[0] in alone


@pytest.mark.parametrize("observer", ["minmax", "moving-average", "percentile", "mse"])
def test_quantization_scales_are_identical_on_both_ranks(ranks, observer):
    key = f"scales/{observer}"
    check_synchronized(ranks, key)
    got = ranks[0]["distributed"][key]
    assert len(got) >= 10
    if observer == "moving-average":
        return  # the mean of the ranks' moving averages, not one average over all batches in some order
    union = ranks[0]["union"][key]
    for name, (scale, zero_point) in got.items():
        torch.testing.assert_close(scale, union[name][0], rtol=0 if observer == "minmax" else 1e-6, atol=0)
        assert torch.equal(zero_point, union[name][1])


def test_moving_average_scales_lie_between_the_ranks_own(ranks):
    got = ranks[0]["distributed"]["scales/moving-average"]
    own = [r["local"]["scales/moving-average"] for r in ranks]
    activations = [n for n, (s, _) in got.items() if s.numel() == 1 and "weight" not in n]
    assert activations
    for name in activations:
        low, high = sorted(float(o[name][0]) for o in own)
        assert low - 1e-7 <= float(got[name][0]) <= high + 1e-7


def test_mixed_precision_sensitivity_is_identical_on_both_ranks(ranks):
    check_synchronized(ranks, "sensitivity")
    (ranking, kept), (union, union_kept) = ranks[0]["distributed"]["sensitivity"], ranks[0]["union"]["sensitivity"]
    assert kept == union_kept
    assert dict(ranking) == pytest.approx(dict(union), abs=0.011)  # rounded to 0.01 dB


def test_activation_zero_fractions_count_every_ranks_inputs(ranks):
    check_synchronized(ranks, "zeros")
    assert ranks[0]["distributed"]["zeros"] == pytest.approx(ranks[0]["union"]["zeros"], rel=1e-12)
    assert 0.3 < ranks[0]["distributed"]["zeros"][1] < 0.7  # the Linear after the ReLU


def test_ddp_fine_tuning_keeps_parameters_equal_with_uneven_batches(ranks):
    assert identical(ranks[0]["ddp"], ranks[1]["ddp"])
    assert not identical(ranks[0]["ddp"], ranks[0]["pruned_before"])
    assert ranks[0]["ddp_losses"] == ranks[1]["ddp_losses"]  # means over both ranks' batches
    assert all(loss == loss and loss > 0 for loss in ranks[0]["ddp_losses"])


def test_a_ddp_step_equals_one_process_stepping_on_both_ranks_batches(ranks):
    assert identical(ranks[0]["ddp_step"], ranks[1]["ddp_step"])
    # finetune steps with Adam, whose first update is lr * g / (|g| + eps): on a parameter whose gradient is at the
    # rounding level (a dead ReLU channel's bias), DDP's all-reduced mean and the big batch's mean differ in their
    # last bits and the step follows them. So the tolerance is 1% of the step (lr=1e-2), not float32 epsilon, and
    # nearly every element still has to agree to float precision.
    close = total = 0
    for name, value in ranks[0]["single_step"].items():
        torch.testing.assert_close(ranks[0]["ddp_step"][name], value, rtol=1e-5, atol=1e-4)
        close += torch.isclose(ranks[0]["ddp_step"][name], value, rtol=1e-5, atol=1e-6).sum().item()
        total += value.numel()
    assert close >= 0.99 * total


def test_ddp_fine_tuning_of_a_layer_removed_model_keeps_ranks_equal(ranks):
    assert identical(ranks[0]["removed"], ranks[1]["removed"])
    assert not identical(ranks[0]["removed"], ranks[0]["removed_before"])
    assert len(ranks[0]["removed"]) < len(ranks[0]["pruned_before"])  # one residual block's tensors are gone


def test_qat_under_ddp_keeps_weights_scales_and_batchnorm_statistics_equal(ranks):
    assert identical(ranks[0]["qat"], ranks[1]["qat"])
    before, after = ranks[0]["qat_before"], ranks[0]["qat"]
    learned = [k for k in after if k.endswith(".scale")]
    assert learned and any(not torch.equal(before[k], after[k]) for k in learned)
    stats = [k for k in after if "running_mean" in k or k.endswith("running_var") or "_mean" in k]
    assert any(not torch.equal(before[k], after[k]) for k in stats if k in before)
    assert identical(ranks[0]["qat_output"], ranks[1]["qat_output"])


def test_fsdp2_fine_tuning_on_cpu_keeps_ranks_equal(ranks):
    assert identical(ranks[0]["fsdp"], ranks[1]["fsdp"])
    assert not identical(ranks[0]["fsdp"], ranks[0]["pruned_before"])


def test_ranks_with_different_weights_are_refused_by_name(ranks):
    for r in ranks:
        assert "hold different values of `blocks.1.conv2.weight`" in r["mismatch"]
        assert "same weights" in r["mismatch"]


def test_cli_under_torchrun_splits_the_data_and_writes_once(tmp_path):
    gen = torch.Generator().manual_seed(0)
    torch.save(torch.randn(32, 3, 32, 32, generator=gen), tmp_path / "calib.pt")
    for r in range(2):  # one fine-tuning file per rank
        torch.save({"inputs": torch.randn(16, 3, 32, 32, generator=gen),
                    "targets": torch.randint(0, 10, (16,), generator=gen)}, tmp_path / f"train-{r}.pt")
    proc = torchrun(["-m", "graphopt", "optimize", "graphopt.examples.models:example_model", "--input-shape", "1,3,32,32",
                     "--passes", "prune-channels:ratio=0.5,importance=taylor,fake-quant", "--calib", "calib.pt",
                     "--finetune", "train-{rank}.pt", "--epochs", "1", "--no-onnx", "--out", "out"], cwd=tmp_path)
    assert "2 ranks: statistics and fine-tuning gradients are combined" in proc.stderr
    assert proc.stdout.count("prune-channels") == 1  # rank 0 alone prints the report
    loaded = graphopt.load(tmp_path / "out" / "model.graphopt")
    assert loaded.module(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert "calib_batches=2" in proc.stdout  # 4 batches of 8 split between 2 ranks


def test_readme_training_script_runs_under_torchrun(tmp_path):
    """The README's train_distributed.py, run as the README says (test_readme runs it as one process)."""
    from test_readme import README, python_blocks

    script = next(b for b in python_blocks(README.read_text()) if b.startswith("# train_distributed.py"))
    (tmp_path / "train_distributed.py").write_text(script)
    proc = torchrun(["train_distributed.py"], cwd=tmp_path)
    assert proc.stdout.count("parameters, fine-tune loss") == 1  # rank 0 prints


def test_without_a_process_group_everything_is_local():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    t = [torch.ones(3)]
    assert distributed.sum_tensors(t)[0] is t[0]
    assert distributed.sum_numbers([1.5, 2]) == [1.5, 2.0]
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]


def test_finetune_distributed_true_without_a_process_group_says_how_to_start_one():
    model = torch.nn.Linear(4, 2)
    with pytest.raises(graphopt.InputError, match="distributed=True needs an initialized torch.distributed "
                                                  "process group.*torchrun"):
        finetune(model, (torch.randn(8, 4), torch.randint(0, 2, (8,))), epochs=1, lr=0.1, distributed=True)
