"""Check an exported ONNX model against the torch module it came from, with onnxruntime.

The check runs the model's example inputs and, when the batch is dynamic, a second batch size: floats are fresh
random values of the same mean and spread, integer inputs (token ids, masks) repeat their rows, so they stay valid.
Only one onnxruntime session lives at a time (an idle session keeps a spinning worker thread; see FACTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from graphopt.errors import VerifyError


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
