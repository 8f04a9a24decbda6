"""N:M = 2:4 weights on NVIDIA GPUs through torch's semi-structured sparse tensors.

A 2:4 weight keeps at most 2 nonzeros in every group of 4 consecutive input columns of each output row (the
groups run along ``in_features``, the dimension the sparse tensor cores compress). Ampere and newer GPUs
(compute capability >= 8.0) multiply such a weight at up to 2x the dense rate; torch exposes them as
``torch.sparse.to_sparse_semi_structured``, whose result ``F.linear`` accepts in place of the dense weight.

Backends: cuSPARSELt (fp16/bf16/int8, when ``torch.backends.cusparselt.is_available()``) or CUTLASS (also fp32).
Each has minimum shapes: both dimensions of the weight a multiple of (and at least) 32 x 64 (CUTLASS fp16/bf16),
32 x 32 (CUTLASS fp32) or 16 x 16 (cuSPARSELt fp16/bf16). Everything that torch would reject with a terse
RuntimeError is checked here first and raised as a SparseFormatError saying what to do.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.kernels.formats import SparseFormatError, check_weight

_MIN_SHAPE = {  # (backend, dtype) -> (rows, cols) the weight's shape must be a multiple of
    ("cutlass", torch.float16): (32, 64), ("cutlass", torch.bfloat16): (32, 64), ("cutlass", torch.float32): (32, 32),
    ("cusparselt", torch.float16): (16, 16), ("cusparselt", torch.bfloat16): (16, 16),
}


def violations_2to4(weight: torch.Tensor) -> int:
    """How many groups of 4 consecutive input columns hold more than 2 nonzeros (0 = the weight is 2:4)."""
    check_weight(weight)
    n, k = weight.shape
    if k % 4:
        raise SparseFormatError(f"weight: 2:4 sparsity needs in_features divisible by 4, got {k}")
    return int(((weight.detach() != 0).view(n, k // 4, 4).sum(dim=2) > 2).sum())


def prune_2to4(weight: torch.Tensor) -> torch.Tensor:
    """A copy of ``weight`` keeping the 2 largest-magnitude values of every group of 4 input columns."""
    check_weight(weight)
    n, k = weight.shape
    if k % 4:
        raise SparseFormatError(f"weight: 2:4 sparsity needs in_features divisible by 4, got {k}")
    groups = weight.detach().reshape(n, k // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.abs().topk(2, dim=2).indices, True)
    return (groups * keep).reshape(n, k)


def default_backend(dtype: torch.dtype) -> str:
    """cuSPARSELt where torch has it and it takes ``dtype``, else CUTLASS."""
    has_lt = getattr(torch.backends, "cusparselt", None) is not None and torch.backends.cusparselt.is_available()
    return "cusparselt" if has_lt and ("cusparselt", dtype) in _MIN_SHAPE else "cutlass"


def check_semi_structured(weight: torch.Tensor, backend: Optional[str] = None, what: str = "weight") -> str:
    """Raise SparseFormatError unless ``weight`` can become a 2:4 semi-structured tensor; the backend to use."""
    check_weight(weight, what)
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        raise SparseFormatError(f"{what}: this torch ({torch.__version__}) has no semi-structured sparsity; "
                                "upgrade torch or keep the layer dense")
    if not weight.is_cuda:
        raise SparseFormatError(f"{what}: 2:4 semi-structured sparsity runs on CUDA only, got a weight on "
                                f"{weight.device}; move the model to a GPU first or use the CPU sparse formats")
    major, minor = torch.cuda.get_device_capability(weight.device)
    if major < 8:
        raise SparseFormatError(f"{what}: 2:4 semi-structured sparsity needs an NVIDIA GPU of compute capability "
                                f">= 8.0 (Ampere or newer), this one is {major}.{minor}")
    backend = backend or default_backend(weight.dtype)
    if (backend, weight.dtype) not in _MIN_SHAPE:
        dtypes = sorted({str(d).replace("torch.", "") for b, d in _MIN_SHAPE if b == backend})
        raise SparseFormatError(f"{what}: the {backend} 2:4 backend takes {', '.join(dtypes)} weights, got "
                                f"{weight.dtype}; convert the model (e.g. .half()) first")
    rows, cols = _MIN_SHAPE[backend, weight.dtype]
    n, k = weight.shape
    if n % rows or k % cols:
        raise SparseFormatError(f"{what}: the {backend} 2:4 backend needs a weight shape that is a multiple of "
                                f"({rows}, {cols}), got ({n}, {k}); keep this layer dense")
    bad = violations_2to4(weight)
    if bad:
        raise SparseFormatError(f"{what}: {bad} groups of 4 input columns hold more than 2 nonzeros, so the weight "
                                "is not 2:4; prune it with prune_2to4() (or the sparsify pass with an N:M pattern)")
    return backend


def to_semi_structured(weight: torch.Tensor, backend: Optional[str] = None, what: str = "weight") -> torch.Tensor:
    """The 2:4 weight as torch's semi-structured sparse tensor (cuSPARSELt or CUTLASS), usable by F.linear."""
    backend = check_semi_structured(weight, backend, what)
    cls = (torch.sparse.SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt"
           else torch.sparse.SparseSemiStructuredTensorCUTLASS)
    return cls.from_dense(weight.detach().contiguous())


class SemiStructuredLinear(nn.Module):
    """y = x Wᵀ + b with a 2:4 weight held as a semi-structured sparse tensor (CUDA only)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                 what: str = "weight"):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(to_semi_structured(weight, backend, what), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(weight.dtype).clone(),
                                                           requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: Optional[str] = None) -> "SemiStructuredLinear":
        """The 2:4 equivalent of a CUDA ``nn.Linear`` whose weight is 2:4 (the Linear is not changed)."""
        return cls(linear.weight, linear.bias, backend, what="weight of the Linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x Wᵀ + b over the last dimension of ``x`` (contiguous, in the weight's dtype: the kernels need it)."""
        y = F.linear(x.to(self.weight.dtype).contiguous(), self.weight, self.bias)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        """Features and backend."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"backend={type(self.weight).__name__}")
