"""Packed sparse weight formats for y = x Wᵀ + b, packing from a dense weight with zeros, unpacking, validation.

``8x1`` / ``16x1``: output rows in groups of 8 / 16; per group the columns where any row of the group is nonzero,
each stored as 8 / 16 contiguous values (one vector register). ``1x4``: per output row, runs of 4 consecutive input
columns. ``csr``: per output row its nonzeros. Column indices are int16 when the input width allows (K <= 32767),
halving index bytes; int32 otherwise. Values are float32 (bf16 weights are widened: exact, and the kernels are fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphopt.errors import InputError

FORMATS = ("8x1", "16x1", "1x4", "csr")
FORMAT_CODE = {f: i for i, f in enumerate(FORMATS)}  # as the C entry point numbers them
_GROUP_ROWS = {"8x1": 8, "16x1": 16}
_VALUES_PER_ENTRY = {"8x1": 8, "16x1": 16, "1x4": 4, "csr": 1}


class SparseFormatError(InputError, ValueError):
    """A weight cannot be packed as asked, or a packed weight is inconsistent (corrupted or mismatched)."""


@dataclass(frozen=True)
class PackedWeight:
    """A weight of shape ``(out_features, in_features)`` packed as ``fmt``: values, column indices, row pointers.

    ``ptr`` has one entry per row group (8x1/16x1) or row (1x4/csr) plus one; entries ``ptr[i]:ptr[i+1]`` of
    ``cols`` belong to group/row ``i``, and each entry holds ``values_per_entry`` values.
    """

    fmt: str
    out_features: int
    in_features: int
    values: torch.Tensor
    cols: torch.Tensor
    ptr: torch.Tensor

    @property
    def values_per_entry(self) -> int:
        """Values stored per index entry: 8 or 16 (block rows), 4 (1x4 run) or 1 (csr)."""
        return _VALUES_PER_ENTRY[self.fmt]

    @property
    def nbytes(self) -> int:
        """Bytes a kernel streams for the weight (values + indices + pointers)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.cols, self.ptr))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, cols, ptr), the order the custom op takes them in."""
        return self.values, self.cols, self.ptr


def index_dtype(in_features: int) -> torch.dtype:
    """int16 column indices when every column index fits (and a 1x4 run's end stays addressable), else int32."""
    return torch.int16 if in_features <= 32767 else torch.int32


def check_weight(weight: torch.Tensor, what: str = "weight") -> None:
    """Raise SparseFormatError unless ``weight`` is a 2-D floating-point (fp32/bf16/fp16/fp64) CPU tensor."""
    if not isinstance(weight, torch.Tensor):
        raise SparseFormatError(f"{what}: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise SparseFormatError(
            f"{what}: expected a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}; "
            "reshape 1x1-conv weights with weight.flatten(1) first")
    if not weight.is_floating_point():
        raise SparseFormatError(f"{what}: expected a floating-point weight, got {weight.dtype}")
    if weight.is_sparse or weight.layout != torch.strided:
        raise SparseFormatError(f"{what}: expected a dense (strided) weight with zeros, got layout {weight.layout}")


def pack(weight: torch.Tensor, fmt: str, *, strict: bool = False, what: str = "weight") -> PackedWeight:
    """Pack the nonzeros of a dense 2-D ``weight`` as ``fmt``.

    ``strict=True`` also requires the zeros to follow the format's pattern exactly (every stored block fully
    nonzero); otherwise partially-zero blocks are stored with their zeros (correct, just more bytes).
    """
    check_weight(weight, what)
    if fmt not in FORMATS:
        raise SparseFormatError(f"{what}: unknown sparse format '{fmt}'; choose one of {', '.join(FORMATS)}")
    w = weight.detach().to(torch.float32).contiguous()
    n, k = w.shape
    if fmt == "1x4" and k < 4:
        raise SparseFormatError(f"{what}: format 1x4 needs at least 4 input features, got {k}; use 'csr'")
    packer = {"8x1": _pack_block, "16x1": _pack_block, "1x4": _pack_1x4, "csr": _pack_csr}[fmt]
    values, cols, ptr = packer(w, fmt)
    packed = PackedWeight(fmt, n, k, values.contiguous(), cols.to(index_dtype(k)).contiguous(),
                          ptr.to(torch.int32).contiguous())
    if strict:
        stored, nnz = packed.values.numel(), int((w != 0).sum())
        if stored != nnz:
            raise SparseFormatError(
                f"{what}: its zeros do not follow the {fmt} pattern ({stored - nnz} zeros would be stored inside "
                f"{fmt} blocks); prune with pattern '{fmt}' or pack with strict=False")
    return packed


def _pack_block(w: torch.Tensor, fmt: str):
    rows = _GROUP_ROWS[fmt]
    n, k = w.shape
    groups = -(-n // rows)
    wp = torch.zeros(groups * rows, k, dtype=w.dtype)
    wp[:n] = w
    wp = wp.view(groups, rows, k)
    keep = (wp != 0).any(dim=1)  # (groups, k): columns a group stores
    g, c = keep.nonzero(as_tuple=True)  # row-major: by group, then column
    values = wp.permute(0, 2, 1)[g, c]  # (entries, rows)
    return values.reshape(-1), c, _pointers(keep.sum(dim=1))


def _pack_1x4(w: torch.Tensor, fmt: str):
    n, k = w.shape
    runs = -(-k // 4)
    wp = torch.zeros(n, runs * 4, dtype=w.dtype)
    wp[:, :k] = w
    wp = wp.view(n, runs, 4)
    keep = (wp != 0).any(dim=2)
    r, q = keep.nonzero(as_tuple=True)
    values, starts = wp[r, q].clone(), q * 4
    tail = starts + 4 > k  # the last run would read past the input: start it at k-4 and shift its values right
    if bool(tail.any()):
        shift = int(runs * 4 - k)
        values[tail] = torch.cat([torch.zeros(int(tail.sum()), shift), values[tail][:, : 4 - shift]], dim=1)
        starts[tail] = k - 4
    return values.reshape(-1), starts, _pointers(keep.sum(dim=1))


def _pack_csr(w: torch.Tensor, fmt: str):
    keep = w != 0
    r, c = keep.nonzero(as_tuple=True)
    return w[r, c], c, _pointers(keep.sum(dim=1))


def _pointers(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])


def unpack(packed: PackedWeight) -> torch.Tensor:
    """The dense float32 weight a packed weight stands for (the reference the kernels are checked against)."""
    validate(packed)
    n, k, per = packed.out_features, packed.in_features, packed.values_per_entry
    counts = packed.ptr[1:].long() - packed.ptr[:-1].long()
    owner = torch.repeat_interleave(torch.arange(counts.numel()), counts)  # group/row of every entry
    cols = packed.cols.long()
    if packed.fmt in _GROUP_ROWS:
        dense = torch.zeros(counts.numel() * per, k)
        rows = owner[:, None] * per + torch.arange(per)
        dense.index_put_((rows.reshape(-1), cols.repeat_interleave(per)), packed.values, accumulate=True)
        return dense[:n].contiguous()
    dense = torch.zeros(n, k)
    if packed.fmt == "1x4":
        owner, cols = owner.repeat_interleave(4), (cols[:, None] + torch.arange(4)).reshape(-1)
    dense.index_put_((owner, cols), packed.values, accumulate=True)
    return dense


def validate(packed: PackedWeight, what: str = "packed weight") -> None:
    """Raise SparseFormatError if ``packed`` is inconsistent: wrong dtypes, pointers or out-of-range indices.

    The kernels trust their inputs (an out-of-range index would read outside the input), so every packed weight
    is validated before a kernel sees it.
    """
    def bad(msg: str):
        raise SparseFormatError(f"{what} ({packed.fmt}, {packed.out_features}x{packed.in_features}): {msg}; "
                                "re-pack it from the dense weight with graphopt.kernels.pack()")

    if packed.fmt not in FORMATS:
        raise SparseFormatError(f"{what}: unknown sparse format '{packed.fmt}'; choose one of {', '.join(FORMATS)}")
    values, cols, ptr = packed.tensors()
    if values.dtype != torch.float32 or values.dim() != 1:
        bad(f"values must be a 1-D float32 tensor, got {values.dtype} of shape {tuple(values.shape)}")
    if cols.dtype not in (torch.int16, torch.int32) or cols.dim() != 1:
        bad(f"cols must be a 1-D int16/int32 tensor, got {cols.dtype} of shape {tuple(cols.shape)}")
    if cols.dtype == torch.int16 and packed.in_features > 32767:
        bad("int16 cols cannot address more than 32767 input features")
    if ptr.dtype != torch.int32 or ptr.dim() != 1:
        bad(f"ptr must be a 1-D int32 tensor, got {ptr.dtype} of shape {tuple(ptr.shape)}")
    rows = _GROUP_ROWS.get(packed.fmt, 1)
    if ptr.numel() != -(-packed.out_features // rows) + 1:
        bad(f"ptr has {ptr.numel()} entries, expected {-(-packed.out_features // rows) + 1}")
    if int(ptr[0]) != 0 or bool((ptr[1:] < ptr[:-1]).any()) or int(ptr[-1]) != cols.numel():
        bad(f"ptr must rise from 0 to the number of entries ({cols.numel()})")
    if values.numel() != cols.numel() * packed.values_per_entry:
        bad(f"{values.numel()} values for {cols.numel()} entries of {packed.values_per_entry}")
    width = 4 if packed.fmt == "1x4" else 1
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) > packed.in_features - width):
        bad(f"column indices must lie in [0, {packed.in_features - width}]")
