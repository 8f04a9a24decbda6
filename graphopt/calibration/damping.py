"""Inverting a calibration Hessian that is singular more often than not (fewer rows than features, duplicate
or constant channels, dead inputs): relative diagonal damping, escalated until the factorization holds."""

from __future__ import annotations

from typing import NamedTuple

import torch

from graphopt.errors import InputError

__all__ = ["CholeskyInverse", "damped_cholesky_inverse"]


class CholeskyInverse(NamedTuple):
    """``upper``: upper Cholesky factor U of (H + damping·I)^-1, i.e. U^T U = (H + damping·I)^-1, float64.
    Row j of U is the row of the inverse Hessian of columns j: (with columns < j frozen), scaled by
    1/sqrt of its diagonal: the quantity SparseGPT needs for every column in turn. ``dead``: bool (in,), the
    columns whose input was always zero (diag 0); they carry no signal, so their weights are removable for free.
    ``damping``: the absolute amount actually added to the diagonal."""

    upper: torch.Tensor
    dead: torch.Tensor
    damping: float


def damped_cholesky_inverse(h: torch.Tensor, percdamp: float = 0.01, *, layer: str = "weight",
                            retries: int = 4) -> CholeskyInverse:
    """Factor the inverse of the Hessian ``h`` (in, in) after damping, as SparseGPT/GPTQ do.

    Dead columns (diag 0) get a unit diagonal so they do not make ``h`` singular. Then ``percdamp`` times the
    mean diagonal of the live columns is added to the whole diagonal; if a Cholesky factorization still fails
    (rounding in a near-singular ``h``), the damping is multiplied by 10 (from 1e-8 of the mean diagonal when
    ``percdamp`` is 0), up to ``retries`` times. Works in
    float64 whatever ``h``'s dtype: this O(in^3) step is done once per layer and sets the accuracy of all that
    follows. Raises ``InputError`` naming ``layer`` for a non-square or non-finite ``h`` and when no damping works.
    """
    if not isinstance(h, torch.Tensor) or h.dim() != 2 or h.shape[0] != h.shape[1]:
        got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise InputError(f"layer {layer!r}: the Hessian must be a square matrix, got {got}")
    if not percdamp >= 0:
        raise InputError(f"layer {layer!r}: damp must be >= 0, got {percdamp!r}")
    if not torch.isfinite(h.sum(dtype=torch.float64)):  # a NaN/inf anywhere reaches the sum; no (in, in) bool copy
        raise InputError(f"layer {layer!r}: the calibration Hessian contains NaN or inf: the layer's inputs "
                         "overflowed or were NaN on the calibration data; check the model on that data "
                         "(fp16 overflow?) or gather the statistics in float32")
    h = h.detach().to(torch.float64).clone()
    diag = h.diagonal()
    if (diag < 0).any():
        raise InputError(f"layer {layer!r}: the Hessian has a negative diagonal entry, so it is no Gram matrix "
                         "X^T X; pass the statistics InputStatistics gathered")
    dead = diag == 0
    h[dead, :], h[:, dead] = 0.0, 0.0  # a dead input's row/col is zero in exact arithmetic; make it so
    diag[dead] = 1.0
    live = diag[~dead]
    damping = percdamp * (live.mean().item() if live.numel() else 1.0)
    for _ in range(retries + 1):
        upper, tried = _inverse_upper(h, damping), damping
        if upper is not None:
            return CholeskyInverse(upper, dead, damping)
        # damp=0 asked for no damping at all; escalate from a negligible amount rather than from zero
        damping = damping * 10 if damping > 0 else 1e-8 * (live.mean().item() if live.numel() else 1.0)
    raise InputError(f"layer {layer!r}: the calibration Hessian is not positive definite even with damping "
                     f"{tried:.3g} added to its diagonal ({retries} escalations of damp={percdamp}); "
                     "give more or more varied calibration data (at least as many rows as the layer has "
                     "inputs) or a larger damp")


def _inverse_upper(h: torch.Tensor, damping: float) -> torch.Tensor | None:
    """U with U^T U = (h + damping·I)^-1, or None when either factorization fails."""
    damped = h.clone()
    damped.diagonal().add_(damping)
    lower, info = torch.linalg.cholesky_ex(damped)
    if info.item() != 0:
        return None
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    return upper if info.item() == 0 and torch.isfinite(upper.sum()) else None
