"""``graphopt::quant_linear``: y = x Wᵀ + b for an int4/int8 weight packed by quant_format.pack_quantized.

``graphopt::quant_linear(x, qweight, scales, zeros, bias, bits, group_size, act_group, in_features,
out_features, threads=1)``; x of any shape (..., in_features), any float dtype (computed in float32).

``act_group`` picks the arithmetic:

* ``0``: float compute: y = x · dequantize(W)ᵀ + b (the weight-only semantics);
* ``> 0``: int8 compute, as onnxruntime's MatMulNBits at accuracy level 4 and llama.cpp do: every row of x is
  quantized at run time to int8 per block of ``act_group`` inputs (symmetric, scale max|x| / 127, round half to
  even of x · (127 / max|x|) in float32), the integer dot products are exact, and
  y[n] = Σ_blocks s[n, g] · xs[b] · Σ_k (q[n, k] - z[n, g]) · xq[k] + b[n]. ``act_group`` must divide
  ``group_size`` (quant_format.act_group_for gives the usual choice); ``act_group == group_size == Kp`` is
  per-token dynamic int8.

Two torch implementations define the results: ``reference_quant_linear`` (float64, exact integer sums: what the
C kernels must reproduce up to float32 rounding) and the float-compute path. The op runs the C kernels of
kernels/csrc/quant_linear.cpp (vpdpbusd GEMV/GEMM on AVX-512 VNNI, AMX tiles for int8-compute batches where the
CPU and kernel allow them, AVX2 and plain C builds; see build.py) for every float input (bf16/fp16 widened to
fp32 and rounded back); without the library (no compiler, ``GRAPHOPT_KERNELS=reference``) or for an
``act_group`` that is not a multiple of 8 (or above 66304, where int32 block sums could overflow) it runs the
reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from graphopt.kernels.build import library
from graphopt.kernels.quant_format import BITS, TILE, QuantizedWeight, dequantize
from graphopt.kernels.ops import _LIB

__all__ = ["quant_linear", "quantize_activations", "reference_quant_linear"]

_LIB.define("quant_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, int bits, "
            "int group_size, int act_group, int in_features, int out_features, int threads=1) -> Tensor")


# The C kernels' activation blocks: a multiple of 8 inputs, at most this many (int32 block sums: 255 * 127 * n < 2^31)
_MAX_KERNEL_BLOCK = 66304


class QuantKernelError(ValueError):
    """The packed tensors handed to ``graphopt::quant_linear`` do not fit its other arguments."""


def weight_of(qweight, scales, zeros, bits, group_size, in_features, out_features) -> QuantizedWeight:
    """The op's arguments as a QuantizedWeight (no copy)."""
    return QuantizedWeight(bits, group_size, in_features, out_features, qweight, scales, zeros)


def _check_args(x, qweight, scales, zeros, bias, bits, group_size, act_group, in_features, out_features):
    """Shape and dtype checks that read no tensor data (~2 us): the C kernel trusts every size they fix."""
    where = "graphopt::quant_linear"
    if bits not in BITS:
        raise QuantKernelError(f"{where}: bits must be 4 or 8, got {bits}")
    if x.shape[-1] != in_features:
        raise QuantKernelError(f"{where}: input has {x.shape[-1]} features, the packed weight expects {in_features}")
    if x.device.type != "cpu":
        raise QuantKernelError(f"{where} runs on CPU only, got an input on {x.device}")
    tiles = -(-out_features // TILE)
    per_chunk = 4 if bits == 8 else 8
    if qweight.dtype != torch.uint8 or qweight.dim() != 3 or qweight.shape[0] != tiles or qweight.shape[2] != 64:
        raise QuantKernelError(f"{where}: qweight must be uint8 ({tiles}, Kp/{per_chunk}, 64), got "
                               f"{qweight.dtype} {tuple(qweight.shape)}; pack it with pack_quantized()")
    kp = qweight.shape[1] * per_chunk
    if kp < in_features or group_size <= 0 or kp % group_size:
        raise QuantKernelError(f"{where}: padded K {kp} is not a multiple of group_size {group_size} covering "
                               f"{in_features} inputs")
    groups = kp // group_size
    if scales.dtype != torch.float32 or tuple(scales.shape) != (tiles, groups, TILE):
        raise QuantKernelError(f"{where}: scales must be float32 ({tiles}, {groups}, {TILE}), got "
                               f"{scales.dtype} {tuple(scales.shape)}")
    if zeros.numel() and (zeros.dtype != torch.uint8 or tuple(zeros.shape) != (tiles, groups, TILE)):
        raise QuantKernelError(f"{where}: zeros must be empty (symmetric) or uint8 ({tiles}, {groups}, {TILE}), "
                               f"got {zeros.dtype} {tuple(zeros.shape)}")
    if act_group < 0 or (act_group and group_size % act_group):
        raise QuantKernelError(f"{where}: act_group must be 0 (float compute) or divide group_size {group_size}, "
                               f"got {act_group}")
    if not (qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()):
        raise QuantKernelError(f"{where}: packed tensors must be contiguous")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features):
        raise QuantKernelError(f"{where}: bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if not x.dtype.is_floating_point:
        raise QuantKernelError(f"{where}: input must be a float tensor, got {x.dtype}")


def quantize_activations(x2: torch.Tensor, kp: int, act_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq float (rows, Kp) of integers in [-127, 127], xs float32 (rows, Kp/act_group)): x zero-padded to Kp and
    quantized per block with the kernels' float32 arithmetic (an all-zero block gets scale 0 and codes 0)."""
    rows, k = x2.shape
    xp = torch.zeros(rows, kp, dtype=torch.float32)
    xp[:, :k] = x2
    blocks = xp.view(rows, kp // act_group, act_group)
    amax = blocks.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(blocks * inv[..., None]).clamp(-127, 127)
    return xq.view(rows, kp), amax / 127.0


def reference_quant_linear(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor],
                           act_group: int) -> torch.Tensor:
    """The op's result computed in torch: float compute for ``act_group == 0``, otherwise the int8-compute
    arithmetic in float64 with exact integer sums. Returns float32 of shape (..., out_features)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, qw.in_features).float()
    if act_group == 0:
        y = F.linear(x2, dequantize(qw), None if bias is None else bias.float())
        return y.view(*lead, qw.out_features)
    from graphopt.kernels.quant_format import unpack_codes

    codes, scales, zeros = unpack_codes(qw)
    kp, g, n = qw.padded_in_features, qw.group_size, qw.out_features
    xq, xs = quantize_activations(x2, kp, act_group)
    centered = torch.zeros(n, kp, dtype=torch.float64)
    centered[:, :qw.in_features] = codes.double() - zeros.double().repeat_interleave(g, 1)[:, :qw.in_features]
    per_block = act_group
    blocks = kp // per_block
    dots = torch.einsum("rbk,nbk->rnb", xq.double().view(-1, blocks, per_block),
                        centered.view(n, blocks, per_block))  # exact: integer sums far below 2^53
    s = scales.double().repeat_interleave(g // per_block, 1)  # (n, blocks)
    y = (dots * xs.double()[:, None, :] * s[None]).sum(-1)
    if bias is not None:
        y = y + bias.double()
    return y.float().view(*lead, n)


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: Optional[torch.Tensor], bits: int, group_size: int, act_group: int, in_features: int,
                 out_features: int, threads: int = 1) -> torch.Tensor:
    """y = x Wᵀ + b for the packed int4/int8 W (see the module docstring)."""
    _check_args(x, qweight, scales, zeros, bias, bits, group_size, act_group, in_features, out_features)
    lib = library()
    rows = x.numel() // in_features if in_features else 0
    if lib is None or rows == 0 or act_group % 8 or act_group > _MAX_KERNEL_BLOCK:
        qw = weight_of(qweight, scales, zeros, bits, group_size, in_features, out_features)
        y = reference_quant_linear(x, qw, bias, act_group)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    return _run_kernel(lib, x, qweight, scales, zeros, bias, bits, group_size, act_group, in_features,
                       out_features, threads, rows)


def _run_kernel(lib, x, qweight, scales, zeros, bias, bits, group_size, act_group, in_features, out_features,
                threads, rows):
    """The C kernel writing straight into the output (its row-major M x N is the op's result): the common fp32
    contiguous input takes no conversion at all, each of which would cost ~1 us of a ~400 us GEMV."""
    fp32 = x.dtype == torch.float32
    x2 = x if fp32 and x.is_contiguous() else x.reshape(-1, in_features).float().contiguous()
    b = bias if bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()) else bias.float().contiguous()
    y = torch.empty(*x.shape[:-1], out_features)
    per_chunk = 4 if bits == 8 else 8
    status = lib.quant_linear(bits, x2.data_ptr(), rows, in_features, qweight.data_ptr(), scales.data_ptr(),
                              zeros.data_ptr() if zeros.numel() else None, 0 if b is None else b.data_ptr(),
                              y.data_ptr(), out_features, qweight.shape[1] * per_chunk, group_size, act_group,
                              max(1, threads))
    if status != 0:
        raise QuantKernelError(f"graphopt::quant_linear: the C kernel rejected its arguments (status {status})")
    return y if fp32 else y.to(x.dtype)


@torch.library.register_fake("graphopt::quant_linear")
def _(x, qweight, scales, zeros, bias, bits, group_size, act_group, in_features, out_features, threads=1):
    return x.new_empty(*x.shape[:-1], out_features)


_LIB.impl("quant_linear", quant_linear, "CPU")
