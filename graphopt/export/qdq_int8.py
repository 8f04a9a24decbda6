"""The QDQ int8 export format of a calibrated fake-quant graph: ``export_onnx`` uses it for any module with
quantizers (graphopt/export/formats.py).

Before export it refuses an uncalibrated graph and converts a QAT graph to its folded form; the exporter writes
QuantizeLinear/DequantizeLinear pairs (per-channel ``axis`` on weights; onnxsim is kept only when every QDQ node
survives); after it every weight's QuantizeLinear result is stored as an int8 initializer read by its
DequantizeLinear (the file shrinks ~4x; onnxruntime reads the same numbers). onnxruntime's int8 kernels round
differently from the simulation, so the file is judged by SQNR and top-1 agreement, not elementwise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from graphopt.errors import InputError
from graphopt.export.formats import ExportFormat, register_format
from graphopt.export.onnx_verify import ort_kernel_counts  # noqa: F401  (its old home; re-exported by graphopt.quant)
from graphopt.quant.quantizer import quantizers


def check_calibrated(gm: fx.GraphModule) -> None:
    """InputError naming the first quantizer without frozen scales (export before calibration)."""
    qs = quantizers(gm)
    for name, q in qs.items():
        if not q.calibrated:
            raise InputError(
                f"cannot export: quantizer `{name}` ({q.role} of `{q.layer}`) is not calibrated yet; run the "
                "fake-quant pass with calib_data (graphopt.optimize(model, 'fake-quant', x, calib_data=batches))"
            )


def _prepare(module: torch.nn.Module) -> torch.nn.Module:
    from graphopt.quant.qat import convert

    check_calibrated(module)
    return convert(module)  # a copy in eval mode with simulated BN folds folded; the module itself is untouched


def _rewrite(proto, prepared: torch.nn.Module) -> dict:
    return {"int8_weights": store_int8_weights(proto)}


QDQ = register_format(ExportFormat(
    "qdq-int8", applies=lambda module: isinstance(module, fx.GraphModule) and bool(quantizers(module)),
    prepare=_prepare, rewrite=_rewrite, check="sqnr"))  # QDQ pairs, int8 weight initializers, judged by SQNR


def store_int8_weights(proto) -> int:
    """Replace ``QuantizeLinear(float initializer)`` (and a Clip after it) by its int8 result as an initializer;
    returns how many weights were converted. DequantizeLinear nodes stay, so the graph is still QDQ."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    remove, converted = [], 0
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or not all(n in inits for n in node.input[:3]) or len(node.input) < 3:
            continue
        x, scale, zp = (numpy_helper.to_array(inits[n]) for n in node.input[:3])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        q = _quantize(x, scale, zp, axis)
        out, dropped = node.output[0], [node]
        users = consumers.get(out, [])
        if len(users) == 1 and users[0].op_type == "Clip" and all(n in inits for n in users[0].input[1:3]):
            clip = users[0]
            q = np.clip(q, *(numpy_helper.to_array(inits[n]) for n in clip.input[1:3])).astype(q.dtype)
            out, dropped = clip.output[0], [node, clip]
        graph.initializer.append(numpy_helper.from_array(q, name=out))
        remove += dropped
        converted += 1
    for node in remove:
        graph.node.remove(node)
    _drop_unused_initializers(graph)
    return converted


def _quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear semantics: saturate(round_half_to_even(x / scale) + zero_point)."""
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    info = np.iinfo(zp.dtype)
    q = np.rint(x.astype(np.float32) / scale.astype(np.float32)) + zp.astype(np.int32)
    return np.clip(q, info.min, info.max).astype(zp.dtype)


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
