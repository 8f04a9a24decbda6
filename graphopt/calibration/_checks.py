"""Argument checks and mask selection shared by the solvers (SparseGPT, Wanda): one wording for one mistake."""

from __future__ import annotations

import math

import torch

from graphopt.errors import InputError


def check_weight(weight: torch.Tensor, layer: str) -> None:
    """A solver works on one floating (out, in) matrix; a conv weight must be reshaped by the caller."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise InputError(f"layer {layer!r}: the weight must be a 2-D floating tensor (out, in), got {got}; "
                         "reshape a conv weight with weight.reshape(out, -1) first")


def check_pattern(sparsity: float, n: int, m: int, in_features: int, layer: str) -> None:
    """Unstructured needs 0 <= sparsity < 1; N:M needs 0 < n < m, m dividing the input width, and a sparsity
    argument that is 0 or agrees with the pattern (so a caller's two descriptions can never silently disagree)."""
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0 or math.isnan(sparsity):
        raise InputError(f"layer {layer!r}: sparsity must be a number in [0, 1), got {sparsity!r}")
    if n == 0 and m == 0:
        return
    if not (isinstance(n, int) and isinstance(m, int)) or not 0 < n < m:
        raise InputError(f"layer {layer!r}: an N:M pattern needs integers 0 < n < m, got n={n!r}, m={m!r}")
    if in_features % m:
        raise InputError(f"layer {layer!r}: {n}:{m} sparsity needs the input width ({in_features}) to be a "
                         f"multiple of m={m}; use unstructured sparsity for this layer")
    if sparsity not in (0, 0.0) and abs(sparsity - (m - n) / m) > 1e-9:
        raise InputError(f"layer {layer!r}: sparsity={sparsity} contradicts the {n}:{m} pattern "
                         f"(which prunes {(m - n) / m:g}); pass sparsity=0 or {(m - n) / m:g}")


def pruned_count(sparsity: float, width: int) -> int:
    """How many of ``width`` weights a row loses: round half up, so the count never depends on float parity."""
    return int(math.floor(sparsity * width + 0.5))


def prune_lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Bool prune mask with the ``count`` lowest scores of every row set."""
    prune = torch.zeros_like(score, dtype=torch.bool)
    if count > 0:
        prune.scatter_(1, torch.topk(score, count, dim=1, largest=False).indices, True)
    return prune


def prune_lowest_nm(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool prune mask with the m - n lowest scores of every group of m consecutive columns set."""
    rows, cols = score.shape
    grouped = prune_lowest(score.reshape(rows * (cols // m), m), m - n)
    return grouped.reshape(rows, cols)
