"""Weight-only quantization of a graph's layers: round-to-nearest, or GPTQ on the sequential calibration engine.

``quantize_layers`` computes the int4/int8 codes of every target layer and writes the dequantized weight back where
the graph reads it (under its sparsity mask, when it has one), so the graph computes with the quantized weights and
every later layer is calibrated on the outputs of the quantized layers before it. The codes are returned for the
caller (the quantize-weights pass) to pack and lower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx

from graphopt.calibration.engine import NodeInputs, run_sequentially
from graphopt.calibration.gptq import QuantizedCodes, gptq, permuted_hessian, rtn
from graphopt.calibration.layer_io import input_rows, write_dense_weight
from graphopt.calibration.prune_weights import LastFactor
from graphopt.calibration.statistics import InputStatistics
from graphopt.graph.inputs import ExampleInputs
from graphopt.graph.nodes import resolve

__all__ = ["METHODS", "QuantTarget", "quantize_layers"]

METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class QuantTarget:
    """One weight to quantize: its qualified name, whether it is stored (in, out), its grid, and its sparsity mask."""

    name: str
    transposed: bool
    bits: int
    group_size: int | None
    symmetric: bool
    keep: torch.Tensor | None = None  # bool (out, in): entries that must stay exactly 0 are False


def _matrix(stored: torch.Tensor, transposed: bool) -> torch.Tensor:
    return stored.t() if transposed else stored.reshape(stored.shape[0], -1)


def _store(gm: fx.GraphModule, target: QuantTarget, codes: QuantizedCodes) -> None:
    stored = resolve(gm, target.name)
    value = codes.dequantize().to(stored.dtype)
    write_dense_weight(gm, target.name, value.t() if target.transposed else value.reshape(stored.shape))


@torch.no_grad()
def quantize_layers(gm: fx.GraphModule, targets: dict[fx.Node, QuantTarget], method: str,
                    batches: Sequence[ExampleInputs] = (), *, act_order: bool = False, damp: float = 0.01,
                    block_size: int = 128) -> tuple[dict[str, QuantizedCodes], dict[str, str]]:
    """Quantize every target of ``gm`` in place (its weight becomes the dequantized one); returns
    ``({weight name: codes of the (out, in) matrix}, {weight name: how it was quantized})``."""
    done: dict[str, QuantizedCodes] = {}
    notes: dict[str, str] = {}
    if method == "rtn":
        for target in targets.values():
            matrix = _matrix(resolve(gm, target.name).detach(), target.transposed)
            done[target.name] = rtn(matrix, target.bits, target.group_size, target.symmetric, target.keep,
                                    layer=target.name)
            _store(gm, target, done[target.name])
            notes[target.name] = "rtn"
        return done, notes
    factors = LastFactor(damp)

    def visit(inputs: NodeInputs) -> None:
        target = targets[inputs.node]
        stored = resolve(gm, target.name).detach()
        matrix = _matrix(stored, target.transposed)
        parts = input_rows(inputs, stored.shape)
        if parts is None or len(parts) != 1:  # grouped/3-D convs are not quantized by the pass; keep going safely
            done[target.name] = rtn(matrix, target.bits, target.group_size, target.symmetric, target.keep,
                                    layer=target.name)
            notes[target.name] = "rtn: its inputs are not unfolded into rows here"
        else:
            rows = parts[0][1]
            hessian = InputStatistics.of_rows(rows, matrix.shape[1], layer=target.name).hessian
            visiting, _ = permuted_hessian(hessian, act_order)
            done[target.name] = gptq(matrix, hessian, target.bits, target.group_size, symmetric=target.symmetric,
                                     act_order=act_order, block_size=block_size, damp=damp, keep=target.keep,
                                     layer=target.name, factor=factors.of(visiting, target.name))
            count = sum(r.shape[0] for r in rows)
            notes[target.name] = f"gptq on {count} input rows" + (", act-order" if act_order else "")
        _store(gm, target, done[target.name])

    run_sequentially(gm, batches, visit, lambda node: node in targets, desc="quantize-weights (gptq)")
    return done, notes
