"""Weight-only int4/int8 storage: the quantization grid, and the packed layout the C kernels stream.

A quantized weight W (out_features N x in_features K) is held as unsigned codes q with, per output row n and
group g of ``group_size`` consecutive inputs, a float scale s[n, g] and an integer zero point z[n, g]:
W[n, k] ≈ s[n, g(k)] · (q[n, k] - z[n, g(k)]), q in [0, 2^bits - 1]. Symmetric weights use z = 2^(bits-1)
everywhere (8 for int4, 128 for int8) and store no zeros. ``group_size=None`` means one group per row
(per-channel).

Packed layout (what ``graphopt::quant_linear`` reads), built for a GEMV that never reduces horizontally: rows in
tiles of 16 (N padded to Np, padding rows have scale 0), inputs padded to Kp (a multiple of the group, padding
codes equal the zero point, so they add nothing):

* ``qweight`` uint8 (Np/16, Kp/4, 64) for int8: chunk [t, u] holds q[16t + l, 4u + j] at byte 4l + j, so one
  64-byte load feeds ``vpdpbusd`` 16 rows x 4 inputs against 4 broadcast activation bytes;
  (Np/16, Kp/8, 64) for int4: byte 4l + j of chunk [t, u] holds q[16t + l, 8u + j] in its low nibble and
  q[16t + l, 8u + 4 + j] in its high nibble (two such int8 chunks after ``& 0xF`` and ``>> 4``);
* ``scales`` float32 (Np/16, G, 16): s[16t + l, g] at [t, g, l], read as one vector per tile and group;
* ``zeros`` uint8 (Np/16, G, 16) the same way, or an empty tensor for symmetric weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphopt.errors import InputError

__all__ = ["BITS", "TILE", "QuantizedWeight", "act_group_for", "check_bits_and_group", "dequantize", "grid_params", "pack_quantized",
           "padded_in_features", "quantize_rtn", "quantize_to_grid", "unpack_codes"]

BITS = (4, 8)
TILE = 16  # output rows per packed tile
_K_UNIT = 32  # group sizes (and the padded K of a per-channel weight) are multiples of this


@dataclass(frozen=True)
class QuantizedWeight:
    """A packed int4/int8 weight (see the module docstring for the layout)."""

    bits: int
    group_size: int  # inputs per group in the packed (padded) K; equals padded K for a per-channel weight
    in_features: int
    out_features: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor  # empty for symmetric weights

    @property
    def symmetric(self) -> bool:
        """True when every zero point is 2^(bits-1) (none stored)."""
        return self.zeros.numel() == 0

    @property
    def padded_in_features(self) -> int:
        """Kp: K padded to a multiple of the group."""
        return self.qweight.shape[1] * (4 if self.bits == 8 else 8)

    @property
    def groups(self) -> int:
        """G: groups per row."""
        return self.scales.shape[1]

    def nbytes(self) -> int:
        """Bytes of the packed tensors (what a GEMV streams)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))


def check_bits_and_group(bits: int, group_size: int | None, layer: str = "weight") -> None:
    """InputError naming ``layer`` for bits other than 4/8 or a group size that is not a positive multiple of 32."""
    if bits not in BITS:
        raise InputError(f"layer {layer!r}: weight-only quantization supports bits=4 or bits=8, got {bits!r}")
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool)
                                   or group_size <= 0 or group_size % _K_UNIT):
        raise InputError(f"layer {layer!r}: group_size must be a positive multiple of {_K_UNIT} (32, 64, 128, ...) "
                         f"or None for one group per output channel, got {group_size!r}")


def padded_in_features(in_features: int, group_size: int | None) -> int:
    """Kp for ``in_features`` inputs in groups of ``group_size`` (None: per-channel, K rounded up to 32)."""
    unit = _K_UNIT if group_size is None else group_size
    return -(-in_features // unit) * unit


def act_group_for(group_size: int) -> int:
    """The activation block of the int8-compute kernels for a weight group: the largest of 128/64/32 dividing it
    (activations are quantized to int8 per row and block at run time, with their own scale)."""
    return next(a for a in (128, 64, 32) if group_size % a == 0)


def grid_params(w: torch.Tensor, bits: int, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) over the last dim of ``w`` (..., g): symmetric s = max|w| / (2^(b-1) - 1), z = 2^(b-1);
    asymmetric s = (max - min) / (2^b - 1) with min/max widened to include 0, z = round(-min / s).
    An all-zero group gets s = 1 (any scale represents it)."""
    w = w.float()
    maxq = 2 ** bits - 1
    if symmetric:
        scale = w.abs().amax(-1) / (2 ** (bits - 1) - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-lo / scale).clamp(0, maxq)


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes round(w / s) + z clamped to [0, 2^bits - 1], as float (broadcasting ``scale``/``zero`` against w)."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2 ** bits - 1)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int | None = 128, symmetric: bool = True,
                 layer: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (codes uint8 (N, K), scales float32 (N, G), zeros uint8 (N, G)) of ``weight`` (N, K).
    The last group of a row may be shorter than ``group_size`` (K not a multiple of it)."""
    check_bits_and_group(bits, group_size, layer)
    n, k = weight.shape
    g = k if group_size is None else group_size
    groups = -(-k // g)
    w = torch.zeros(n, groups * g, dtype=torch.float32)
    w[:, :k] = weight.detach().float()
    blocks = w.view(n, groups, g)
    # the zero padding of a ragged last group never widens a symmetric range and lies inside an asymmetric one
    scale, zero = grid_params(blocks, bits, symmetric)
    codes = quantize_to_grid(blocks, scale[..., None], zero[..., None], bits).view(n, -1)[:, :k]
    return codes.to(torch.uint8), scale, zero.to(torch.uint8)


def pack_quantized(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                   group_size: int | None, layer: str = "weight") -> QuantizedWeight:
    """The packed QuantizedWeight of codes (N, K) in [0, 2^bits), scales (N, G), zeros (N, G) or None/empty for
    symmetric (z = 2^(bits-1)), with G = ceil(K / group_size) (1 for ``group_size=None``)."""
    check_bits_and_group(bits, group_size, layer)
    n, k = codes.shape
    groups = 1 if group_size is None else -(-k // group_size)
    if tuple(scales.shape) != (n, groups):
        raise InputError(f"layer {layer!r}: scales must be ({n}, {groups}) for a ({n}, {k}) weight in groups of "
                         f"{group_size}, got {tuple(scales.shape)}")
    symmetric = zeros is None or zeros.numel() == 0
    if not symmetric and tuple(zeros.shape) != (n, groups):
        raise InputError(f"layer {layer!r}: zeros must be ({n}, {groups}) like the scales, got {tuple(zeros.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 2 ** bits - 1):
        raise InputError(f"layer {layer!r}: codes must lie in [0, {2 ** bits - 1}] for bits={bits}")
    kp = padded_in_features(k, group_size)
    g = kp if group_size is None else group_size
    np_ = -(-n // TILE) * TILE
    z_rows = torch.full((n, groups), 2 ** (bits - 1), dtype=torch.uint8) if symmetric else zeros.to(torch.uint8)
    z_full = torch.full((np_, groups), 2 ** (bits - 1), dtype=torch.uint8)
    z_full[:n] = z_rows
    q = z_full.repeat_interleave(g, dim=1)[:, :kp].clone()  # padding codes = the zero point: they add nothing
    q[:n, :k] = codes.to(torch.uint8)
    s = torch.zeros(np_, groups, dtype=torch.float32)  # padding rows: scale 0
    s[:n] = scales.float()
    return QuantizedWeight(bits, g, k, n, _pack_codes(q, bits), _tiles(s),
                           torch.empty(0, dtype=torch.uint8) if symmetric else _tiles(z_full))


def _tiles(per_row: torch.Tensor) -> torch.Tensor:
    """(Np, G) -> (Np/16, G, 16)."""
    np_, groups = per_row.shape
    return per_row.view(np_ // TILE, TILE, groups).permute(0, 2, 1).contiguous()


def _untile(tiled: torch.Tensor, rows: int) -> torch.Tensor:
    """(Np/16, G, 16) -> (rows, G)."""
    t, groups, _ = tiled.shape
    return tiled.permute(0, 2, 1).reshape(t * TILE, groups)[:rows]


def _pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    np_, kp = q.shape
    t = np_ // TILE
    if bits == 8:
        return q.view(t, TILE, kp // 4, 4).permute(0, 2, 1, 3).reshape(t, kp // 4, 64).contiguous()
    halves = q.view(t, TILE, kp // 8, 2, 4).permute(0, 2, 3, 1, 4)  # (t, u, low/high, lane, j)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(t, kp // 8, 64).contiguous()


def _unpack_all_codes(qw: QuantizedWeight) -> torch.Tensor:
    """Codes (Np, Kp) uint8, padding included."""
    t, units, _ = qw.qweight.shape
    if qw.bits == 8:
        return qw.qweight.view(t, units, TILE, 4).permute(0, 2, 1, 3).reshape(t * TILE, units * 4)
    b = qw.qweight.view(t, units, TILE, 4)
    halves = torch.stack((b & 0xF, b >> 4), dim=2)  # (t, u, low/high, lane, j)
    return halves.permute(0, 3, 1, 2, 4).reshape(t * TILE, units * 8)


def unpack_codes(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (N, K), scales float32 (N, G), zeros uint8 (N, G)): the inverse of ``pack_quantized``
    (zeros are 2^(bits-1) everywhere for a symmetric weight)."""
    n, k = qw.out_features, qw.in_features
    codes = _unpack_all_codes(qw)[:n, :k].contiguous()
    scales = _untile(qw.scales, n).contiguous()
    zeros = (torch.full_like(scales, 2 ** (qw.bits - 1), dtype=torch.uint8) if qw.symmetric
             else _untile(qw.zeros, n).contiguous())
    return codes, scales, zeros


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The float32 weight (N, K) the codes stand for: s · (q - z)."""
    codes, scales, zeros = unpack_codes(qw)
    g = qw.group_size
    s = scales.repeat_interleave(g, dim=1)[:, :qw.in_features]
    z = zeros.float().repeat_interleave(g, dim=1)[:, :qw.in_features]
    return s * (codes.float() - z)
