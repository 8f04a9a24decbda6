"""Keys of a tensor's dims and the shape algebra on them: merging dims (products) and splitting one (factoring).

A dim's keys are a list with one key (a tuple of element ids) per index. Merging dims row-major concatenates keys;
splitting a dim into a grid must keep every later removal *rectangular* (whole slices of the grid), so each index
of the split dim is factored into one part per grid axis. Three ways, tried in order:

1. exact: the keys are already products whose positions each vary along one grid axis (a split undoing a merge);
2. fresh: the keys are distinct plain primes (a Linear's H*D outputs viewed as H heads x D): each becomes the
   product of one new element per axis, so heads and head_dim prune independently;
3. one axis: otherwise the largest axis stays prunable, the other axes are frozen, and the cells of each slice of
   the kept axis are made removal-equivalent (a channel shuffle after a concat of differently-keyed halves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from graphopt.analysis.dependency.elements import ElementSpace, Key

DimKeys = list  # list[Key], one per index of the dim
MAX_PRODUCT = 1 << 21  # merged dims larger than this get fresh frozen keys instead of a product table


@dataclass
class TensorKeys:
    """Keys of every dim of one tensor value (None marks a parameter dim no rule has bound yet)."""

    dims: list = field(default_factory=list)
    label: str = ""
    sizes: tuple = ()


def fresh(space: ElementSpace, size: int, label: str, frozen: str | None = None) -> DimKeys:
    """Keys of a new atom of ``size`` elements."""
    return [(int(i),) for i in space.new(size, label, frozen)[:, 0]]


def product(space: ElementSpace, parts: list[DimKeys], label: str) -> DimKeys:
    """Keys of dims merged row-major: index (i, j) of (a, b) gets the concatenated key.

    Size-1 parts add nothing (their one index can never go without emptying the dim) and are left out, so a
    depthwise conv's (channel x 1) outputs keep plain channel keys that unify with its input's."""
    parts = [p for p in parts if len(p) != 1] or parts[:1]
    size = math.prod(len(p) for p in parts)
    if size > MAX_PRODUCT:
        reason = f"merged dim too large to track at {label}"
        for p in parts:
            for k in p:
                space.freeze(k, reason)
        return fresh(space, size, label, frozen=reason)
    out: DimKeys = [()]
    for p in parts:
        out = [a + b for a in out for b in p]
    return out


def split(space: ElementSpace, keys: DimKeys, sizes: list[int], label: str) -> list[DimKeys]:
    """Keys of each dim when a dim with ``keys`` is reshaped into ``sizes`` (see the module docstring)."""
    if len(sizes) == 1:
        return [keys]
    norm = [space.normalize(k) for k in keys]
    return (_split_exact(space, norm, sizes, label) or _split_fresh(space, norm, sizes, label)
            or _split_one_axis(space, norm, sizes, label))


def _split_exact(space, norm, sizes, label):
    widths = {len(k) for k in norm}
    if len(widths) != 1:
        return None
    grid = np.array(norm, dtype=np.int64).reshape(*sizes, widths.pop())
    owner = []  # the grid axis along which each key position varies (-1: constant)
    for p in range(grid.shape[-1]):
        col = grid[..., p]
        varying = [a for a in range(len(sizes)) if sizes[a] > 1 and not (col == col.take([0], axis=a)).all()]
        if len(varying) > 1:
            return None
        owner.append(varying[0] if varying else -1)
    for p, o in enumerate(owner):
        if o == -1:  # shared by every cell: removing it would empty the whole dim
            space.freeze((int(grid.reshape(-1, grid.shape[-1])[0, p]),), f"constant across the reshape at {label}")
    parts = []
    for a, n in enumerate(sizes):
        pos = [p for p, o in enumerate(owner) if o == a]
        if n > 1 and not pos:
            return None  # this axis has no part of its own: its slices could not be removed
        index = [0] * len(sizes)
        rows = []
        for i in range(n):
            index[a] = i
            rows.append(tuple(int(grid[tuple(index)][p]) for p in pos))
        parts.append(rows if pos else fresh(space, n, f"{label}/axis{a}", frozen="singleton"))
    return parts


def _split_fresh(space, norm, sizes, label):
    if any(len(k) != 1 for k in norm) or len({k[0] for k in norm}) != len(norm):
        return None
    axes = [fresh(space, n, f"{label}/axis{a}") for a, n in enumerate(sizes)]
    space.outer_axes.extend(space.atom_of[axes[a][0][0]] for a in range(len(sizes) - 1))
    for flat, cell in enumerate(np.ndindex(*sizes)):
        space.set_factor(norm[flat][0], tuple(axes[a][i][0] for a, i in enumerate(cell)))
    return axes


def _split_one_axis(space, norm, sizes, label):
    keep = int(np.argmax(sizes))
    grid = np.arange(len(norm)).reshape(sizes)
    parts = []
    for a, n in enumerate(sizes):
        if a != keep:
            parts.append(fresh(space, n, f"{label}/axis{a}", frozen=f"reshape at {label} mixes channel groups"))
            continue
        rows = []
        for i in range(n):
            cells = np.take(grid, i, axis=a).ravel()
            for c in cells[1:]:
                space.unify_keys(norm[cells[0]], norm[c], f"reshape at {label}")
            rows.append(norm[cells[0]])
        parts.append(rows)
    return parts
