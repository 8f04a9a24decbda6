"""ONNX translations the torch.export-based exporter lacks, for ops that graphs graphopt prunes keep.

Mixture-of-experts layers (transformers 5) multiply each expert's tokens by that expert's slice of a fused
``[experts, in, out]`` weight with ``aten._grouped_mm`` or transformers' own ``transformers::grouped_mm_fallback``
(the rows sorted by expert, ``offs`` the running end of each expert's rows); torchlib translates neither. The
expert count is static, so the product becomes one MatMul per expert over its run of rows, concatenated: no
``[tokens, in, out]`` gather of weights.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["custom_translations"]


def _grouped_mm(mat_a, mat_b, offs, bias=None, out_dtype=None):
    """``out[r] = mat_a[r] @ mat_b[e(r)] (+ bias[e(r)])``, rows of expert e between ``offs[e-1]`` and ``offs[e]``."""
    from onnxscript import opset18 as op

    if out_dtype is not None:
        raise ValueError("grouped_mm with an out_dtype has no ONNX translation in graphopt")
    experts = mat_b.shape[0]
    if not isinstance(experts, int):
        raise ValueError("grouped_mm: the expert count (weight dim 0) must be static to export")
    ends = op.Cast(offs, to=7)  # INT64: Slice bounds
    axis0 = op.Constant(value_ints=[0])
    start, pieces = op.Constant(value_ints=[0]), []
    for e in range(experts):
        end = op.Slice(ends, op.Constant(value_ints=[e]), op.Constant(value_ints=[e + 1]), axis0)
        rows = op.Slice(mat_a, start, end, axis0)
        out = op.MatMul(rows, op.Gather(mat_b, op.Constant(value_int=e), axis=0))
        if bias is not None:
            out = op.Add(out, op.Gather(bias, op.Constant(value_int=e), axis=0))
        pieces.append(out)
        start = end
    return op.Concat(*pieces, axis=0)


def _grouped_mm_fallback(input, weight, offs):
    return _grouped_mm(input, weight, offs)


def custom_translations() -> dict[Any, Callable]:
    """{op overload: translation} for ``torch.onnx.export(..., custom_translation_table=...)``; ops of libraries
    that are not loaded are left out."""
    table: dict[Any, Callable] = {}
    if hasattr(torch.ops.aten, "_grouped_mm"):
        table[torch.ops.aten._grouped_mm.default] = _grouped_mm
    try:
        table[torch.ops.transformers.grouped_mm_fallback.default] = _grouped_mm_fallback
    except (AttributeError, RuntimeError):  # transformers' MoE integration not imported: no such op in any graph
        pass
    return table
