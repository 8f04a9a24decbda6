"""The quantizer module the graph calls: observe during calibration, then quantize->dequantize with frozen scales.

One ``FakeQuantize`` per quantized tensor, registered on the GraphModule and called by a ``call_module`` node.
Its ``state`` says what a call does:

- ``"observe"``: feed the tensor to the observer and return it unchanged (calibration);
- ``"quantize"``: simulate int8 with the frozen ``scale``/``zero_point``. In training mode with grad enabled it
  uses ``torch.fake_quantize_*`` (gradients by the straight-through estimator; LSQ gradients for the scale when
  ``learnable``); otherwise ``quantized_decomposed.quantize_*`` then ``dequantize_*``, which is what the ONNX
  exporter turns into QuantizeLinear/DequantizeLinear pairs;
- ``"off"``: return the tensor unchanged (used by the sensitivity analysis).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn as nn

from graphopt.quant.observers import _EPS, Observer, make_observer, qparams_from_range  # noqa: F401

qd = torch.ops.quantized_decomposed
_RANGES = {"int8": (-128, 127, torch.int8), "uint8": (0, 255, torch.uint8)}


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: integer type, symmetric or not, per-channel axis (None: per tensor), observer;
    ``reduce_range``: 7 bits of the 8 (weights in [-64, 63], see cpu_int8.py for why)."""

    dtype: str = "uint8"
    symmetric: bool = False
    axis: int | None = None
    observer: str = "minmax"
    percentile: float = 99.99
    reduce_range: bool = False

    @property
    def qmin(self) -> int:
        low = _RANGES[self.dtype][0]
        return low // 2 if self.reduce_range else low

    @property
    def qmax(self) -> int:
        high = _RANGES[self.dtype][1]
        return high // 2 if self.reduce_range else high

    @property
    def torch_dtype(self) -> torch.dtype:
        return _RANGES[self.dtype][2]


class FakeQuantize(nn.Module):
    """Simulated quantization of one tensor (see the module docstring for its states)."""

    def __init__(self, spec: QuantSpec, role: str, layer: str):
        super().__init__()
        self.spec, self.role, self.layer = spec, role, layer  # role: "weight" or "activation"
        self.state = "observe"
        self.learnable = False
        self.observer: Observer | None = make_observer(spec.observer, spec.axis, spec.percentile)
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))
        self._scale_value, self._zp_value = 1.0, 0  # per-tensor qparams as Python numbers (export constants)

    @property
    def calibrated(self) -> bool:
        """True once scales are frozen."""
        return self.state in ("quantize", "off")

    def freeze(self) -> None:
        """Turn what the observer saw into scale and zero point, and start quantizing."""
        if self.observer is None or self.observer.low is None:
            raise RuntimeError(f"{self.role} quantizer of `{self.layer}` saw no data during calibration")
        low, high = self.observer.range(self.spec.qmin, self.spec.qmax, self.spec.symmetric)
        scale, zero_point = qparams_from_range(low, high, self.spec.qmin, self.spec.qmax, self.spec.symmetric)
        self.set_qparams(scale, zero_point)
        self.observer = None
        self.state = "quantize"

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Store new frozen qparams (tensors shaped (C,) per channel, scalars per tensor)."""
        scale, zero_point = scale.detach().reshape(-1).clone(), zero_point.detach().reshape(-1).to(torch.int32)
        if isinstance(self.scale, nn.Parameter):
            self.scale = nn.Parameter(scale, requires_grad=self.scale.requires_grad)
        else:
            self.scale = scale
        self.zero_point = zero_point
        self.sync()

    def sync(self) -> None:
        """Copy the per-tensor qparams into Python numbers (after training a learnable scale)."""
        if self.spec.axis is None:
            self._scale_value = max(float(self.scale.detach().reshape(-1)[0]), _EPS)
            self._zp_value = int(self.zero_point.reshape(-1)[0])

    def make_learnable(self) -> None:
        """Train the scale by LSQ (gradient of the rounding error w.r.t. the scale)."""
        self.learnable = True
        self.scale = nn.Parameter(self.scale.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state == "off":
            return x
        if self.state == "observe":
            if self.observer is not None and not _is_fake(x):
                self.observer.update(x)
            return x
        if self.training and torch.is_grad_enabled():
            return self._fake_quantize(x)
        return self._quantize_dequantize(x)

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        s, q0, q1 = self.spec, self.spec.qmin, self.spec.qmax
        if self.learnable:
            grad = 1.0 / (x.numel() / (x.shape[s.axis] if s.axis is not None else 1) * q1) ** 0.5  # LSQ's g
            zp = self.zero_point.float()
            if s.axis is None:
                return torch._fake_quantize_learnable_per_tensor_affine(x, self.scale, zp, q0, q1, grad)
            return torch._fake_quantize_learnable_per_channel_affine(x, self.scale, zp, s.axis, q0, q1, grad)
        if self.role == "weight":  # weights move while training: their scale follows them (no grad through it)
            low, high = _weight_range(x.detach(), s.axis)
            self.set_qparams(*qparams_from_range(low, high, q0, q1, s.symmetric))
        if s.axis is None:
            return torch.fake_quantize_per_tensor_affine(x, self._scale_value, self._zp_value, q0, q1)
        return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, s.axis, q0, q1)

    def _quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.axis is None:
            q = qd.quantize_per_tensor(x, self._scale_value, self._zp_value, s.qmin, s.qmax, s.torch_dtype)
            return qd.dequantize_per_tensor(q, self._scale_value, self._zp_value, s.qmin, s.qmax, s.torch_dtype)
        scale = self.scale.detach()
        q = qd.quantize_per_channel(x, scale, self.zero_point, s.axis, s.qmin, s.qmax, s.torch_dtype)
        return qd.dequantize_per_channel(q, scale, self.zero_point, s.axis, s.qmin, s.qmax, s.torch_dtype)

    def extra_repr(self) -> str:
        where = "per-tensor" if self.spec.axis is None else f"per-channel axis {self.spec.axis}"
        return f"{self.role} of {self.layer}: {self.spec.dtype} {where}, {self.state}"


def _weight_range(w: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if axis is None:
        return w.min(), w.max()
    flat = w.transpose(0, axis).reshape(w.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def _is_fake(x: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor)


def quantizers(gm: nn.Module) -> dict[str, FakeQuantize]:
    """Every FakeQuantize of a module by qualified name."""
    return {name: m for name, m in gm.named_modules() if isinstance(m, FakeQuantize)}
