"""QDQ ONNX export of a calibrated fake-quant graph, with int8 weights stored as int8.

``export_qdq`` refuses an uncalibrated graph, converts a QAT graph to its folded form, exports through
``graphopt.export_onnx`` (QuantizeLinear/DequantizeLinear pairs, per-channel ``axis`` on weights, onnxsim kept only
when every QDQ node survives), then stores every weight's QuantizeLinear result as an int8 initializer read by its
DequantizeLinear (the file shrinks ~4x; onnxruntime reads the same numbers), and checks onnxruntime's output
against the torch fake-quant output (SQNR and max error).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from graphopt.errors import InputError
from graphopt.inputs import ExampleInputs, flat_outputs
from graphopt.quant.quantizer import quantizers
from graphopt.quant.sensitivity import sqnr_db


@dataclass(frozen=True)
class QdqReport:
    """What export_qdq wrote and how closely onnxruntime follows torch's fake-quant graph."""

    path: str
    file_bytes: int
    quantize_nodes: int
    dequantize_nodes: int
    int8_weights: int  # weights stored as int8 initializers
    sqnr_db: float | None  # onnxruntime vs torch fake-quant, on the example inputs
    max_abs_error: float | None
    simplified: bool

    def __str__(self) -> str:
        check = "not verified" if self.sqnr_db is None else \
            f"onnxruntime vs torch: SQNR {self.sqnr_db:.1f} dB, max abs error {self.max_abs_error:.3g}"
        return (f"{self.path}: {self.file_bytes / 1e6:.3f} MB, {self.quantize_nodes} QuantizeLinear, "
                f"{self.dequantize_nodes} DequantizeLinear, {self.int8_weights} int8 weights; {check}")


def check_calibrated(gm: fx.GraphModule) -> None:
    """InputError naming the first quantizer without frozen scales (export before calibration)."""
    qs = quantizers(gm)
    for name, q in qs.items():
        if not q.calibrated:
            raise InputError(
                f"cannot export: quantizer `{name}` ({q.role} of `{q.layer}`) is not calibrated yet; run the "
                "fake-quant pass with calib_data (graphopt.optimize(model, 'fake-quant', x, calib_data=batches))"
            )


def export_qdq(gm: fx.GraphModule, example_inputs: Any, path: str | os.PathLike, *, opset: int | None = None,
               simplify: bool = True, verify: bool = True) -> QdqReport:
    """Write the calibrated fake-quant graph ``gm`` to ``path`` as QDQ ONNX and check it with onnxruntime."""
    import onnx

    from graphopt.export import export_onnx
    from graphopt.quant.qat import convert

    check_calibrated(gm)
    module = convert(gm)  # a copy in eval mode with simulated BN folds folded; gm itself is untouched
    report = export_onnx(module, example_inputs, path, opset=opset, simplify=simplify, verify=False)
    path = os.fspath(path)
    proto = onnx.load(path)
    stored = store_int8_weights(proto)
    onnx.checker.check_model(proto)
    onnx.save_model(proto, path)
    kinds = [n.op_type for n in proto.graph.node]
    sqnr = err = None
    if verify:
        sqnr, err = compare_with_torch(module, example_inputs, path)
    return QdqReport(path, os.path.getsize(path), kinds.count("QuantizeLinear"), kinds.count("DequantizeLinear"),
                     stored, sqnr, err, report.nodes_simplified is not None)


def compare_with_torch(module: torch.nn.Module, example_inputs: Any, path: str) -> tuple[float, float]:
    """(SQNR dB, max abs error) of onnxruntime on ``path`` against ``module`` on the same inputs."""
    from graphopt.onnx_verify import ort_session

    inputs = ExampleInputs.of(example_inputs)
    with torch.no_grad():
        want = flat_outputs(inputs.call(module))
    session = ort_session(path)
    try:
        feeds = _feeds(session, inputs)
        got = [torch.from_numpy(np.asarray(a)) for a in session.run(None, feeds)]
    finally:
        del session
    err = max(float((g.double() - w.double()).abs().max()) for g, w in zip(got, want) if w.is_floating_point())
    return sqnr_db(want, got), err


def _feeds(session, inputs: ExampleInputs) -> dict[str, np.ndarray]:
    """Match the session's inputs by name (keyword inputs), else by position."""
    names = [i.name for i in session.get_inputs()]
    tensors = dict(inputs.kwargs) if inputs.kwargs else {}
    if tensors and all(n in tensors for n in names):
        return {n: tensors[n].numpy() for n in names}
    flat = inputs.tensors()
    return {n: t.numpy() for n, t in zip(names, flat)}


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


def ort_kernel_counts(path: str, optimized_path: str, threads: int = 1) -> dict[str, int]:
    """Op types of the model onnxruntime actually runs (its optimized graph), e.g. how many QLinearConv."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.optimized_model_filepath = optimized_path
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    del session
    counts: dict[str, int] = {}
    for node in onnx.load(optimized_path).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
