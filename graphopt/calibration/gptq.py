"""GPTQ (Frantar et al., 2023): quantize a layer's weight to int4/int8 one input column at a time, moving each
column's rounding error onto the columns not yet quantized so that the layer's output on the calibration data
moves as little as possible.

It is the optimal-brain-surgeon step SparseGPT takes for pruning, with "set to the nearest grid point" in place of
"set to zero": for column j the error e = (w_j - q_j) / [U]_jj is subtracted, times row j of the upper Cholesky
factor U of H^-1, from every later column (H = X^T X of the layer's inputs, damped). Updates are lazy (a block of
columns at a time, then one matrix product for the rest), which changes the cost, not the result.

Grid: per output row and group of ``group_size`` consecutive inputs, a scale and zero point (quant_format's
``grid_params``). In natural column order a group's grid is fitted when its first column comes up, on the weights
as updated by then (the standard GPTQ choice). With ``act_order`` the columns are visited by decreasing Hessian
diagonal (the inputs that matter most are quantized first, while the most columns remain to absorb their error);
the groups still run along the original inputs, as the packed format and MatMulNBits need, so their grids are
fitted up front on the original weight ("static groups"). Per-channel grids are always fitted up front.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphopt.calibration.damping import CholeskyInverse, damped_cholesky_inverse
from graphopt.errors import InputError
from graphopt.kernels.quant_format import check_bits_and_group, grid_params, quantize_rtn, quantize_to_grid

__all__ = ["QuantizedCodes", "gptq", "permuted_hessian"]


@dataclass(frozen=True)
class QuantizedCodes:
    """Codes uint8 (N, K), scales float32 (N, G), zeros uint8 (N, G): W ≈ s · (q - z) per group."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int | None

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (N, K) the codes stand for."""
        k = self.codes.shape[1]
        g = k if self.group_size is None else self.group_size
        s = self.scales.repeat_interleave(g, dim=1)[:, :k]
        z = self.zeros.float().repeat_interleave(g, dim=1)[:, :k]
        return s * (self.codes.float() - z)


def rtn(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool = True,
        keep: torch.Tensor | None = None, layer: str = "weight") -> QuantizedCodes:
    """Round-to-nearest on ``weight`` (N, K), with the entries outside ``keep`` (a sparsity mask) forced to 0."""
    w = weight if keep is None else torch.where(keep, weight, 0.0)
    return QuantizedCodes(*quantize_rtn(w, bits, group_size, symmetric, layer=layer), group_size)


def permuted_hessian(hessian: torch.Tensor, act_order: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(H in visiting order, the permutation or None): columns by decreasing diagonal for ``act_order``."""
    if not act_order:
        return hessian, None
    perm = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    return hessian[perm][:, perm], perm


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = 128, *,
         symmetric: bool = True, act_order: bool = False, block_size: int = 128, damp: float = 0.01,
         keep: torch.Tensor | None = None, layer: str = "weight",
         factor: CholeskyInverse | None = None) -> QuantizedCodes:
    """Quantize ``weight`` (N, K) against ``hessian`` (K, K; any positive scale) with GPTQ.

    ``keep`` (bool (N, K)): a sparsity mask to respect (a pruned weight): the weights outside it count as 0 and
    stay exactly 0 (the zero point) although updates from earlier columns reach them. ``factor``: the damped factorization of
    the Hessian in visiting order (``permuted_hessian``), when the caller already has it (q/k/v share one).
    Columns whose input is always zero (zero Hessian diagonal) are quantized as 0. Work runs in float32, the
    factorization in float64.
    """
    _check_inputs(weight, hessian, bits, group_size, keep, layer)
    n, k = weight.shape
    h, perm = permuted_hessian(hessian, act_order)
    if factor is None:
        factor = damped_cholesky_inverse(h, damp, layer=layer)
    g = k if group_size is None else group_size
    w = weight.detach().float().clone()
    if keep is not None:
        w = torch.where(keep, w, 0.0)
    static = act_order or group_size is None
    groups = -(-k // g)
    if static:  # grids from the original weight, along the original inputs
        fitted = quantize_rtn(w, bits, group_size, symmetric, layer=layer)
        scales, zeros = fitted[1], fitted[2].float()
    else:
        scales, zeros = torch.ones(n, groups), torch.zeros(n, groups)
    order = perm if perm is not None else torch.arange(k)
    w = w[:, order]
    keep_t = None if keep is None else keep[:, order].t().contiguous()
    group_of = (order // g).tolist()
    u = factor.upper.float()
    w[:, factor.dead] = 0.0
    codes_t = torch.empty(k, n)
    step = g * max(1, block_size // g) if not static else block_size  # a fitted group never straddles two blocks
    for start in range(0, k, step):
        end = min(start + step, k)
        cols = w[:, start:end].t().contiguous()  # a column per row of ``cols``: contiguous updates
        err = torch.zeros_like(cols)
        for j in range(end - start):
            c = start + j
            gi = group_of[c]
            if not static and c % g == 0:
                scales[:, gi], zeros[:, gi] = grid_params(cols[j:j + g].t(), bits, symmetric)
            col = cols[j]
            # a pruned weight holds updates from earlier columns: it goes to 0 and that change is spread too
            kept = col if keep_t is None else col * keep_t[c]
            q = quantize_to_grid(kept, scales[:, gi], zeros[:, gi], bits)
            codes_t[c] = q
            torch.div(col - scales[:, gi] * (q - zeros[:, gi]), u[c, c], out=err[j])
            cols[j + 1:] -= u[c, c + 1:end, None] * err[j]
        w[:, end:] -= err.t() @ u[start:end, end:]
    codes = torch.empty(n, k, dtype=torch.uint8)
    codes[:, order] = codes_t.t().to(torch.uint8)
    return QuantizedCodes(codes, scales.float(), zeros.to(torch.uint8), group_size)


def _check_inputs(weight, hessian, bits: int, group_size: int | None, keep, layer: str) -> None:
    """InputError naming ``layer`` for a grid, weight, Hessian or mask GPTQ cannot take."""
    check_bits_and_group(bits, group_size, layer)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise InputError(f"layer {layer!r}: GPTQ takes a floating-point (out, in) matrix, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (k, k):
        got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise InputError(f"layer {layer!r}: the Hessian must be ({k}, {k}) for a weight of shape {(n, k)}, got {got}")
    if keep is not None and (keep.dtype != torch.bool or tuple(keep.shape) != (n, k)):
        raise InputError(f"layer {layer!r}: keep must be a bool mask of the weight's shape {(n, k)}")
