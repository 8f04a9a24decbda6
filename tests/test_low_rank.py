"""low-rank: truncated-SVD factorization of linear and conv layers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.errors import PipelineError
from graphopt.passes.channel_prune import PruneChannels
from graphopt.passes.low_rank import LowRank
from models import build
from util import assert_same_outputs, outputs, rebatch


def _relative_error(module, case) -> float:
    got, want = outputs(module, case.example_inputs), outputs(case.model, case.example_inputs)
    return max(float((g - w).norm() / w.norm()) for g, w in zip(got, want) if w.is_floating_point())


@pytest.mark.parametrize("name", ["mlp", "vit", "hf_llama", "hf_gpt2", "resnet_basic"])
def test_full_energy_reproduces_outputs(name):
    """energy=1.0 keeps the numerical rank: forced to factorize every layer (linear, GPT-2's addmm, conv), the
    outputs are the original's; left to its default, it factorizes nothing on full-rank weights (no MAC saving)."""
    case = build(name)
    forced = graphopt.optimize(case.model, [LowRank(energy=1.0, require_savings=False)], case.example_inputs)
    stats = forced.report.records[0].stats
    assert stats["factorized"] > 0 and all(x["rank"] == x["full_rank"] for x in stats["layers"])
    assert_same_outputs(forced.module, case.model, case.example_inputs, rtol=1e-4, atol=1e-4)
    assert_same_outputs(forced.module, case.model, rebatch(case.example_inputs, 3), rtol=1e-4, atol=1e-4)
    default = graphopt.optimize(case.model, [LowRank(energy=1.0)], case.example_inputs)
    assert not default.report.records[0].modified


class LowRankLinear(nn.Module):
    """A 64x64 layer whose weight has rank 8 between two ordinary layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.mid, self.b = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)
        with torch.no_grad():
            self.mid.weight.copy_(torch.randn(64, 8) @ torch.randn(8, 64) / 8)

    def forward(self, x):
        return self.b(torch.relu(self.mid(torch.relu(self.a(x)))))


def test_full_energy_factorizes_a_rank_deficient_layer_exactly():
    model, x = LowRankLinear(), (torch.randn(4, 16),)
    result = graphopt.optimize(model, [LowRank(energy=1.0)], x)
    record = result.report.records[0]
    assert [(s["layer"], s["rank"]) for s in record.stats["layers"]] == [("mid", 8)]
    assert record.macs_before - record.macs_after == 4 * (64 * 64 - 8 * 128)
    assert_same_outputs(result.module, model, x, rtol=1e-4, atol=1e-5)
    torch.testing.FileCheck().check("linear").check("low_rank_0").check("linear").check("low_rank_1").run(
        result.module.code)


@pytest.mark.parametrize("name", ["mlp", "resnet_basic"])
def test_error_grows_and_macs_drop_as_energy_is_cut(name):
    case = build(name)
    traced = graphopt.trace(case.model, case.example_inputs)  # once; each energy runs on a copy
    errors, macs = [], []
    for energy in (1.0, 0.9, 0.75, 0.6, 0.5):
        gm, report = graphopt.PassManager([LowRank(energy=energy)]).run(
            copy.deepcopy(traced), graphopt.Context(case.example_inputs))
        errors.append(_relative_error(gm, case))
        macs.append(report.records[0].macs_after)
    assert errors[0] < 1e-6 and errors[-1] > 0.1
    assert errors == sorted(errors), errors
    assert macs == sorted(macs, reverse=True) and macs[-1] < 0.7 * macs[0], macs


def test_rank_ratio_and_per_layer_stats():
    case = build("vit")
    result = graphopt.optimize(case.model, [LowRank(rank_ratio=0.25, round_to=4)], case.example_inputs)
    record = result.report.records[0]
    layers = record.stats["layers"]
    assert layers and all(x["rank"] % 4 == 0 and x["rank"] >= 0.25 * x["full_rank"] for x in layers)
    assert all(x["macs_after"] < x["macs_before"] for x in layers)
    # the per-layer MAC change is the whole model's change
    assert sum(x["macs_before"] - x["macs_after"] for x in layers) == record.macs_before - record.macs_after
    assert "head" in {x["layer"] for x in layers} or "head" in record.stats["skipped_layers"]


def test_second_run_changes_nothing_and_ignore_and_shared_weights_are_respected():
    case = build("mlp")
    result = graphopt.optimize(case.model, [LowRank(rank_ratio=0.25, ignore=("0",)), LowRank(rank_ratio=0.25)],
                               case.example_inputs)
    first, second = result.report.records
    assert first.stats["skipped_layers"]["0"] == "ignored" and "0" not in {x["layer"] for x in first.stats["layers"]}
    assert [x["layer"] for x in second.stats["layers"]] == ["0"]  # only the layer left alone before

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    tied = graphopt.optimize(Tied(), [LowRank(rank_ratio=0.1)], (torch.randn(2, 64),))
    assert tied.report.records[0].stats["skipped_layers"] == {"fc": "weight shared with another layer"}


@pytest.mark.parametrize("passes", [
    [LowRank(rank_ratio=0.25), PruneChannels(ratio=0.5), "fuse"],
    ["fuse", PruneChannels(ratio=0.5), LowRank(rank_ratio=0.25)],
])
def test_composes_with_channel_pruning_and_fusion(passes):
    case = build("resnet_basic")
    result = graphopt.optimize(case.model, passes, case.example_inputs)
    assert all(r.modified for r in result.report.records)
    assert result.report.records[-1].macs_after < 0.5 * result.report.records[0].macs_before
    assert outputs(result.module, rebatch(case.example_inputs, 3))[0].shape == (3, 10)


def test_low_rank_then_fuse_preserves_outputs():
    """Fusion after factorization folds each BN into the 1x1 conv that now feeds it."""
    case = build("resnet_basic")
    factored = graphopt.optimize(case.model, [LowRank(energy=1.0, require_savings=False)], case.example_inputs)
    fused = graphopt.optimize(case.model, [LowRank(energy=1.0, require_savings=False), "fuse"], case.example_inputs)
    batch_norms = sum(isinstance(m, nn.BatchNorm2d) for m in case.model.modules())
    assert fused.report.records[1].stats["fused"] == batch_norms  # each BN now follows a factorized 1x1 conv
    assert_same_outputs(fused.module, factored.module, case.example_inputs, rtol=1e-4, atol=1e-4)


def test_bad_options():
    with pytest.raises(PipelineError, match=r"low-rank: energy must be in \(0, 1\], got 0"):
        LowRank(energy=0)
    with pytest.raises(PipelineError, match=r"low-rank: rank_ratio must be in \[0, 1\]"):
        graphopt.parse_pipeline("low-rank:rank_ratio=2")
