"""Data-aware weight sparsity on the sequential engine: Wanda masks and SparseGPT masks with weight updates.

The sparsify pass chooses the layers, patterns and sparsities (passes/sparsify.py); this module computes each
layer's mask from the inputs it sees on calibration data, after every layer before it was pruned
(graphopt/calibration/engine.py), and stores it as the same WeightMask parametrization magnitude sparsity uses, so
lowering and the kernels see no difference. SparseGPT also rewrites the weights that stay (the dense ``original``
under the mask). A grouped conv is solved group by group, each group on its own inputs; 3-D convs get a magnitude
mask, and their decision says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx

from graphopt.analysis.sparsity import Pattern, magnitude_mask, register_mask
from graphopt.calibration.damping import CholeskyInverse, damped_cholesky_inverse
from graphopt.calibration.engine import NodeInputs, run_sequentially
from graphopt.calibration.layer_io import input_rows, write_dense_weight
from graphopt.calibration.sparsegpt import sparsegpt
from graphopt.calibration.statistics import InputStatistics
from graphopt.calibration.wanda import wanda_mask
from graphopt.graph.inputs import ExampleInputs
from graphopt.graph.nodes import resolve

__all__ = ["METHODS", "WeightTarget", "prune_with_data"]

METHODS = ("wanda", "sparsegpt")


@dataclass(frozen=True)
class WeightTarget:
    """One weight to prune: its qualified name, pattern, sparsity, and whether it is stored (in, out)."""

    name: str
    pattern: Pattern
    sparsity: float
    transposed: bool


def prune_with_data(gm: fx.GraphModule, batches: Sequence[ExampleInputs], targets: dict[fx.Node, WeightTarget],
                    method: str, *, damp: float = 0.01, block_size: int = 128) -> dict[str, str]:
    """Prune every target layer of ``gm`` in place with ``method``; returns ``{weight name: how it was pruned}``."""
    notes: dict[str, str] = {}
    factors = LastFactor(damp)

    def visit(inputs: NodeInputs) -> None:
        target = targets[inputs.node]
        stored = resolve(gm, target.name).detach()
        parts = input_rows(inputs, stored.shape)
        if parts is None:
            register_mask(gm, target.name, magnitude_mask(stored, target.sparsity, target.pattern), str(target.pattern))
            notes[target.name] = "magnitude: its inputs are not unfolded into rows here (3-D conv)"
            return
        matrix = stored.t() if target.transposed else stored.reshape(stored.shape[0], -1)
        new, keep = matrix.clone(), torch.ones_like(matrix, dtype=torch.bool)
        for rows_slice, rows in parts:  # one part per conv group (a single part for every other layer)
            new[rows_slice], keep[rows_slice] = _solve(matrix[rows_slice], rows, target, method, factors, block_size)
        as_stored = (lambda t: t.t()) if target.transposed else (lambda t: t.reshape(stored.shape))
        write_dense_weight(gm, target.name, as_stored(new))
        register_mask(gm, target.name, as_stored(keep).contiguous(), str(target.pattern))
        count = sum(r.shape[0] for r in parts[0][1])
        notes[target.name] = f"{method} on {count} input rows" + (f" per group, {len(parts)} groups"
                                                                  if len(parts) > 1 else "")

    run_sequentially(gm, batches, visit, lambda node: node in targets, desc=f"sparsify ({method})")
    return notes


def _solve(matrix: torch.Tensor, rows: list[torch.Tensor], target: WeightTarget, method: str,
           factors: LastFactor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight, keep mask) of one (out, in) matrix from the rows it saw, statistics summed over all ranks."""
    stats = InputStatistics.of_rows(rows, matrix.shape[1], gram=method == "sparsegpt", layer=target.name)
    n, m = (target.pattern.n, target.pattern.m) if target.pattern.is_nm else (0, 0)
    sparsity = 1 - n / m if m else target.sparsity
    if method == "wanda":
        return matrix, wanda_mask(matrix, stats.column_norms, sparsity, n=n, m=m, layer=target.name)
    hessian = stats.hessian
    return sparsegpt(matrix, hessian, sparsity, n=n, m=m, block_size=block_size, damp=factors.damp,
                     layer=target.name, factor=factors.of(hessian, target.name))


class LastFactor:
    """The damped inverse-Hessian factor of the last Hessian seen, reused while the next one is equal: layers
    that read one input (q/k/v, gate/up) come one after another in graph order, and the O(in^3) factorization
    was 40% of SparseGPT's time on a Llama. Equality is checked on the values, never assumed from the node."""

    def __init__(self, damp: float):
        self.damp, self._hessian, self._factor = damp, None, None

    def of(self, hessian: torch.Tensor, layer: str) -> CholeskyInverse:
        """The factor of ``hessian``: the cached one when the values are equal, else a new one."""
        if self._hessian is None or self._hessian.shape != hessian.shape or not torch.equal(self._hessian, hessian):
            self._hessian, self._factor = hessian, damped_cholesky_inverse(hessian, self.damp, layer=layer)
        return self._factor
