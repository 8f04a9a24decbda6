"""GPU block-sparse y = x Wᵀ + b: a Triton kernel over an output-blocked BSR weight, with a torch fallback.

Format (``BlockSparseWeight``): W (out_features x in_features) is cut into tiles of ``block_n`` output rows by
``block_k`` input columns (16 or 32 or 64 each; the edges are padded with zeros). Only tiles holding a nonzero are
stored, each as a dense ``block_k x block_n`` tile of Wᵀ, ordered by block row (CSR over tiles): ``ptr[r]:ptr[r+1]``
index the stored tiles of block row ``r`` and ``cols`` their block column.

Why this layout for a GPU:
  * output-blocked: one Triton program owns one ``BLOCK_M x block_n`` output tile and walks only the stored tiles of
    its block row, so there are no atomics and no cross-program reduction; an empty block row costs one load of
    ``ptr`` and the bias;
  * each stored tile is a dense ``tl.dot`` of (BLOCK_M x block_k) @ (block_k x block_n), which Triton maps to tensor
    cores (they need every dimension >= 16, hence the 16 minimum); tiles are stored already transposed (Wᵀ) and
    contiguous, so a tile is one coalesced read of block_k rows of block_n values;
  * 32x32 is the default: a 2-4 KB tile keeps the index overhead at 4 bytes per 1024 values, and zeros that come
    in blocks (block pruning) or at high sparsity leave most tiles empty. Unstructured zeros at 50-90% leave nearly
    every 32x32 tile nonzero: those weights should stay dense or use 2:4 (semi_structured.py) instead.

Values keep the weight's dtype (fp32/fp16/bf16); the kernel accumulates in fp32 and writes the input's dtype. fp32
uses IEEE products unless ``torch.backends.cuda.matmul.allow_tf32`` is set, matching what ``F.linear`` does.

The launcher ``bsr_linear`` (and the custom op ``torch.ops.graphopt.bsr_linear``) runs the Triton kernel on CUDA
tensors when Triton is installed (``pip install graphopt[gpu]``), and on CPU tensors only under Triton's
interpreter (``TRITON_INTERPRET=1`` set before Triton is imported: slow, for checking the kernel logic). Everywhere
else it computes the same product with torch (``bsr_linear_reference``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.kernels.formats import SparseFormatError, check_weight

try:  # optional: the default install has no Triton (it is the ``gpu`` extra)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

BLOCK_SIZES = (16, 32, 64)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class BlockSparseWeight:
    """W (out_features x in_features) as stored ``block_k x block_n`` tiles of Wᵀ, CSR-ordered by block row."""

    out_features: int
    in_features: int
    values: torch.Tensor  # (tiles, block_k, block_n), the weight's dtype
    cols: torch.Tensor    # (tiles,) int32 block column of each tile
    ptr: torch.Tensor     # (block rows + 1,) int32

    @property
    def block_k(self) -> int:
        """Input columns per tile."""
        return self.values.shape[1]

    @property
    def block_n(self) -> int:
        """Output rows per tile."""
        return self.values.shape[2]

    @property
    def density(self) -> float:
        """Stored tiles over all tiles (1.0 = nothing skipped)."""
        rows, colsb = -(-self.out_features // self.block_n), -(-self.in_features // self.block_k)
        return self.cols.numel() / max(rows * colsb, 1)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, cols, ptr), the order the custom op takes them in."""
        return self.values, self.cols, self.ptr

    def to(self, device) -> "BlockSparseWeight":
        """The same packed weight on ``device``."""
        return BlockSparseWeight(self.out_features, self.in_features, self.values.to(device),
                                 self.cols.to(device), self.ptr.to(device))


def pack_bsr(weight: torch.Tensor, block: tuple[int, int] = (32, 32), what: str = "weight") -> BlockSparseWeight:
    """Pack the nonzero ``block`` = (block_n, block_k) tiles of a dense 2-D weight with zeros (on its device)."""
    check_weight(weight, what)
    if weight.dtype not in _DTYPES:
        raise SparseFormatError(f"{what}: the Triton block-sparse kernel takes float32, float16 or bfloat16 "
                                f"weights, got {weight.dtype}; convert the weight first")
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or any(not isinstance(b, int) or b not in BLOCK_SIZES for b in block)):
        raise SparseFormatError(f"{what}: block must be a pair (block_n, block_k) of sizes in {BLOCK_SIZES}, "
                                f"got {block!r}")
    bn, bk = block
    w = weight.detach()
    n, k = w.shape
    rows, colsb = -(-n // bn), -(-k // bk)
    padded = w.new_zeros(rows * bn, colsb * bk)
    padded[:n, :k] = w
    tiles = padded.view(rows, bn, colsb, bk).permute(0, 2, 3, 1)  # (block row, block col, bk, bn): tiles of Wᵀ
    keep = (tiles != 0).flatten(2).any(dim=2)                     # (block rows, block cols)
    r, c = keep.nonzero(as_tuple=True)                            # row-major: by block row, then column
    counts = keep.sum(dim=1)
    ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return BlockSparseWeight(n, k, tiles[r, c].contiguous(), c.to(torch.int32).contiguous(),
                             ptr.to(torch.int32).contiguous())


def unpack_bsr(packed: BlockSparseWeight) -> torch.Tensor:
    """The dense weight (out_features x in_features, values' dtype and device) a packed weight stands for."""
    validate_bsr(packed)
    bn, bk = packed.block_n, packed.block_k
    rows, colsb = packed.ptr.numel() - 1, -(-packed.in_features // bk)
    counts = (packed.ptr[1:] - packed.ptr[:-1]).long()
    r = torch.repeat_interleave(torch.arange(rows, device=counts.device), counts)
    tiles = packed.values.new_zeros(rows, colsb, bk, bn)
    tiles[r, packed.cols.long()] = packed.values
    dense = tiles.permute(0, 3, 1, 2).reshape(rows * bn, colsb * bk)
    return dense[:packed.out_features, :packed.in_features].contiguous()


def validate_bsr(packed: BlockSparseWeight, what: str = "block-sparse weight") -> None:
    """Raise SparseFormatError if ``packed`` is inconsistent (the kernel trusts its indices)."""
    def bad(msg: str):
        raise SparseFormatError(f"{what} ({packed.out_features}x{packed.in_features}): {msg}; re-pack it from the "
                                "dense weight with graphopt.kernels.triton_bsr.pack_bsr()")

    values, cols, ptr = packed.tensors()
    if values.dim() != 3 or values.dtype not in _DTYPES or any(s not in BLOCK_SIZES for s in values.shape[1:]):
        bad(f"values must be (tiles, block_k, block_n) float32/float16/bfloat16 with block sizes in {BLOCK_SIZES}, "
            f"got {values.dtype} of shape {tuple(values.shape)}")
    if cols.dtype != torch.int32 or cols.dim() != 1 or cols.numel() != values.shape[0]:
        bad(f"cols must be 1-D int32 with one entry per tile ({values.shape[0]}), got {cols.dtype} of shape "
            f"{tuple(cols.shape)}")
    rows = -(-packed.out_features // packed.block_n)
    if ptr.dtype != torch.int32 or ptr.dim() != 1 or ptr.numel() != rows + 1:
        bad(f"ptr must be 1-D int32 with {rows + 1} entries, got {ptr.dtype} of shape {tuple(ptr.shape)}")
    if int(ptr[0]) != 0 or bool((ptr[1:] < ptr[:-1]).any()) or int(ptr[-1]) != cols.numel():
        bad(f"ptr must rise from 0 to the number of tiles ({cols.numel()})")
    colsb = -(-packed.in_features // packed.block_k)
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= colsb):
        bad(f"block columns must lie in [0, {colsb - 1}]")
    if len({values.device, cols.device, ptr.device}) != 1:
        bad("values, cols and ptr must be on one device")


if triton is not None:
    @triton.jit
    def _bsr_linear_kernel(x_ptr, v_ptr, cols_ptr, ptr_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """One program: output rows [pid_m*BLOCK_M, +BLOCK_M) x outputs of block row pid_n."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        tile = rk[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # offsets inside a stored (BK, BN) tile
        start = tl.load(ptr_ptr + pid_n)
        end = tl.load(ptr_ptr + pid_n + 1)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        w_ptrs = v_ptr + start.to(tl.int64) * (BLOCK_K * BLOCK_N) + tile  # int64: large weights pass 2^31 values
        for i in range(start, end):
            kk = tl.load(cols_ptr + i) * BLOCK_K + rk
            x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + kk[None, :],
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            w = tl.load(w_ptrs)
            acc = tl.dot(x.to(w.dtype), w, acc, input_precision=PRECISION)
            w_ptrs += BLOCK_K * BLOCK_N
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], acc,
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def triton_available() -> bool:
    """Whether Triton can be imported (the ``gpu`` extra)."""
    return triton is not None


def interpreter_active() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 when Triton was imported)."""
    return triton is not None and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def can_run_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernel (not the torch fallback) would run for an input like ``x``."""
    return triton is not None and (x.is_cuda or (x.device.type == "cpu" and interpreter_active()))


def bsr_linear_triton(x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, ptr: torch.Tensor,
                      bias: Optional[torch.Tensor], out_features: int) -> torch.Tensor:
    """y = x Wᵀ + b with the Triton kernel; raises SparseFormatError when Triton cannot run on ``x``'s device."""
    if triton is None:
        raise SparseFormatError("the Triton block-sparse kernel needs Triton: pip install 'graphopt[gpu]' "
                                "(or use bsr_linear, which falls back to torch)")
    if not can_run_triton(x):
        raise SparseFormatError(f"the Triton block-sparse kernel runs on CUDA tensors (or on CPU under "
                                f"TRITON_INTERPRET=1), got an input on {x.device}")
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:
        return y.view(*lead, out_features)
    bk, bn = values.shape[1], values.shape[2]
    if values.shape[0] == 0:  # all-zero weight: give the kernel a real (never read) buffer to point at
        values, cols = values.new_zeros(1, bk, bn), cols.new_zeros(1)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    fp32 = values.dtype == torch.float32
    precision = "tf32" if fp32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    grid = (-(-m // block_m), ptr.numel() - 1)
    b = bias.contiguous() if bias is not None else y
    _bsr_linear_kernel[grid](x2, values, cols, ptr, b, y, m, out_features, k, x2.stride(0), y.stride(0),
                             HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk,
                             PRECISION=precision)
    return y.view(*lead, out_features)


def bsr_linear_reference(x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, ptr: torch.Tensor,
                         bias: Optional[torch.Tensor], in_features: int, out_features: int) -> torch.Tensor:
    """y = x Wᵀ + b with torch (unpack, then F.linear): the fallback and the reference the kernel is checked to."""
    w = unpack_bsr(BlockSparseWeight(out_features, in_features, values, cols, ptr))
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def bsr_linear(x: torch.Tensor, packed: BlockSparseWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x Wᵀ + b for a packed weight: the Triton kernel where it can run, else the torch reference."""
    return torch.ops.graphopt.bsr_linear(x, *packed.tensors(), bias, packed.in_features, packed.out_features)


def _check_call(x, values, in_features):
    if x.shape[-1] != in_features:
        raise SparseFormatError(
            f"graphopt::bsr_linear: input has {x.shape[-1]} features, the packed weight expects {in_features}")
    if x.device != values.device:
        raise SparseFormatError(f"graphopt::bsr_linear: input on {x.device} but the packed weight on "
                                f"{values.device}; move the module with .to(device)")


def _bsr_linear_impl(x, values, cols, ptr, bias, in_features, out_features):
    _check_call(x, values, in_features)
    if can_run_triton(x):
        return bsr_linear_triton(x, values, cols, ptr, bias, out_features)
    return bsr_linear_reference(x, values, cols, ptr, bias, in_features, out_features)


_LIB = torch.library.Library("graphopt", "FRAGMENT")
_LIB.define("bsr_linear(Tensor x, Tensor values, Tensor cols, Tensor ptr, Tensor? bias, int in_features, "
            "int out_features) -> Tensor")
_LIB.impl("bsr_linear", _bsr_linear_impl, "CPU")
_LIB.impl("bsr_linear", _bsr_linear_impl, "CUDA")


@torch.library.register_fake("graphopt::bsr_linear")
def _(x, values, cols, ptr, bias, in_features, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


class BlockSparseLinear(nn.Module):
    """y = x Wᵀ + b with W held as a ``BlockSparseWeight``; runs the Triton kernel on CUDA (see module docstring)."""

    def __init__(self, packed: BlockSparseWeight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        validate_bsr(packed)
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.register_buffer("values", packed.values)
        self.register_buffer("cols", packed.cols)
        self.register_buffer("ptr", packed.ptr)
        self.register_buffer("bias", None if bias is None else bias.detach().to(packed.values.dtype).clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: tuple[int, int] = (32, 32)) -> "BlockSparseLinear":
        """The block-sparse equivalent of an ``nn.Linear`` whose weight holds zeros (the Linear is not changed)."""
        return cls(pack_bsr(linear.weight, block, what="weight of the Linear"), linear.bias)

    def packed(self) -> BlockSparseWeight:
        """The packed weight this module holds."""
        return BlockSparseWeight(self.out_features, self.in_features, self.values, self.cols, self.ptr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x Wᵀ + b over the last dimension of ``x``."""
        return torch.ops.graphopt.bsr_linear(x, self.values, self.cols, self.ptr, self.bias, self.in_features,
                                             self.out_features)

    def extra_repr(self) -> str:
        """Features, tile shape and stored tiles."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block=({self.values.shape[2]}, {self.values.shape[1]}), tiles={self.cols.numel()}")
