"""low-rank:whiten=true: factorization against the layer's calibration inputs (the best rank-r outputs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.calibration.whitened_svd import whitened_svd
from graphopt.errors import InputError, MissingDataError
from graphopt.passes.low_rank import LowRank


def _correlated_inputs(rows: int, width: int, seed: int) -> torch.Tensor:
    """Inputs that live mostly in an 8-dimensional subspace, with very different scales per direction."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(width, width, generator=torch.Generator().manual_seed(99)))[0]
    scales = torch.cat([torch.logspace(1, 0, 8), torch.full((width - 8,), 0.01)])
    return (torch.randn(rows, width, generator=gen, dtype=torch.float64) * scales.double()) @ basis.double().T


def test_whitened_svd_reaches_the_best_rank_r_outputs():
    """Against an independent solve (QR of X instead of a Cholesky factor of X^T X): the same rank-r weight, an
    output error equal to the discarded singular values, and below plain SVD's error."""
    x = _correlated_inputs(400, 24, seed=0)
    w = torch.randn(16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rank = 4
    svd = whitened_svd(w, x.T @ x, damp=0.0)
    first, second = svd.factors(rank, torch.float64)
    ours = second @ first
    r = torch.linalg.qr(x, mode="r")[1]  # X = QR: ||X (W - M)^T|| = ||(W - M) R^T||
    u, s, vh = torch.linalg.svd(w @ r.T)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(r.T)
    torch.testing.assert_close(ours, best, rtol=1e-6, atol=1e-8)
    error = (x @ (w - ours).T).square().sum()
    torch.testing.assert_close(error, svd.s[rank:].square().sum(), rtol=1e-6, atol=1e-10)
    u, s, vh = torch.linalg.svd(w)
    plain = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert error < 0.5 * (x @ (w - plain).T).square().sum()


class TwoLayers(nn.Module):
    """Two 48-wide layers; the inputs the model sees are nearly 8-dimensional."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(48, 48), nn.Linear(48, 48)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _relative_error(module, model, x) -> float:
    with torch.no_grad():
        return float((module(x) - model(x)).norm() / model(x).norm())


def test_whiten_cuts_the_output_error_of_the_same_ranks_on_held_out_data():
    model = TwoLayers().eval()
    calib = [(_correlated_inputs(64, 48, seed=s).float(),) for s in range(4)]
    held_out = _correlated_inputs(256, 48, seed=10).float()
    plain = graphopt.optimize(model, ["low-rank:rank_ratio=0.25"], example_inputs=calib[0])
    whitened = graphopt.optimize(model, ["low-rank:rank_ratio=0.25,whiten=true"], example_inputs=calib[0],
                                 calib_data=calib)
    ranks = [x["rank"] for x in whitened.report.records[0].stats["layers"]]
    assert ranks == [x["rank"] for x in plain.report.records[0].stats["layers"]] == [12, 12]
    assert sum(p.numel() for p in whitened.module.parameters()) == sum(p.numel() for p in plain.module.parameters())
    assert _relative_error(whitened.module, model, held_out) < 0.3 * _relative_error(plain.module, model, held_out)  # 0.16 vs 0.75 measured
    assert "of the output energy on 256 rows" in whitened.report.records[0].stats["layers"][0]["energy_kept"]
    torch.testing.assert_close(model.fc1.weight, TwoLayers().fc1.weight)  # the user's model is untouched


def test_whiten_energy_counts_output_energy():
    """On inputs of rank ~8 the layer's outputs need few directions: 99.9% of the output energy takes a rank far
    below what 99.9% of the weight's energy takes, and the outputs stay close. (A small damp: the default ridge,
    1% of the mean input energy per input, is energy too, spread over the 40 directions the inputs barely use.)"""
    model = TwoLayers().eval()
    calib = [(_correlated_inputs(64, 48, seed=s).float(),) for s in range(4)]
    whitened = graphopt.optimize(model, ["low-rank:energy=0.999,whiten=true,damp=0.0001"], example_inputs=calib[0],
                                 calib_data=calib)
    plain = graphopt.optimize(model, ["low-rank:energy=0.999,require_savings=false"], example_inputs=calib[0])
    first = whitened.report.records[0].stats["layers"][0]
    assert first["layer"] == "fc1" and first["rank"] <= 10
    assert plain.report.records[0].stats["layers"][0]["rank"] > 30
    assert _relative_error(whitened.module, model, _correlated_inputs(256, 48, seed=10).float()) < 0.05


def test_whiten_needs_calibration_data_and_a_sane_damp():
    model = TwoLayers().eval()
    with pytest.raises(MissingDataError, match="low-rank needs calibration data for whiten=true"):
        graphopt.optimize(model, ["low-rank:whiten=true"], example_inputs=(torch.randn(2, 48),))
    with pytest.raises(Exception, match="damp must be >= 0"):
        LowRank(whiten=True, damp=-1.0)
    with pytest.raises(InputError, match="'fc1'.*not positive definite"):
        whitened_svd(torch.randn(4, 3), -torch.eye(3), damp=0.0, layer="fc1")
