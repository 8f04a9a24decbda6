"""activation-sparsity: batch-1 Linear layers after ReLU skip the weights of zero inputs."""

from __future__ import annotations

import torch
import torch.nn as nn

import graphopt
from graphopt.passes.activation_sparsity import ActivationSparsity


class ReluMlp(nn.Module):
    """fc1 -> ReLU (shifted: ~85% zeros) -> fc2 (large, a candidate) -> fc3 (dense inputs, not a candidate)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(256, 1024)
        self.fc2 = nn.Linear(1024, 1024)
        self.fc3 = nn.Linear(1024, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x) - 0.6)
        return self.fc3(self.fc2(h))


def test_zero_inputs_are_skipped_and_outputs_match():
    torch.manual_seed(0)
    model = ReluMlp().eval()
    x = torch.randn(1, 256)
    calib = [(torch.randn(1, 256),) for _ in range(3)]
    result = graphopt.optimize(model, [ActivationSparsity()], (x,), calib_data=calib)
    layers = result.report.records[-1].stats["layers"]
    assert layers["fc2"].startswith("act-sparse (") and layers["fc2"].endswith("% zero inputs)")
    assert layers["fc1"].startswith("dense: ") and layers["fc3"].startswith("dense: ")
    code = result.module.code
    assert code.count("graphopt.act_sparse_linear") == 1 and code.count("aten.linear") == 2
    for inputs in (x, torch.randn(1, 256), torch.randn(3, 256)):  # batch 3 runs F.linear inside the op
        torch.testing.assert_close(result.module(inputs), model(inputs), rtol=1e-4, atol=1e-4)


def test_not_applied_at_batch_above_one_and_exports():
    torch.manual_seed(0)
    model = ReluMlp().eval()
    result = graphopt.optimize(model, [ActivationSparsity()], (torch.randn(4, 256),))
    assert result.report.records[-1].stats["layers"]["fc2"] == "dense: 4 rows per call, the kernel is batch-1"
    lowered = graphopt.optimize(model, [ActivationSparsity()], (torch.randn(1, 256),)).module
    x = torch.randn(1, 256)
    exported = torch.export.export(lowered, (x,))
    torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-4, atol=1e-4)
