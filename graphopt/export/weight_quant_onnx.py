"""One packed int4/int8 layer (graphopt/kernels/quant_format.py) as onnxruntime's integer ops.

Which op, from the layer's ``act_group`` (the arithmetic of ``graphopt::quant_linear``):

* per-token dynamic int8 (``act_group == group_size == padded K``): com.microsoft ``DynamicQuantizeMatMul`` with
  the codes as int8 (K, N) and per-column scales. onnxruntime quantizes the activations per tensor (uint8, one
  scale and zero point per call), not per token as torch does, so results differ by a rounding (~40 dB SQNR on
  Gaussian inputs). Written fused rather than as DynamicQuantizeLinear + MatMulInteger: onnxruntime fuses that
  pair into the same kernel only when nothing else reads the quantized activations, and it runs a hand-written
  per-token form (ReduceMax, Div, QuantizeLinear, MatMulInteger) wrongly after its MatMulIntegerToFloat fusion
  (5.9 dB measured on onnxruntime 1.32) and 35x slower.
* everything else: com.microsoft ``MatMulNBits``; ``accuracy_level`` 4 (int8 activations per block of
  ``block_size``, int32 sums) when ``act_group > 0``, 0 (float) otherwise.

MatMulNBits facts this relies on (onnxruntime's contrib_ops/cpu/quantization/matmul_nbits{.cc,_helper.h} and
mlas/lib/qnbitgemm.cpp, checked on onnxruntime 1.32): bits 2, 4 or 8; ``block_size`` a power of two >= 16;
B uint8 (N, ceil(K / block_size), block_size * bits / 8) with codes packed low nibble first along K, the last
block padded when K is not a multiple; scales (N * blocks); zero points uint8, two 4-bit ones per byte, each row
starting on a byte ((N, ceil(blocks * bits / 8))), omitted meaning 2^(bits-1), which is graphopt's symmetric
zero; an optional bias (N). MLAS has no float-compute kernel for 8-bit weights: at ``accuracy_level`` 0 it
dequantizes the whole weight on every call (18x slower than fp32 at 2048x2048, measured), hence the warning.

Group sizes that are not a power of two are no obstacle: a group of 96 is three blocks of 32 with the same scale
and zero point (a per-channel weight likewise), which is exact. With int8 compute the block must be the
activation block itself, so that onnxruntime quantizes activations where torch does; an ``act_group`` that is not
a power of two >= 16 has no such block and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from graphopt.errors import InputError
from graphopt.kernels.quant_format import QuantizedWeight, unpack_codes

MS_DOMAIN = "com.microsoft"
NBITS = "MatMulNBits"
DYNAMIC = "DynamicQuantizeMatMul"
_MAX_FLOAT_BLOCK = 256  # the largest block MLAS has kernels for (qnbitgemm.cpp); larger ones only repeat scales


@dataclass(frozen=True)
class LayerOp:
    """The ONNX op one layer becomes: ``op`` with its ``block_size`` and ``accuracy_level`` (MatMulNBits only)."""

    op: Literal["MatMulNBits", "DynamicQuantizeMatMul"]
    block_size: int = 0
    accuracy_level: int = 0


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def choose_op(layer: str, qw: QuantizedWeight, act_group: int) -> LayerOp:
    """The op for a layer of weight ``qw`` computed with ``act_group``; InputError naming ``layer`` when
    onnxruntime has no kernel that computes what the layer does."""
    kp = qw.padded_in_features
    if act_group == kp:  # then group_size == Kp too (act_group divides it): per-channel weight, per-token input
        return LayerOp(DYNAMIC)
    if act_group == 0:
        largest = qw.group_size & -qw.group_size  # the largest power of two dividing the group (>= 32)
        return LayerOp(NBITS, min(largest, _MAX_FLOAT_BLOCK), 0)
    if not _power_of_two(act_group) or act_group < 16:
        per_token = (f", or act_group={kp} (its padded in_features) for per-token dynamic int8"
                     if qw.group_size == kp else "")
        raise InputError(
            f"layer {layer!r}: act_group={act_group} (int8 activations in blocks of {act_group} inputs) has no "
            "onnxruntime kernel: MatMulNBits quantizes activations per block_size, a power of two >= 16. "
            f"Re-quantize it with act_group=32, 64 or 128 dividing its group_size={qw.group_size} "
            f"(QuantLinear.from_linear(..., act_group=None) picks one), or act_group=0 for float compute{per_token}")
    return LayerOp(NBITS, act_group, 4)


class LayerTensors:
    """The initializers and the node of one layer as ``op`` (built once, read by every MatMul of the layer)."""

    def __init__(self, name: str, qw: QuantizedWeight, op: LayerOp):
        self.name, self.qw, self.op = name, qw, op
        codes, scales, zeros = (t.numpy() for t in unpack_codes(qw))
        if op.op == DYNAMIC:
            self.initializers, self._inputs = _dynamic_tensors(name, qw, codes, scales[:, 0], zeros[:, 0])
        else:
            self.initializers, self._inputs = _nbits_tensors(name, qw, op.block_size, codes, scales, zeros)

    def node(self, a: str, out: str, bias: str | None):
        """The NodeProto computing ``out = a Wᵀ (+ bias)``."""
        from onnx import helper

        qw = self.qw
        if self.op.op == DYNAMIC:
            inputs = [a, *self._inputs]
            if bias:
                inputs += [""] * (4 - len(inputs)) + [bias]  # b_zero_point sits before bias
            return helper.make_node(DYNAMIC, inputs, [out], name=f"{self.name}/{DYNAMIC}", domain=MS_DOMAIN)
        inputs = [a, *self._inputs]
        if bias:
            inputs += [""] * (5 - len(inputs)) + [bias]  # zero_points and g_idx sit before bias
        return helper.make_node(NBITS, inputs, [out], name=f"{self.name}/{NBITS}", domain=MS_DOMAIN,
                                K=qw.in_features, N=qw.out_features, bits=qw.bits, block_size=self.op.block_size,
                                accuracy_level=self.op.accuracy_level)


def _nbits_tensors(name: str, qw: QuantizedWeight, block: int, codes: np.ndarray, scales: np.ndarray,
                   zeros: np.ndarray):
    """MatMulNBits' B, scales and (asymmetric only) zero_points for blocks of ``block`` inputs."""
    from onnx import numpy_helper

    n, k = codes.shape
    blocks = -(-k // block)
    per_group = qw.group_size // block  # blocks of one group: they share its scale and zero point
    block_scales = np.repeat(scales, per_group, axis=1)[:, :blocks].astype(np.float32)
    block_zeros = np.repeat(zeros, per_group, axis=1)[:, :blocks].astype(np.uint8)
    # padding codes equal their block's zero point: they dequantize to 0 whatever onnxruntime does with them
    full = np.repeat(block_zeros, block, axis=1)
    full[:, :k] = codes
    if qw.bits == 8:
        b = full.reshape(n, blocks, block)
    else:
        pairs = full.reshape(n, blocks, block // 2, 2)
        b = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    tensors = [numpy_helper.from_array(np.ascontiguousarray(b), f"{name}.B"),
               numpy_helper.from_array(block_scales.reshape(-1), f"{name}.scales")]
    if not qw.symmetric:  # omitted zero points mean 2^(bits-1): exactly graphopt's symmetric zero
        if qw.bits == 4:
            padded = np.zeros((n, -(-blocks // 2) * 2), np.uint8)
            padded[:, :blocks] = block_zeros
            block_zeros = padded[:, 0::2] | (padded[:, 1::2] << 4)
        tensors.append(numpy_helper.from_array(np.ascontiguousarray(block_zeros).reshape(-1), f"{name}.zero_points"))
    return tensors, [t.name for t in tensors]


def _dynamic_tensors(name: str, qw: QuantizedWeight, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray):
    """DynamicQuantizeMatMul's B (K, N), b_scale (N) and, for asymmetric int8 only, b_zero_point (N)."""
    from onnx import numpy_helper

    centered = codes.astype(np.int16) - zeros[:, None].astype(np.int16)
    tensors = []
    if qw.bits == 4 or qw.symmetric:  # codes - zero fits int8: [-128, 127] symmetric, [-15, 15] for int4
        tensors.append(numpy_helper.from_array(np.ascontiguousarray(centered.T.astype(np.int8)), f"{name}.B"))
        tensors.append(numpy_helper.from_array(scales.astype(np.float32), f"{name}.b_scale"))
    else:  # asymmetric int8: the codes stay uint8 with their per-column zero points
        tensors.append(numpy_helper.from_array(np.ascontiguousarray(codes.T), f"{name}.B"))
        tensors.append(numpy_helper.from_array(scales.astype(np.float32), f"{name}.b_scale"))
        tensors.append(numpy_helper.from_array(zeros.astype(np.uint8), f"{name}.b_zero_point"))
    return tensors, [t.name for t in tensors]


def dequantized_numpy(w: torch.Tensor) -> np.ndarray:
    """The float32 (N, K) array a dequantized weight becomes in the exported file."""
    return np.ascontiguousarray(w.detach().to(torch.float32).cpu().numpy())
