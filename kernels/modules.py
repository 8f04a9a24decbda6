"""Eager modules over the custom ops: ``SparseLinear`` (a packed sparse weight, ``graphopt::sparse_linear``) and
``QuantLinear`` (packed int4/int8 codes, ``graphopt::quant_linear``)."""

from __future__ import annotations

import torch
import torch.nn as nn

from graphopt.kernels import ops, quant_autograd, quant_ops  # noqa: F401  (registers torch.ops.graphopt.*)
from graphopt.kernels.formats import PackedWeight, pack, validate
from graphopt.kernels.quant_format import QuantizedWeight, act_group_for, pack_quantized, quantize_rtn


class SparseLinear(nn.Module):
    """y = x Wᵀ + b with W packed as 8x1 / 16x1 / 1x4 / csr; build it with ``SparseLinear.from_dense``."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None, threads: int = 1):
        super().__init__()
        validate(packed)
        self.fmt, self.in_features, self.out_features, self.threads = (
            packed.fmt, packed.in_features, packed.out_features, threads)
        self.register_buffer("values", packed.values)
        self.register_buffer("cols", packed.cols)
        self.register_buffer("ptr", packed.ptr)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, fmt: str = "csr",
                   threads: int = 1) -> "SparseLinear":
        """Pack the nonzeros of ``weight`` (out_features x in_features) as ``fmt``."""
        return cls(pack(weight, fmt), bias, threads)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "csr", threads: int = 1) -> "SparseLinear":
        """The sparse equivalent of an ``nn.Linear`` whose weight holds zeros (the Linear is not changed)."""
        return cls.from_dense(linear.weight, linear.bias, fmt, threads)

    def packed(self) -> PackedWeight:
        """The packed weight this module holds."""
        return PackedWeight(self.fmt, self.out_features, self.in_features, self.values, self.cols, self.ptr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x Wᵀ + b over the last dimension of ``x``."""
        return torch.ops.graphopt.sparse_linear(x, self.values, self.cols, self.ptr, self.bias, self.fmt,
                                                self.in_features, self.out_features, self.threads)

    def extra_repr(self) -> str:
        """in/out features, format and stored entries."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"entries={self.cols.numel()}, threads={self.threads}")


class SparsePointwiseConv(SparseLinear):
    """A 1x1, stride-1 Conv2d as a SparseLinear over channels: NCHW in, NCHW out (the rows are NHWC views)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The 1x1 convolution of ``x`` (N, C, H, W)."""
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W held as packed int4/int8 codes (graphopt/kernels/quant_format.py), calling
    ``graphopt::quant_linear``; ``act_group`` 0 computes in float, > 0 quantizes activations to int8 per block at
    run time (graphopt/kernels/quant_ops.py). Build it with ``QuantLinear.from_quantized`` or ``from_linear``."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None,
                 bits: int, group_size: int, act_group: int, in_features: int, out_features: int, threads: int = 1):
        super().__init__()
        self.bits, self.group_size, self.act_group = bits, group_size, act_group
        self.in_features, self.out_features, self.threads = in_features, out_features, threads
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        # a Parameter, as in nn.Linear: it trains (the op has a gradient for it) while the codes stay fixed
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32).clone())

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, act_group: int | None = None,
                       threads: int = 1) -> "QuantLinear":
        """The module of a packed weight; ``act_group`` None takes the int8-compute default for its group."""
        act = act_group_for(qw.group_size) if act_group is None else act_group
        return cls(qw.qweight, qw.scales, qw.zeros, bias, qw.bits, qw.group_size, act, qw.in_features,
                   qw.out_features, threads)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int | None = 128, symmetric: bool = True,
                    act_group: int | None = None, threads: int = 1) -> "QuantLinear":
        """Round-to-nearest quantization of an ``nn.Linear`` (the Linear is not changed)."""
        codes, scales, zeros = quantize_rtn(linear.weight, bits, group_size, symmetric)
        qw = pack_quantized(codes, scales, None if symmetric else zeros, bits, group_size)
        return cls.from_quantized(qw, linear.bias, act_group, threads)

    def quantized(self) -> QuantizedWeight:
        """The packed weight this module holds."""
        return QuantizedWeight(self.bits, self.group_size, self.in_features, self.out_features, self.qweight,
                               self.scales, self.zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x Wᵀ + b over the last dimension of ``x``."""
        return torch.ops.graphopt.quant_linear(x, self.qweight, self.scales, self.zeros, self.bias, self.bits,
                                               self.group_size, self.act_group, self.in_features,
                                               self.out_features, self.threads)

    def extra_repr(self) -> str:
        """in/out features, bits, group, activation compute."""
        compute = "float" if self.act_group == 0 else f"int8 per {self.act_group}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.zeros.numel() == 0}, compute={compute}")


class QuantPointwiseConv(QuantLinear):
    """A 1x1, stride-1 Conv2d as a QuantLinear over channels: NCHW in, NCHW out (the rows are NHWC views)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The 1x1 convolution of ``x`` (N, C, H, W)."""
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
