"""Whether ``graphopt::quant_linear`` beats dense ``F.linear`` for one layer: a cost model, as choose.py is for the
sparse formats.

Time = bytes streamed / bandwidth + multiply-adds / rate + per-call overhead, for one Zen 4 core. The int8 kernels
stream ~1/4 (int8) or ~1/8 (int4) of the fp32 bytes but pay a larger call overhead (the custom op, ctypes, and
quantizing the activations) and a lower rate at large batches, so tiny layers and large-batch prefill of small
layers can be faster in float. Rates are from bench/results/quant_kernels.md. The model assumes weights come from
DRAM, as in a model larger than the last-level cache; a small model whose weights stay in cache runs dense small
layers faster than predicted.
"""

from __future__ import annotations

from dataclasses import dataclass

# one core, weights streamed from DRAM (bench/results/quant_kernels.md, 2026-12-03, and small-layer timings):
# bandwidth (bytes/s), multiply-add rate (MAC/s at batches >= 8), overhead per call and per input row (s)
_DENSE_BW, _QUANT_BW = 16e9, 14e9
_DENSE_MACS = 85e9  # MKL fp32
_QUANT_MACS = 100e9  # VNNI int8 dot products incl. int4 unpacking (AMX, where the CPU has it, is faster)
_DENSE_CALL_S, _QUANT_CALL_S = 4e-6, 18e-6  # the custom op + ctypes call + activation scratch
_QUANT_ROW_S = 0.2e-6  # quantizing one activation row and finishing its outputs


@dataclass(frozen=True)
class QuantCost:
    """Predicted seconds per call of the dense layer and of the quantized kernel."""

    dense_s: float
    quant_s: float

    @property
    def speedup(self) -> float:
        """Dense time over kernel time."""
        return self.dense_s / self.quant_s


def predict(out_features: int, in_features: int, rows: int, bits: int, group_size: int) -> QuantCost:
    """The cost model's prediction for a (out, in) layer called on ``rows`` input rows."""
    macs = rows * out_features * in_features
    dense = _DENSE_CALL_S + max(4 * out_features * in_features / _DENSE_BW, macs / _DENSE_MACS)
    groups = -(-in_features // group_size)
    packed = out_features * in_features * bits / 8 + out_features * groups * 4
    quant = _QUANT_CALL_S + rows * _QUANT_ROW_S + max(packed / _QUANT_BW, macs / _QUANT_MACS)
    return QuantCost(dense, quant)
