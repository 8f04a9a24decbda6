"""Wanda (Sun et al., 2023): prune by |weight| times the norm of its input feature, compared within each output
row. No weight update and no Hessian, only per-feature input norms: cheap, and a strong baseline on LLMs."""

from __future__ import annotations

import torch

from graphopt.calibration._checks import check_pattern, check_weight, prune_lowest, prune_lowest_nm, pruned_count
from graphopt.errors import InputError

__all__ = ["wanda_mask"]


def wanda_mask(weight: torch.Tensor, column_norms: torch.Tensor, sparsity: float, *, n: int = 0, m: int = 0,
               layer: str = "weight") -> torch.Tensor:
    """Bool keep mask for ``weight`` (out, in) from the score |W_ij| · ||x_j||_2 (``column_norms``: (in,), e.g.
    ``InputStatistics.column_norms``; any positive scale). Unstructured (``n == m == 0``): each row loses its
    round(sparsity · in) lowest scores (rounded half up). N:M: in every group of m consecutive columns of a row
    the m - n lowest go (``sparsity`` must be 0 or (m - n)/m).
    """
    check_weight(weight, layer)
    rows, cols = weight.shape
    check_pattern(sparsity, n, m, cols, layer)
    if not isinstance(column_norms, torch.Tensor) or tuple(column_norms.shape) != (cols,):
        got = tuple(column_norms.shape) if isinstance(column_norms, torch.Tensor) else type(column_norms).__name__
        raise InputError(f"layer {layer!r}: column_norms must have shape ({cols},) for a weight of shape "
                         f"{(rows, cols)}, got {got}")
    if not torch.isfinite(column_norms).all():
        raise InputError(f"layer {layer!r}: the input norms contain NaN or inf; check the calibration data")
    norms = column_norms.detach().to(weight.device, torch.float64)
    score = weight.detach().abs().to(torch.float64) * norms
    prune = prune_lowest_nm(score, n, m) if m else prune_lowest(score, pruned_count(sparsity, cols))
    return ~prune
