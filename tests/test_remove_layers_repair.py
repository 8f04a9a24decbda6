"""remove-layers:repair=true: the layers right after removed blocks are refit to the original model's outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.calibration.cross_refit import CrossStatistics, refit_to_original
from graphopt.errors import MissingDataError
from models import build


def test_refit_to_original_undoes_a_linear_change_of_inputs_exactly():
    """z = x A: the refit weight is W A^-1, and the intercept absorbs a shift; with z = x nothing changes."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, dtype=torch.float64, generator=gen)
    a = torch.randn(6, 6, dtype=torch.float64, generator=gen) + 3 * torch.eye(6, dtype=torch.float64)
    w, b = torch.randn(4, 6, dtype=torch.float64, generator=gen), torch.randn(4, dtype=torch.float64, generator=gen)
    shift = torch.randn(6, dtype=torch.float64, generator=gen)
    stats = CrossStatistics(6)
    stats.add(x @ a + shift, x)
    new, new_b = refit_to_original(w, b, stats, damp=0.0)
    torch.testing.assert_close((x @ a + shift) @ new.T + new_b, x @ w.T + b)
    torch.testing.assert_close(new, w @ torch.linalg.inv(a).T)  # x = (z - shift) A^-1
    same = CrossStatistics(6)
    same.add(x, x)
    unchanged, none = refit_to_original(w, None, same, damp=0.05)
    torch.testing.assert_close(unchanged, w)
    assert none is None


class ResidualMLP(nn.Module):
    """Four residual blocks x + fc2(relu(fc1(x))) and a head."""

    def __init__(self, width: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, width))
                                    for _ in range(4))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _error(module, model, x) -> float:
    with torch.no_grad():
        return float((module(x) - model(x)).norm() / model(x).norm())


@pytest.mark.parametrize("removed, refit, gain", [("blocks.1", "blocks.2.0", 1.0), ("blocks.3", "head", 0.5)])
def test_repair_refits_the_layer_after_and_does_not_hurt_on_held_out_data(removed, refit, gain):
    """The first layer after the removed block is the one refit (the next block's fc1, or the head after the
    last block). Refitting the head fixes the outputs directly: the error at least halves; a middle block's
    successor can only reshape what that block adds, so there it must not hurt."""
    model = ResidualMLP().eval()
    calib = [(torch.randn(64, 32, generator=torch.Generator().manual_seed(s)),) for s in range(4)]
    held_out = torch.randn(256, 32, generator=torch.Generator().manual_seed(9))
    spec = f"remove-layers:blocks=[{removed}]"
    plain = graphopt.optimize(model, [spec], example_inputs=calib[0])
    repaired = graphopt.optimize(model, [spec + ",repair=true"], example_inputs=calib[0], calib_data=calib)
    record = repaired.report.records[0]
    assert record.stats["layers_refit"] == 1
    assert record.decisions[refit] == "refit to the original model's outputs on 256 input rows, bias included"
    assert sum(p.numel() for p in repaired.module.parameters()) == sum(p.numel() for p in plain.module.parameters())
    assert _error(repaired.module, model, held_out) <= gain * _error(plain.module, model, held_out)
    torch.testing.assert_close(model.head.weight, ResidualMLP().head.weight)  # the user's model is untouched


def test_repair_after_the_last_layer_refits_the_lm_head_and_the_model_still_generates():
    case = build("hf_llama")
    ids = case.example_inputs[0] if isinstance(case.example_inputs, tuple) else case.example_inputs["input_ids"]
    calib = [{"input_ids": torch.randint(0, case.model.config.vocab_size, tuple(ids.shape),
                                         generator=torch.Generator().manual_seed(s)),
              "attention_mask": torch.ones(tuple(ids.shape), dtype=torch.long)} for s in range(3)]
    last = f"model.layers.{case.model.config.num_hidden_layers - 1}"
    result = graphopt.optimize(case.model, [f"remove-layers:blocks=[{last}],repair=true"],
                               example_inputs=case.example_inputs, calib_data=calib)
    assert "lm_head" in result.report.records[0].decisions
    model = result.to_model()
    out = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_repair_needs_calibration_data():
    with pytest.raises(MissingDataError, match="remove-layers needs calibration data for repair=true"):
        graphopt.optimize(ResidualMLP().eval(), ["remove-layers:blocks=[blocks.1],repair=true"],
                          example_inputs=(torch.randn(2, 32),))
