"""Check an exported ONNX model against the torch module it came from, with onnxruntime.

The check runs the model's example inputs and, when the batch is dynamic, a second batch size: floats are fresh
random values of the same mean and spread, integer inputs (token ids, masks) repeat their rows, so they stay valid.
Only one onnxruntime session lives at a time (an idle session keeps a spinning worker thread; see FACTS.md).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from graphopt.errors import VerifyError


class BatchSizeError(VerifyError):
    """The file, or the torch module itself, fails at the second batch size: the batch is not really dynamic."""

    module_refuses = False  # True: torch itself fails at that batch, so no exporter can keep the batch dynamic


@dataclass(frozen=True)
class OutputError:
    """The largest disagreement between onnxruntime and torch on one output."""

    name: str
    max_abs: float
    max_rel: float
    within_tolerance: bool


def ort_session(path: str, threads: int = 1):
    """An onnxruntime CPU session on ``path`` with a fixed thread count and no spinning between runs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # e.g. an op or opset this onnxruntime does not implement
        raise VerifyError(f"onnxruntime cannot load '{path}': {str(e).splitlines()[0]}; try another opset=... or "
                          "exporter, or export with verify=False to use the file with another runtime") from e


def run_ort(session, input_names: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Run ``session`` on ``tensors`` fed to ``input_names`` in order; every output, in graph order."""
    feeds = {name: t.detach().cpu().numpy() for name, t in zip(input_names, tensors)}
    try:
        return session.run(None, feeds)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidArgument types
        shapes = ", ".join(f"{n}={tuple(t.shape)}" for n, t in zip(input_names, tensors))
        raise VerifyError(
            f"onnxruntime could not run the exported model on {shapes}: {str(e).splitlines()[0]}; if only the second "
            "batch size fails, the export fixed the batch: export with dynamic_batch=False, or try the other exporter"
        ) from e


def compare(names: Sequence[str], got: Sequence[np.ndarray], want: Sequence[torch.Tensor],
            rtol: float, atol: float, batch: int) -> list[OutputError]:
    """Per output: max abs and rel error of ``got`` (onnxruntime) against ``want`` (torch)."""
    if len(got) != len(want):
        raise VerifyError(f"the ONNX model returns {len(got)} outputs, the torch module {len(want)}; "
                          "re-export with verify=False to inspect the file")
    errors = []
    for name, g, w in zip(names, got, want):
        w = w.detach().cpu().numpy()
        if g.shape != w.shape:
            raise VerifyError(
                f"ONNX output `{name}` has shape {tuple(g.shape)}, torch {tuple(w.shape)} at batch {batch}; the "
                "export fixed a dimension (often the batch, read as a Python int somewhere): export with "
                "dynamic_batch=False, or with example inputs of the shape you serve")
        g64, w64 = g.astype(np.float64), w.astype(np.float64)
        diff = np.abs(g64 - w64)
        if diff.size == 0:
            errors.append(OutputError(name, 0.0, 0.0, True))
            continue
        both_nan = np.isnan(g64) & np.isnan(w64)
        diff = np.where(both_nan, 0.0, diff)  # NaN where torch has NaN too is agreement
        bad = ~(diff <= atol + rtol * np.abs(w64))
        rel = diff / np.maximum(np.abs(w64), np.finfo(np.float32).tiny)
        errors.append(OutputError(name, _finite_max(diff), _finite_max(rel), not bad.any()))
    return errors


def _finite_max(a: np.ndarray) -> float:
    return float(np.nanmax(a)) if a.size else 0.0


def raise_if_disagrees(errors: Sequence[OutputError], batch: int, rtol: float, atol: float) -> None:
    """A VerifyError naming the output with the largest error, when any output is beyond tolerance."""
    bad = [e for e in errors if not e.within_tolerance]
    if not bad:
        return
    worst = max(bad, key=lambda e: e.max_abs if math.isfinite(e.max_abs) else math.inf)
    raise VerifyError(
        f"onnxruntime disagrees with torch on output `{worst.name}` at batch {batch}: max abs error "
        f"{worst.max_abs:.3g}, max rel error {worst.max_rel:.3g} (tolerance rtol={rtol:g}, atol={atol:g}); "
        "an exporter or onnxsim rewrite changed the numbers: retry with simplify=False, then exporter='legacy', "
        "or raise rtol/atol if the difference is expected (e.g. quantized rounding)"
    )


def other_batch(tensors: Sequence[torch.Tensor], batched: Sequence[bool], batch: int,
                seed: int = 0) -> list[torch.Tensor]:
    """The same inputs with batch size ``batch`` on the tensors flagged in ``batched``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t, is_batched in zip(tensors, batched):
        if not is_batched:
            out.append(t)
        elif t.is_floating_point():
            std, mean = (t.float().std(), t.float().mean()) if t.numel() > 1 else (torch.tensor(1.0), t.float().mean())
            noise = torch.randn((batch, *t.shape[1:]), generator=gen)
            out.append((noise * std + mean).to(t.dtype))
        else:  # token ids, masks, indices: repeat real rows so every value stays valid
            out.append(t[torch.arange(batch) % t.shape[0]])
    return out


def signal_to_noise(got: Sequence[np.ndarray], want: Sequence[torch.Tensor]) -> float:
    """10*log10(sum want^2 / sum (got - want)^2) over every float output, in dB (inf when equal)."""
    signal = noise = 0.0
    for g, w in zip(got, want):
        if not w.is_floating_point():
            continue
        w64 = w.detach().cpu().numpy().astype(np.float64)
        signal += float(np.square(w64).sum())
        noise += float(np.square(g.astype(np.float64) - w64).sum())
    if noise == 0.0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


def top1_agreement(got: Sequence[np.ndarray], want: Sequence[torch.Tensor]) -> float | None:
    """Share of rows where onnxruntime and torch pick the same class (argmax over the last dim), over the float
    outputs with more than one class; None when no output has classes."""
    same = total = 0
    for g, w in zip(got, want):
        if not w.is_floating_point() or w.dim() < 2 or w.shape[-1] < 2:
            continue
        a = np.argmax(g.reshape(-1, g.shape[-1]), axis=1)
        b = w.detach().reshape(-1, w.shape[-1]).argmax(dim=1).cpu().numpy()
        same += int((a == b).sum())
        total += a.size
    return same / total if total else None


def raise_if_noisy(sqnr: float, batch: int, min_sqnr: float) -> None:
    """A VerifyError when onnxruntime's quantized kernels drift from the torch simulation by more than allowed."""
    if sqnr < min_sqnr:
        raise VerifyError(
            f"onnxruntime's quantized result follows torch at only {sqnr:.1f} dB SQNR at batch {batch} "
            f"(min_sqnr={min_sqnr:g} dB): its integer kernels compute something else than torch. A fake-quant graph "
            "on an x86 CPU without VNNI: quantize with fake-quant:reduce_range=true; a dynamic-quant model: "
            "onnxruntime quantizes activations per tensor (graphopt per token), which outlier activations make "
            "noisy: use quantize-weights:bits=8 instead; otherwise retry with simplify=False, or lower min_sqnr if "
            "the drift is expected"
        )


# onnxruntime ops that compute in integers (what a quantized export is for)
INTEGER_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger", "QGemm", "QLinearAdd",
    "QLinearMul", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSigmoid",
    "QLinearLeakyRelu", "QLinearSoftmax", "QLinearWhere", "DynamicQuantizeMatMul", "MatMulNBits", "QAttention",
    "QEmbedLayerNormalization", "QOrderedMatMul",
})


def ort_kernel_counts(path: str, optimized_path: str, threads: int = 1) -> dict[str, int]:
    """Op types of the model onnxruntime actually runs (its optimized graph, written to ``optimized_path``)."""
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


def integer_kernel_count(path: str) -> int:
    """How many integer kernels onnxruntime runs for the file at ``path`` (see INTEGER_KERNELS)."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        counts = ort_kernel_counts(path, os.path.join(folder, "optimized.onnx"))
    return sum(n for op, n in counts.items() if op in INTEGER_KERNELS)


def verify_file(path: str, flat, batched: Sequence[bool], check: str, rtol: float, atol: float,
                min_sqnr: float | None, truth=None):
    """Run the written file in onnxruntime on the example batch and, if dynamic, on batch + 1 (``flat``: the
    exporter's FlatIO; ``truth``: the FlatIO whose outputs onnxruntime must reproduce, ``flat`` by default);
    judge it as the format says: ``check`` "elementwise", or "sqnr" (SQNR, top-1 agreement, and the integer
    kernels onnxruntime runs). Returns ((max abs, max rel), batch sizes, quantized figures)."""
    truth = flat if truth is None else truth
    batches = [(flat.tensors, truth.reference)]
    if any(batched):
        size = next(t.shape[0] for t, b in zip(flat.tensors, batched) if b)
        extra = other_batch(flat.tensors, batched, size + 1)
        batches.append((extra, _torch_at_batch(truth, extra, size + 1)))
    session = ort_session(path)
    try:
        worst_abs = worst_rel = 0.0
        sizes, sqnrs, agree = [], [], []
        for tensors, want in batches:
            sizes.append(next((t.shape[0] for t, b in zip(tensors, batched) if b), _batch_of(tensors)))
            with _at_second_batch(len(sizes) > 1):
                got = run_ort(session, flat.input_names, tensors)
                errors = compare(flat.output_names, got, want, rtol, atol, sizes[-1])
            if check == "sqnr":
                sqnrs.append(signal_to_noise(got, want))
                agree.append(top1_agreement(got, want))
                if min_sqnr is not None:
                    raise_if_noisy(sqnrs[-1], sizes[-1], min_sqnr)
            else:
                raise_if_disagrees(errors, sizes[-1], rtol, atol)
            worst_abs = max([worst_abs] + [e.max_abs for e in errors])
            worst_rel = max([worst_rel] + [e.max_rel for e in errors])
    finally:
        del session  # one live session at a time: an idle one keeps a spinning thread
    quality = {}
    if sqnrs:
        known = [a for a in agree if a is not None]
        quality = {"sqnr_db": min(sqnrs), "top1_agreement": min(known) if known else None,
                   "integer_kernels": integer_kernel_count(path)}
    return (worst_abs, worst_rel), tuple(sizes), quality


def _torch_at_batch(truth, tensors, size: int):
    """torch's outputs at the second batch size; BatchSizeError when the module itself refuses that batch (a
    module captured with a fixed batch, such as ``torch.export.export(model, x).module()``, guards on it)."""
    try:
        return truth.call(tensors)
    except Exception as e:  # a guard's AssertionError, a view that bakes the batch in, ...
        why = str(e).splitlines()[0] if str(e) else ""
        error = BatchSizeError(
            f"the torch module itself refuses batch {size} ({type(e).__name__}: {why}): "
            "it was captured with a fixed batch size; export with dynamic_batch=False, or capture it with a "
            "dynamic batch")
        error.module_refuses = True
        raise error from e


@contextlib.contextmanager
def _at_second_batch(second: bool) -> Iterator[None]:
    """VerifyErrors of the second batch size become BatchSizeErrors (the export fixed the batch)."""
    try:
        yield
    except VerifyError as e:
        if not second or isinstance(e, BatchSizeError):
            raise
        raise BatchSizeError(str(e)) from e


def _batch_of(tensors) -> int:
    return next((t.shape[0] for t in tensors if t.dim()), 1)
