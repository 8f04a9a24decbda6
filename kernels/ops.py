"""torch.library custom ops over the C kernels, with fake (meta) implementations so graphs holding them still
trace, export and compile.

``graphopt::sparse_linear(x, values, cols, ptr, bias, fmt, in_features, out_features, threads)``
    y = x Wᵀ + b for W packed as ``fmt`` (see formats.py); x of any shape (..., in_features).
``graphopt::act_sparse_linear(x, weight_t, bias, threads)``
    y = x Wᵀ + b with ``weight_t`` = Wᵀ (in_features x out_features, dense); at batch 1 it skips the rows of
    ``weight_t`` whose input is zero (dynamic activation sparsity after ReLU); other batches run F.linear.

fp32 runs the C kernels. bf16/fp16 inputs are widened to fp32, run through the same kernels and rounded back
(weights are stored in fp32 so nothing is lost; no bf16 arithmetic kernel is provided). Without the library
(no compiler, unsupported CPU, ``GRAPHOPT_KERNELS=reference``) both ops compute the same result with torch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from graphopt.kernels.build import library
from graphopt.kernels.formats import FORMAT_CODE, PackedWeight, SparseFormatError, unpack

_GROUP_ROWS = {"8x1": 8, "16x1": 16}
_VALUES_PER_ENTRY = {"8x1": 8, "16x1": 16, "1x4": 4, "csr": 1}
# Defined with torch.library.Library rather than @custom_op: the same schema, but the call costs ~10 us less
# (measured 23 vs 57 us per call under load), which matters for batch-1 kernels of 50-300 us.
_LIB = torch.library.Library("graphopt", "DEF")
_LIB.define("sparse_linear(Tensor x, Tensor values, Tensor cols, Tensor ptr, Tensor? bias, str fmt, "
            "int in_features, int out_features, int threads=1) -> Tensor")
_LIB.define("act_sparse_linear(Tensor x, Tensor weight_t, Tensor? bias, int threads=1) -> Tensor")


def _check_args(x, values, cols, ptr, fmt, in_features, out_features):
    """Checks on every call that read no tensor data (~1 us); pack()/validate() check indices and pointers."""
    if fmt not in FORMAT_CODE:
        raise SparseFormatError(f"graphopt::sparse_linear: unknown format '{fmt}'")
    if x.shape[-1] != in_features or x.device.type != "cpu":
        if x.device.type != "cpu":
            raise SparseFormatError(f"graphopt::sparse_linear runs on CPU only, got an input on {x.device}")
        raise SparseFormatError(
            f"graphopt::sparse_linear: input has {x.shape[-1]} features, the packed weight expects {in_features}")
    if values.dtype != torch.float32 or cols.dtype not in (torch.int16, torch.int32) or ptr.dtype != torch.int32:
        raise SparseFormatError("graphopt::sparse_linear: packed tensors must be float32 values, int16/int32 cols, "
                                f"int32 ptr; got {values.dtype}, {cols.dtype}, {ptr.dtype}")
    if not (values.is_contiguous() and cols.is_contiguous() and ptr.is_contiguous()) or \
            values.numel() != cols.numel() * _VALUES_PER_ENTRY[fmt]:
        raise SparseFormatError("graphopt::sparse_linear: packed tensors must be contiguous with "
                                f"{_VALUES_PER_ENTRY[fmt]} values per column index ({values.numel()} values, "
                                f"{cols.numel()} indices); re-pack the weight with graphopt.kernels.pack()")
    if ptr.numel() != -(-out_features // _GROUP_ROWS.get(fmt, 1)) + 1:
        raise SparseFormatError(f"graphopt::sparse_linear: ptr has {ptr.numel()} entries, which does not fit "
                                f"{out_features} outputs in format {fmt}")


def sparse_linear(x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, ptr: torch.Tensor,
                  bias: Optional[torch.Tensor], fmt: str, in_features: int, out_features: int,
                  threads: int = 1) -> torch.Tensor:
    """y = x Wᵀ + b with W packed as ``fmt`` (values, cols, ptr from formats.pack)."""
    _check_args(x, values, cols, ptr, fmt, in_features, out_features)
    lead = x.shape[:-1]
    fp32 = x.dtype == torch.float32
    lib = library()
    if fp32 and lib is not None and x.numel() == in_features and x.is_contiguous():
        # batch 1, the case where call overhead matters most: the kernel writes straight into the output
        y = torch.empty(*lead, out_features)
        b = None if bias is None else _fp32(bias)  # held in a name: a temporary could be freed before the call
        status = lib.sparse_linear(FORMAT_CODE[fmt], cols.element_size(), x.data_ptr(), values.data_ptr(),
                                   cols.data_ptr(), ptr.data_ptr(), 0 if b is None else b.data_ptr(),
                                   y.data_ptr(), out_features, 0, max(1, threads))
        if status != 0:
            raise SparseFormatError(f"graphopt::sparse_linear: the C kernel rejected its arguments (status {status})")
        return y
    # the common case (fp32, contiguous) takes no conversions: each costs ~1 us of a 20-300 us call
    x2 = x.view(-1, in_features) if fp32 and x.is_contiguous() else x.reshape(-1, in_features).float().contiguous()
    b = None if bias is None else _fp32(bias)
    if lib is None or x2.shape[0] == 0:
        w = unpack(PackedWeight(fmt, out_features, in_features, values, cols, ptr))
        y = F.linear(x2, w, b)
    else:
        y = _run_kernel(lib, x2, values, cols, ptr, b, fmt, out_features, threads)
    return (y if fp32 else y.to(x.dtype)).view(*lead, out_features)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def _run_kernel(lib, x2, values, cols, ptr, bias, fmt, out_features, threads):
    rows, k = x2.shape
    bias_ptr = 0 if bias is None else bias.data_ptr()
    common = (values.data_ptr(), cols.data_ptr(), ptr.data_ptr(), bias_ptr)
    if rows == 1:
        y = torch.empty(1, out_features)
        status = lib.sparse_linear(FORMAT_CODE[fmt], cols.element_size(), x2.data_ptr(), *common, y.data_ptr(),
                                   out_features, 0, max(1, threads))
    else:  # the SpMM kernels vectorize over the batch: x transposed, batch padded to a multiple of 8
        width = -(-rows // 8) * 8
        xt = torch.zeros(k, width)
        xt[:, :rows] = x2.t()
        yt = torch.empty(out_features, width)
        status = lib.sparse_linear(FORMAT_CODE[fmt], cols.element_size(), xt.data_ptr(), *common, yt.data_ptr(),
                                   out_features, width, max(1, threads))
        y = yt[:, :rows].t().contiguous()
    if status != 0:
        raise SparseFormatError(f"graphopt::sparse_linear: the C kernel rejected its arguments (status {status})")
    return y


@torch.library.register_fake("graphopt::sparse_linear")
def _(x, values, cols, ptr, bias, fmt, in_features, out_features, threads=1):
    return x.new_empty(*x.shape[:-1], out_features)


def act_sparse_linear(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor],
                      threads: int = 1) -> torch.Tensor:
    """y = x Wᵀ + b with ``weight_t`` = Wᵀ; batch 1 skips the weights of zero inputs."""
    k, n = weight_t.shape
    if x.shape[-1] != k:
        raise SparseFormatError(f"graphopt::act_sparse_linear: input has {x.shape[-1]} features, weight expects {k}")
    lib = library()
    rows = x.numel() // k if k else 0
    if lib is None or rows != 1 or x.dtype != torch.float32 or weight_t.dtype != torch.float32:
        return F.linear(x, weight_t.t().to(x.dtype), None if bias is None else bias.to(x.dtype))
    x1 = x.reshape(k).contiguous()
    wt = weight_t.contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    y = torch.empty(n)
    scratch = torch.empty(max(k, 1), dtype=torch.int32)
    lib.act_sparse_gemv(x1.data_ptr(), wt.data_ptr(), 0 if b is None else b.data_ptr(), y.data_ptr(), k, n,
                        scratch.data_ptr(), max(1, threads))
    return y.reshape(*x.shape[:-1], n)


@torch.library.register_fake("graphopt::act_sparse_linear")
def _(x, weight_t, bias, threads=1):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


_LIB.impl("sparse_linear", sparse_linear, "CPU")
_LIB.impl("act_sparse_linear", act_sparse_linear, "CPU")
