"""Refit a layer to reproduce the original model's outputs from the compressed model's inputs.

After blocks are removed, the layers right after them see different inputs Z (from the compressed model) than
the inputs X they had in the original model, on the same calibration rows. The repair solves

    min over W', b'   Σ_i ||W' z_i + b' − (W x_i + b)||² + λ ||W' − W||²

which needs only the cross sums Z^T Z, Z^T X, Σz, Σx and the row count (``CrossStatistics``), summed over ranks
like every other statistic. With a bias the intercept is free: b' = b + W x̄ − W' z̄ and W' solves the centred
equations (S_zz + λI) W'^T = (S_zx + λI) W^T; without one, the raw sums. λ = damp · mean diag of the matrix
solved, shrinking towards the old weights: when Z = X the refit returns the layer unchanged.
"""

from __future__ import annotations

import torch

from graphopt.calibration._checks import check_weight
from graphopt.errors import InputError

__all__ = ["CrossStatistics", "refit_to_original"]


class CrossStatistics:
    """Streaming sums of paired rows: z (the compressed model's input to a layer), x (the original model's)."""

    def __init__(self, width: int, *, layer: str = "weight"):
        self.width, self.layer = width, layer
        self.zz = torch.zeros(width, width, dtype=torch.float64)
        self.zx = torch.zeros(width, width, dtype=torch.float64)
        self.z_sum = torch.zeros(width, dtype=torch.float64)
        self.x_sum = torch.zeros(width, dtype=torch.float64)
        self.count = 0

    def add(self, z: torch.Tensor, x: torch.Tensor) -> None:
        """Add paired rows (n, width): row i of ``z`` and row i of ``x`` come from the same calibration token."""
        if z.shape != x.shape or z.dim() != 2 or z.shape[1] != self.width:
            raise InputError(f"layer {self.layer!r}: paired inputs must both be (rows, {self.width}), got "
                             f"{tuple(z.shape)} and {tuple(x.shape)}: the original and compressed models saw "
                             "different batches")
        z, x = z.detach().to(torch.float64), x.detach().to(torch.float64)
        self.zz += z.T @ z
        self.zx += z.T @ x
        self.z_sum += z.sum(0)
        self.x_sum += x.sum(0)
        self.count += z.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        """The sums as tensors (for a distributed all-reduce), the count last."""
        return [self.zz, self.zx, self.z_sum, self.x_sum, torch.tensor([float(self.count)], dtype=torch.float64)]

    def load(self, tensors: list[torch.Tensor]) -> "CrossStatistics":
        """Take summed ``tensors()`` back (in place); returns self."""
        self.zz, self.zx, self.z_sum, self.x_sum, count = tensors
        self.count = int(count.item())
        return self


def refit_to_original(weight: torch.Tensor, bias: torch.Tensor | None, stats: CrossStatistics, *,
                      damp: float = 0.01, layer: str = "weight") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(new_weight, new_bias)`` in ``weight``'s dtype (``None`` bias stays ``None``); see the module docstring."""
    check_weight(weight, layer)
    if weight.shape[1] != stats.width:
        raise InputError(f"layer {layer!r}: statistics of width {stats.width} for a weight of shape "
                         f"{tuple(weight.shape)}")
    if stats.count == 0:
        raise InputError(f"layer {layer!r}: no calibration rows reached this layer")
    if not all(torch.isfinite(t.sum()) for t in stats.tensors()):
        raise InputError(f"layer {layer!r}: the calibration inputs contain NaN or inf; check the model on that data")
    w = weight.detach().to(torch.float64)
    a, c = stats.zz, stats.zx
    if bias is not None:
        z_mean, x_mean = stats.z_sum / stats.count, stats.x_sum / stats.count
        a = a - stats.count * torch.outer(z_mean, z_mean)
        c = c - stats.count * torch.outer(z_mean, x_mean)
    lam = damp * max(a.diagonal().mean().item(), 0.0)
    eye = torch.eye(stats.width, dtype=torch.float64)
    system = a + lam * eye
    lower, info = torch.linalg.cholesky_ex(system)
    if info.item() != 0:
        raise InputError(f"layer {layer!r}: the refit's normal equations are singular (damp={damp}); give more "
                         "or more varied calibration data, or a larger damp")
    new = torch.cholesky_solve((c + lam * eye) @ w.T, lower).T
    new_bias = None
    if bias is not None:
        new_bias = (bias.detach().to(torch.float64) + w @ x_mean - new @ z_mean).to(bias.dtype)
    return new.to(weight.dtype), new_bias
