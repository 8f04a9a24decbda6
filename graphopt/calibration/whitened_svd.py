"""Data-aware low-rank factorization: the rank-r weight whose outputs on the calibration data are closest to the
layer's own (the truncation SVD-LLM and ASVD aim at), instead of the rank-r weight closest in weight space.

With X the calibration rows and H = X^T X (+ damping), ||X (W - M)^T||² = ||(W - M) L||² for the Cholesky factor
H = L L^T, so the best rank-r M is the truncated SVD of W L, mapped back by L^-1:

    W L = U S V^T,    M = (U_r S_r^1/2) (S_r^1/2 V_r^T L^-1)

Its singular values measure output energy: sum(s_i²) = ||X W^T||² on the calibration data, so "keep 99% of the
energy" keeps 99% of the layer's output energy, not of its weights'. Plain SVD is the case H = I.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphopt.calibration._checks import check_weight
from graphopt.errors import InputError

__all__ = ["WhitenedSVD", "whitened_svd"]


@dataclass(frozen=True)
class WhitenedSVD:
    """U, S, V^T of W L and the Cholesky factor L of the damped Hessian (all float64); ``damping`` is what was
    added to the diagonal. ``factors(r)`` gives the two layers."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    lower: torch.Tensor
    damping: float

    def factors(self, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(first (rank, in), second (out, rank)) with second @ first the best rank-``rank`` weight."""
        root = self.s[:rank].sqrt()
        scaled = root[:, None] * self.vh[:rank]
        first = torch.linalg.solve_triangular(self.lower, scaled, upper=False, left=False)  # scaled @ L^-1
        return first.to(dtype), (self.u[:, :rank] * root[None, :]).to(dtype)


def whitened_svd(weight: torch.Tensor, xtx: torch.Tensor, *, damp: float = 0.01, layer: str = "weight",
                 retries: int = 4) -> WhitenedSVD:
    """Factor ``weight`` (out, in) against the raw input Gram ``xtx`` (in, in) = Σ x x^T of its calibration rows.

    ``damp`` times the mean diagonal is added to the diagonal (a ridge towards plain SVD, and what makes inputs
    that never vary harmless); if the Cholesky factorization still fails it is raised tenfold, ``retries`` times,
    then ``InputError`` names ``layer``. Works in float64."""
    check_weight(weight, layer)
    width = weight.shape[1]
    if not isinstance(xtx, torch.Tensor) or tuple(xtx.shape) != (width, width):
        got = tuple(xtx.shape) if isinstance(xtx, torch.Tensor) else type(xtx).__name__
        raise InputError(f"layer {layer!r}: the input Gram matrix must be ({width}, {width}) for a weight of shape "
                         f"{tuple(weight.shape)}, got {got}; gather it on this layer's input")
    if not damp >= 0:
        raise InputError(f"layer {layer!r}: damp must be >= 0, got {damp!r}")
    h = xtx.detach().to(torch.float64)
    if not torch.isfinite(h.sum()):
        raise InputError(f"layer {layer!r}: the calibration Gram matrix contains NaN or inf: the layer's inputs "
                         "overflowed or were NaN on the calibration data; check the model on that data")
    scale = h.diagonal().mean().item() or 1.0
    damping = damp * scale
    for _ in range(retries + 1):
        damped = h.clone()
        damped.diagonal().add_(damping)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64) @ lower, full_matrices=False)
            return WhitenedSVD(u, s, vh, lower, damping)
        damping = damping * 10 if damping > 0 else 1e-8 * scale
    raise InputError(f"layer {layer!r}: the calibration Gram matrix is not positive definite even with "
                     f"{damping / 10:.3g} added to its diagonal; give more calibration data or a larger damp")
