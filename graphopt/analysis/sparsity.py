"""Sparsity masks: patterns, magnitude masks, the mask parametrization, achieved sparsity, schedules.

A weight is seen as a matrix ``weight.reshape(out, -1)``: one row per output channel, one column per input
(for a conv, the flattened ``(in/groups, kh, kw)`` order of im2col). Patterns on that matrix:

- ``unstructured``: any single weight may go.
- ``RxC`` blocks (``8x1``, ``16x1``, ``1x4``...): R consecutive output rows by C consecutive input columns are
  kept or dropped together. ``8x1`` = 8 output rows share one input column (streams like dense memory, no
  gathers); ``1x4`` = 4 neighbours along the input. When a dimension is not a multiple of the block, the last
  block along it is *ragged* (smaller): it is scored by its mean magnitude like any other block and dropped whole.
- ``N:M`` (``2:4``...): in every group of M consecutive inputs of a row, at most N weights are kept (exactly N
  when the magnitudes allow). The input size must be a multiple of M, otherwise the pattern does not fit.

Blocks are ranked by mean ``|w|``; the number of dropped blocks is the one whose element count comes closest to
``sparsity * numel`` (ties: fewer), so the achieved sparsity is the target within one block.
Weights already masked score below every live weight, so re-masking never revives them and is idempotent.

The mask of a weight lives in a ``WeightMask`` parametrization (torch.nn.utils.parametrize) on the module that
owns the weight: ``owner.weight`` reads ``original * mask``. See passes/sparsify.py for the full contract.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from graphopt.errors import InputError
from graphopt.graph.nodes import owner_and_leaf

__all__ = [
    "Pattern", "WeightMask", "achieved_sparsity", "bake_masks", "cubic_sparsity", "follows_pattern",
    "magnitude_mask", "register_mask", "weight_masks", "weight_matrix",
]

_BLOCK = re.compile(r"^(\d+)x(\d+)$")
_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern: a block of ``rows x cols`` (unstructured = 1x1) or ``n:m``."""

    rows: int = 1
    cols: int = 1
    n: int = 0  # N:M patterns only (m > 0)
    m: int = 0

    @staticmethod
    def parse(text: str) -> "Pattern":
        """``'unstructured'``, ``'8x1'``, ``'1x4'``, ``'2:4'``...; InputError for anything else."""
        spec = str(text).strip().lower()
        if spec == "unstructured":
            return Pattern()
        if block := _BLOCK.match(spec):
            rows, cols = int(block[1]), int(block[2])
            if rows >= 1 and cols >= 1:
                return Pattern(rows, cols)
        if nm := _NM.match(spec):
            n, m = int(nm[1]), int(nm[2])
            if not 0 < n < m:
                raise InputError(f"N:M pattern '{text}' needs 0 < N < M (N weights kept in every M)")
            return Pattern(n=n, m=m)
        raise InputError(f"unknown pattern '{text}'; use 'unstructured', a block 'RxC' of R output rows by C "
                         "input columns such as '8x1', '16x1' or '1x4', or 'N:M' such as '2:4'")

    @property
    def is_nm(self) -> bool:
        """True for N:M patterns, whose sparsity is fixed at 1 - N/M."""
        return self.m > 0

    @property
    def fixed_sparsity(self) -> float | None:
        """1 - N/M for N:M patterns; None where the sparsity is free."""
        return 1 - self.n / self.m if self.is_nm else None

    def __str__(self) -> str:
        if self.is_nm:
            return f"{self.n}:{self.m}"
        return "unstructured" if (self.rows, self.cols) == (1, 1) else f"{self.rows}x{self.cols}"


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The 2-D view patterns apply to: one row per output channel, inputs (and kernel taps) flattened."""
    return weight.reshape(weight.shape[0], -1)


def element_scores(weight: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """|w| as float32 in matrix form; weights already masked score -1 (below every live weight)."""
    score = weight_matrix(weight.detach()).abs().float()
    if previous is not None:
        score = torch.where(weight_matrix(previous), score, torch.full_like(score, -1.0))
    return score


def block_scores(score: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean score, element count) of every block of a score matrix, each shaped (row blocks, column blocks)."""
    r, c = pattern.rows, pattern.cols
    out, inp = score.shape
    nr, nc = math.ceil(out / r), math.ceil(inp / c)
    padded = score.new_zeros(nr * r, nc * c)
    padded[:out, :inp] = score
    present = score.new_zeros(nr * r, nc * c)
    present[:out, :inp] = 1  # ragged last blocks count only the elements they really have
    sums = padded.reshape(nr, r, nc, c).sum(dim=(1, 3))
    sizes = present.reshape(nr, r, nc, c).sum(dim=(1, 3))
    return sums / sizes, sizes


def expand_blocks(block_keep: torch.Tensor, pattern: Pattern, shape: torch.Size) -> torch.Tensor:
    """Block decisions (row blocks, column blocks) back to an element mask of matrix ``shape``."""
    full = block_keep.repeat_interleave(pattern.rows, 0).repeat_interleave(pattern.cols, 1)
    return full[: shape[0], : shape[1]]


def select_lowest(scores: torch.Tensor, sizes: torch.Tensor, target: float) -> torch.Tensor:
    """Bool mask (flat) of the lowest-scoring items whose total size comes closest to ``target`` (ties: fewer)."""
    order = torch.sort(scores.flatten(), stable=True).indices
    reach = torch.cat([sizes.new_zeros(1), sizes.flatten()[order].cumsum(0)])
    k = int(torch.argmin((reach - target).abs()))  # argmin returns the first minimum: the smaller count
    drop = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    drop[order[:k]] = True
    return drop


def nm_keep(score: torch.Tensor, pattern: Pattern, layer: str = "weight") -> torch.Tensor:
    """Keep mask (matrix form) with the N highest scores of every M consecutive inputs of each row."""
    out, inp = score.shape
    if inp % pattern.m:
        raise InputError(f"pattern '{pattern}' does not fit layer '{layer}': its {inp} inputs per output "
                         f"(weight {tuple(score.shape)} as a matrix) are not a multiple of {pattern.m}")
    groups = score.reshape(out, inp // pattern.m, pattern.m)
    best = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., : pattern.n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, best, True)
    return keep.reshape(out, inp)


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: Pattern | str = "unstructured", *,
                   previous: torch.Tensor | None = None, layer: str = "weight") -> torch.Tensor:
    """Bool keep-mask of ``weight``'s shape: drop the lowest-magnitude blocks to reach ``sparsity`` (layer-wise).

    N:M patterns ignore ``sparsity`` (theirs is fixed). ``previous`` (a keep-mask) is honoured: what it dropped
    stays dropped.
    """
    pattern = Pattern.parse(pattern) if isinstance(pattern, str) else pattern
    score = element_scores(weight, previous)
    if pattern.is_nm:
        keep = nm_keep(score, pattern, layer)
    else:
        means, sizes = block_scores(score, pattern)
        drop = select_lowest(means, sizes, sparsity * score.numel()).reshape(means.shape)
        keep = expand_blocks(~drop, pattern, score.shape)
    if previous is not None:
        keep = keep & weight_matrix(previous)
    return keep.reshape(weight.shape)


def follows_pattern(mask: torch.Tensor, pattern: Pattern | str) -> bool:
    """True if keep-``mask`` has the pattern's structure: uniform blocks, or at most N kept in every M."""
    pattern = Pattern.parse(pattern) if isinstance(pattern, str) else pattern
    matrix = weight_matrix(mask).float()
    if pattern.is_nm:
        if matrix.shape[1] % pattern.m:
            return False
        return bool((matrix.reshape(matrix.shape[0], -1, pattern.m).sum(-1) <= pattern.n).all())
    means, _ = block_scores(matrix, pattern)
    return bool(((means == 0) | (means == 1)).all())


def achieved_sparsity(tensor: torch.Tensor) -> float:
    """Fraction of exact zeros in a weight (or of False in a keep-mask)."""
    return 1.0 - float(torch.count_nonzero(tensor)) / max(tensor.numel(), 1)


def cubic_sparsity(step: float, total_steps: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017) gradual schedule: ``s_t = s_f + (s_i - s_f) * (1 - t/n)^3``, t clamped to [0, n].

    Steep at first (while there are many redundant weights), flat near the end.
    """
    if total_steps < 1:
        raise InputError(f"cubic_sparsity: total_steps must be >= 1, got {total_steps}")
    t = min(max(step, 0), total_steps)
    return final + (initial - final) * (1 - t / total_steps) ** 3


class WeightMask(nn.Module):
    """Parametrization ``W = original * mask``: pruned weights read as exact zeros and get zero gradients.

    ``mask`` is a bool buffer (saved in state_dict, unaffected by ``.to(dtype)``); ``pattern`` names its structure
    for lowering (e.g. '8x1' picks the output-blocked kernel).
    """

    def __init__(self, mask: torch.Tensor, pattern: str = "unstructured"):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))
        self.pattern = pattern

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original * self.mask


def _mask_module(owner: nn.Module, leaf: str) -> WeightMask | None:
    if not parametrize.is_parametrized(owner, leaf):
        return None
    found = [p for p in owner.parametrizations[leaf] if isinstance(p, WeightMask)]
    return found[0] if found else None


def _private_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own.

    Parametrize keeps each parametrized tensor as a property *on the module's class*, and ``copy.deepcopy``
    shares that class between copies: removing (or adding) a parametrization on one copy would change the other.
    """
    if parametrize.is_parametrized(module):
        cls = type(module)
        module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


def register_mask(root: nn.Module, weight_name: str, mask: torch.Tensor, pattern: str) -> bool:
    """Mask ``root``'s weight ``weight_name`` with ``mask`` (new parametrization, or update in place).

    Returns True if the effective mask changed. An all-True mask on an unmasked weight registers nothing.
    """
    owner, leaf = owner_and_leaf(root, weight_name)
    existing = _mask_module(owner, leaf)
    if existing is not None:
        changed = not torch.equal(existing.mask, mask)
        existing.mask.copy_(mask)
        existing.pattern = pattern
        return changed
    if bool(mask.all()):
        return False
    _private_class(owner)
    parametrize.register_parametrization(owner, leaf, WeightMask(mask, pattern))
    return True


def weight_masks(gm: nn.Module) -> dict[str, WeightMask]:
    """Every masked weight of ``gm`` by qualified name (``'layer1.0.conv1.weight'``): its WeightMask
    (``.mask``, a bool tensor of the weight's shape, and ``.pattern``)."""
    found = {}
    for name, module in gm.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for leaf in module.parametrizations:
            mask = _mask_module(module, leaf)
            if mask is not None:
                found[f"{name}.{leaf}" if name else leaf] = mask
    return found


def bake_masks(gm: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace masked weights by plain parameters holding ``original * mask``; returns the names baked.

    Safe on deep copies (other copies keep their masks). This is what lowering does before it picks kernels.
    """
    baked = []
    for name in weight_masks(gm) if names is None else names:
        owner, leaf = owner_and_leaf(gm, name)
        _private_class(owner)
        parametrize.remove_parametrizations(owner, leaf, leave_parametrized=True)
        baked.append(name)
    return baked

