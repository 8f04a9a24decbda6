"""Gradients through ``graphopt::quant_linear``, so a weight-quantized model still trains in the user's loop: the
float layers around the quantized ones (a head, adapters, norms) and the quantized layers' biases get gradients.

The codes are integers and get none. The gradient with respect to x is that of the dequantized weight
(dL/dx = dL/dy · W), also for int8 compute, where rounding the activations is treated as the identity (the
straight-through estimator); the bias gets the sum of dL/dy over the rows.
"""

from __future__ import annotations

import torch

from graphopt.kernels import quant_ops  # noqa: F401  (defines the op first)
from graphopt.kernels.quant_format import dequantize
from graphopt.kernels.quant_ops import weight_of


def _setup_context(ctx, inputs, output) -> None:
    x, qweight, scales, zeros, bias, bits, group_size, _act, in_features, out_features, _threads = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.settings = (bits, group_size, in_features, out_features)
    ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None


def _backward(ctx, grad):
    qweight, scales, zeros = ctx.saved_tensors
    bits, group_size, in_features, out_features = ctx.settings
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = dequantize(weight_of(qweight, scales, zeros, bits, group_size, in_features, out_features))
        grad_x = (grad.float() @ w).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.float().reshape(-1, out_features).sum(0)
    return grad_x, None, None, None, grad_bias, None, None, None, None, None, None


torch.library.register_autograd("graphopt::quant_linear", _backward, setup_context=_setup_context)
