"""Which packed format (or dense) runs one weight fastest: a cost model from the zeros, or a micro-benchmark.

The model counts what each format would store (8x1/16x1 groups, 1x4 runs, csr nonzeros) straight from the weight's
zeros, so the pattern does not have to be declared: an 8x1-pruned weight packs to few 8x1 groups, while
unstructured zeros leave 8x1 groups nearly full and csr wins. Time = bytes / bandwidth + multiply-adds / rate +
per-call overhead, with rates measured on one Zen 4 core (FACTS.md, bench/results/sparse_kernels.md); dense is
F.linear (MKL). ``benchmark=True`` replaces the model by timing each candidate on this machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graphopt.kernels.formats import FORMATS, index_dtype, pack

# one core: streaming bandwidth (bytes/s), multiply-add rate at batch >= 8 (flop/s), overhead per call (s)
_DENSE_BW, _SPARSE_BW, _GEMV_ENTRY_S = 13e9, 14e9, 0.4e-9  # sparse BW kept near dense: a near-full block
# format must not win on an assumed bandwidth edge (it measured 0.7x at 50% unstructured zeros in 16x1)
_DENSE_FLOPS = 60e9  # MKL at batch >= 8; the SpMM rates below are the measured fractions of it (0.5 / 0.3 / 0.27)
_SPARSE_FLOPS = {"8x1": 30e9, "16x1": 30e9, "1x4": 16e9, "csr": 18e9}
_CSR_GEMV_NNZ_S = 0.6e-9  # gathers: csr GEMV is bound by ~1.5-2 nonzeros per ns, not by bytes
_DENSE_CALL_S, _SPARSE_CALL_S = 4e-6, 16e-6  # measured: the custom op + ctypes call costs ~12-24 us


@dataclass(frozen=True)
class Choice:
    """The chosen format (None = keep dense), predicted/measured seconds per format, and how they were had."""

    fmt: str | None
    seconds: dict
    how: str

    @property
    def speedup(self) -> float:
        """Dense time over the chosen format's time (1.0 when dense is kept)."""
        return self.seconds["dense"] / self.seconds[self.fmt] if self.fmt else 1.0


def stored_entries(weight: torch.Tensor, fmt: str) -> int:
    """How many index entries ``fmt`` would store for ``weight`` (groups, runs or nonzeros)."""
    nz = weight.detach() != 0
    n, k = nz.shape
    if fmt in ("8x1", "16x1"):
        rows = int(fmt.split("x")[0])
        padded = torch.zeros(-(-n // rows) * rows, k, dtype=torch.bool)
        padded[:n] = nz
        return int(padded.view(-1, rows, k).any(dim=1).sum())
    if fmt == "1x4":
        padded = torch.zeros(n, -(-k // 4) * 4, dtype=torch.bool)
        padded[:, :k] = nz
        return int(padded.view(n, -1, 4).any(dim=2).sum())
    return int(nz.sum())


def predict_seconds(weight: torch.Tensor, fmt: str, rows: int) -> float:
    """Modelled seconds for one call of ``fmt`` ("dense" or a sparse format) on ``rows`` input rows."""
    n, k = weight.shape
    if fmt == "dense":
        return _DENSE_CALL_S + max(n * k * 4 / _DENSE_BW, 2 * rows * n * k / _DENSE_FLOPS)
    entries = stored_entries(weight, fmt)
    per = {"8x1": 8, "16x1": 16, "1x4": 4, "csr": 1}[fmt]
    idx_bytes = 2 if index_dtype(k) == torch.int16 else 4
    nbytes = entries * (per * 4 + idx_bytes) + 4 * (n + 1)
    values = entries * per
    if rows == 1:
        compute = values * _CSR_GEMV_NNZ_S if fmt == "csr" else entries * _GEMV_ENTRY_S
        return _SPARSE_CALL_S + max(nbytes / _SPARSE_BW, compute)
    padded_rows = -(-rows // 8) * 8  # the SpMM kernels work on the batch padded to a multiple of 8
    return _SPARSE_CALL_S + max(nbytes / _SPARSE_BW, 2 * padded_rows * values / _SPARSE_FLOPS[fmt])


def choose_format(weight: torch.Tensor, rows: int, *, formats=FORMATS, benchmark: bool = False,
                  min_speedup: float = 1.2, threads: int = 1) -> Choice:
    """The fastest of ``formats`` for ``weight`` at ``rows`` input rows, or None when none beats dense by
    ``min_speedup`` (so lowering never makes a layer slower)."""
    n, k = weight.shape
    candidates = [f for f in formats if not (f == "1x4" and k < 4)]
    if benchmark:
        seconds, how = measure_seconds(weight, candidates, rows, threads), "benchmark"
    else:
        seconds = {f: predict_seconds(weight, f, rows) for f in ["dense", *candidates]}
        how = "model"
    best = min(candidates, key=seconds.__getitem__, default=None)
    if best is None or seconds["dense"] < min_speedup * seconds[best]:
        best = None
    return Choice(best, seconds, how)


def measure_seconds(weight: torch.Tensor, formats, rows: int, threads: int = 1, repeats: int = 15) -> dict:
    """Median seconds per call of dense F.linear and of each format, timed interleaved on this machine."""
    w = weight.detach().to(torch.float32).contiguous()
    x = torch.randn(rows, w.shape[1])
    calls = {"dense": lambda: F.linear(x, w)}
    for fmt in formats:
        p = pack(w, fmt)
        calls[fmt] = (lambda p=p: torch.ops.graphopt.sparse_linear(x, *p.tensors(), None, p.fmt, p.in_features,
                                                                   p.out_features, threads))
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
