"""fuse, dce and remove-identity: outputs preserved on every zoo model, idempotent, and doing real work."""

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import Context, PassManager
from graphopt.pipeline.metrics import count_params
from models import CNN_NAMES, NAMES, build
from util import assert_same_outputs, rebatch

FIRST_PASSES = ["remove-identity", "fuse", "dce"]


@pytest.mark.parametrize("name", NAMES)
def test_first_passes_keep_outputs_and_are_idempotent(name):
    case = build(name)
    res = graphopt.optimize(case.model, FIRST_PASSES, case.example_inputs)
    assert_same_outputs(res.module, case.model, case.example_inputs)
    assert_same_outputs(res.module, case.model, rebatch(case.example_inputs, 3))
    _, again = PassManager(FIRST_PASSES).run(res.module, Context(case.example_inputs))
    assert [r.modified for r in again.records] == [False, False, False]


@pytest.mark.parametrize("name", [n for n in CNN_NAMES if "bn" in build(n).tags] + ["mlp"])
def test_fuse_removes_every_batch_norm_that_follows_a_single_use_layer(name):
    case = build(name)
    res = graphopt.optimize(case.model, ["fuse"], case.example_inputs)
    record = res.report.records[0]
    bns = [m for m in case.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    left = res.module.code.count("aten.batch_norm")
    assert record.stats["fused"] + left == len(bns)
    assert record.stats["fused"] >= 1
    assert record.params_after < record.params_before
    if name != "densenet":  # DenseNet's BNs follow concats (pre-activation), not convs
        assert left == 0, res.module.code
    frozen = [n for n, p in res.module.named_parameters() if not p.requires_grad]
    assert not frozen, f"folded parameters must stay trainable: {frozen[:3]}"


def _conv_bn(conv, bn_dims, x, bn_features):
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[bn_dims](bn_features)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return nn.Sequential(conv, bn).eval(), x


@pytest.mark.parametrize("model, x", [
    _conv_bn(nn.Conv1d(4, 6, 3), 1, torch.randn(2, 4, 10), 6),
    _conv_bn(nn.Conv2d(4, 6, 3, groups=2, bias=False), 2, torch.randn(2, 4, 8, 8), 6),
    _conv_bn(nn.Conv3d(2, 4, 3), 3, torch.randn(2, 2, 5, 5, 5), 4),
    _conv_bn(nn.ConvTranspose2d(4, 6, 3, stride=2), 2, torch.randn(2, 4, 5, 5), 6),
    _conv_bn(nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), 2, torch.randn(2, 4, 5, 5), 6),
    _conv_bn(nn.ConvTranspose1d(4, 4, 3, groups=4), 1, torch.randn(2, 4, 7), 4),
    _conv_bn(nn.Linear(5, 6), 1, torch.randn(3, 5), 6),
], ids=["conv1d", "conv2d-grouped-nobias", "conv3d", "convT2d", "convT2d-grouped-nobias", "convT1d-depthwise",
        "linear-bn1d"])
def test_fuse_folds_each_layer_kind_exactly(model, x):
    res = graphopt.optimize(model, ["fuse"], (x,))
    assert res.report.records[0].stats["fused"] == 1
    torch.testing.FileCheck().check_not("batch_norm").run(res.module.code)
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-5)


class SharedConvOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_fuse_skips_and_reports_a_conv_with_other_users():
    model, x = SharedConvOutput().eval(), torch.randn(2, 3, 8, 8)
    res = graphopt.optimize(model, ["fuse"], (x,))
    stats = res.report.records[0].stats
    assert stats["fused"] == 0 and not res.report.records[0].modified
    assert stats["skipped_layers"] == {"conv": "output has 2 users, folding would change the others"}
    torch.testing.FileCheck().check("batch_norm").run(res.module.code)


def test_fuse_leaves_linear_bn1d_over_sequences_alone():
    model = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(4)).eval()  # BN normalizes dim 1 = the 4 positions
    x = torch.randn(2, 4, 5)
    res = graphopt.optimize(model, ["fuse"], (x,))
    assert "2-D outputs" in res.report.records[0].stats["skipped_layers"]["0"]
    torch.testing.assert_close(res.module(x), model(x))


def test_remove_identity_drops_eval_dropout():
    case = build("vgg")
    res = graphopt.optimize(case.model, ["remove-identity"], case.example_inputs)
    assert res.report.records[0].stats["dropout"] >= 1
    torch.testing.FileCheck().check_not("dropout").run(res.module.code)


def test_remove_identity_drops_no_op_conversions_in_hf_graphs():
    case = build("hf_llama")
    traced = graphopt.trace(case.model, case.example_inputs)
    res = graphopt.optimize(case.model, ["remove-identity"], case.example_inputs)
    assert res.report.records[0].stats.get("to", 0) >= 1
    assert res.module.code.count("aten.to.") < traced.code.count("aten.to.")


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)
        self.register_buffer("stale", torch.zeros(3))

    def forward(self, x):
        return self.fc(x)


def test_dce_removes_unread_parameters_and_buffers():
    res = graphopt.optimize(WithUnused(), ["dce"], (torch.randn(2, 4),))
    record = res.report.records[0]
    assert (record.params_before, record.params_after) == (40, 20)
    assert {"unused.weight", "unused.bias", "stale"} <= set(record.stats["removed_attrs"])
    assert count_params(res.module) == 20
