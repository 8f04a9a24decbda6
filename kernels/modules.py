"""``SparseLinear``: an eager module holding a packed sparse weight and calling ``graphopt::sparse_linear``."""

from __future__ import annotations

import torch
import torch.nn as nn

from graphopt.kernels import ops  # noqa: F401  (registers torch.ops.graphopt.*)
from graphopt.kernels.formats import PackedWeight, pack, validate


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
