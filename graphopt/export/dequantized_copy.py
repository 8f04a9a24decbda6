"""Turning a packed module of an export copy (QuantLinear, QuantEmbedding and their subclasses) into one that
computes on its dequantized tensor, which the ONNX exporters can write as a float op for the weight-quant format
to find and replace."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["swap_to_dequantized"]

_CLASSES: dict[tuple[type, type], type] = {}


def _dequantized_class(cls: type, export_base: type) -> type:
    """``export_base`` itself for its packed parent class; for a subclass (QuantPointwiseConv), a class with
    ``export_base`` after it, so the subclass's own forward still runs and reaches it through ``super()``."""
    if export_base.__mro__[1] is cls:
        return export_base
    key = (cls, export_base)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Dequantized{cls.__name__}", (cls, export_base),
                             {"__doc__": f"{cls.__name__} computing on its dequantized tensor (export)"})
    return _CLASSES[key]


def swap_to_dequantized(module: nn.Module, export_base: type, value: torch.Tensor) -> None:
    """In place: ``module``'s class becomes its export form, its packed buffers go (the caller's plan holds them)
    and ``value`` (the dequantized weight or table) becomes its buffer ``dequantized``."""
    module.__class__ = _dequantized_class(type(module), export_base)
    for packed in ("qweight", "scales", "zeros"):
        module._buffers.pop(packed, None)
    module.register_buffer("dequantized", value)
