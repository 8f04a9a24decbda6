"""Whether ``graphopt::quant_linear`` beats dense ``F.linear`` for one layer: a cost model, as choose.py is for the
sparse formats.

Time = bytes streamed / bandwidth + multiply-adds / rate + per-call overhead, for one Zen 4 core. The int8 kernels
stream ~1/4 (int8) or ~1/8 (int4) of the fp32 bytes but pay a larger call overhead (the custom op, ctypes, and
quantizing the activations) and a lower rate at large batches, so tiny layers and large-batch prefill of small
layers can be faster in float. Rates are from bench/results/quant_kernels.md and FACTS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

# one core: streaming bandwidth (bytes/s), multiply-add rate (MAC/s at batch >= 8), overhead per call (s)
_DENSE_BW, _QUANT_BW = 13e9, 18e9
_DENSE_MACS = 30e9  # MKL fp32, ~60 GFLOP/s
_QUANT_MACS = {4: 60e9, 8: 70e9}  # VNNI int8 dot products incl. int4 unpacking
_DENSE_CALL_S, _QUANT_CALL_S = 4e-6, 15e-6
_ACT_QUANT_S = 0.5e-9  # per activation element: scale, round, sum


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
    quant = (_QUANT_CALL_S + rows * in_features * _ACT_QUANT_S
             + max(packed / _QUANT_BW, macs / _QUANT_MACS[bits]))
    return QuantCost(dense, quant)
