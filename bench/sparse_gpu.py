"""GPU sparse linear: graphopt's Triton block-sparse kernel vs dense F.linear vs torch's 2:4 semi-structured path.

Needs an NVIDIA GPU (exits with a message otherwise); the Triton columns need Triton (``pip install graphopt[gpu]``),
the 2:4 column compute capability >= 8.0. For each weight shape (out x in), batch and sparsity:
  * dense: ``F.linear`` on the masked weight (cuBLAS);
  * bsr 32x32 / bsr 16x16: the Triton kernel on a weight pruned in 32x32 / 16x16 tiles at that sparsity (the
    pattern the format is for: unstructured zeros leave nearly every tile nonzero);
  * 2:4: ``to_sparse_semi_structured`` on the weight pruned 2:4 (always 50% zeros: reported in the 50% rows only).
Methods are interleaved round by round; each round times ``--calls`` back-to-back calls with CUDA events, and each
cell is the median over rounds of the time per call. Every method's output is checked against dense F.linear on
the same weight before timing (max relative error in the second table).

    .venv/bin/python bench/sparse_gpu.py [--dtype float16] [--quick] [--out bench/results/sparse_gpu.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from benchkit import provenance, publish  # noqa: E402

SHAPES = [(768, 3072), (3072, 768), (4096, 4096)]  # weight (out_features, in_features)
BATCHES = [1, 16, 128]
SPARSITIES = [0.5, 0.9]
DEVICE = "cuda"  # a constant so the cell set-up can be smoke-tested on CPU under TRITON_INTERPRET=1


def tile_pruned(n: int, k: int, zeros: float, tile: int, dtype, seed: int) -> torch.Tensor:
    """A random weight with a share ``zeros`` of its tile x tile blocks set to zero."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(-(-n // tile), -(-k // tile), generator=g) >= zeros
    keep = keep.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:n, :k]
    return (torch.randn(n, k, generator=g) * keep).to(DEVICE, dtype)


def time_round(fn, calls: int) -> float:
    """Seconds per call over ``calls`` back-to-back calls, timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| (0 for an all-zero reference)."""
    scale = float(ref.float().abs().max())
    return float((y.float() - ref.float()).abs().max()) / scale if scale else 0.0


def methods_for(n, k, batch, zeros, dtype, seed):
    """{name: (call, its weight's dense output)} for one cell, each checked against F.linear."""
    from graphopt.kernels import semi_structured, triton_bsr

    x = torch.randn(batch, k, device=DEVICE, dtype=dtype)
    w32 = tile_pruned(n, k, zeros, 32, dtype, seed)
    calls = {"dense": (lambda: F.linear(x, w32), F.linear(x, w32))}
    if triton_bsr.triton_available():
        for tile in (32, 16):
            w = w32 if tile == 32 else tile_pruned(n, k, zeros, 16, dtype, seed)
            p = triton_bsr.pack_bsr(w, (tile, tile))
            calls[f"bsr {tile}x{tile}"] = (lambda p=p: triton_bsr.bsr_linear(x, p), F.linear(x, w))
    if zeros == 0.5:
        w24 = semi_structured.prune_2to4(torch.randn(n, k, device=DEVICE, dtype=dtype))
        try:
            ws = semi_structured.to_semi_structured(w24)
            calls["2:4"] = (lambda: F.linear(x, ws), F.linear(x, w24))
        except Exception as e:  # noqa: BLE001 - report why the column is empty instead of stopping the bench
            print(f"2:4 unavailable for {n}x{k} {dtype}: {e}", file=sys.stderr)
    return calls


def main() -> None:
    """Run the grid and publish the markdown report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="5 rounds of 10 calls")
    ap.add_argument("--out", default="bench/results/sparse_gpu.md")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/sparse_gpu.py needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False here); "
                 "no results were written")
    from graphopt.kernels import triton_bsr

    rounds, calls = (5, 10) if args.quick else (args.rounds, args.calls)
    dtype = getattr(torch, args.dtype)
    names = ["dense", "bsr 32x32", "bsr 16x16", "2:4"]
    times, errors = [], []
    for (n, k) in SHAPES:
        for zeros in SPARSITIES:
            for batch in BATCHES:
                cell = methods_for(n, k, batch, zeros, dtype, seed=n + k)
                errs = {name: rel_err(fn(), ref) for name, (fn, ref) in cell.items()}
                for fn, _ in cell.values():  # warm up: Triton compiles on the first call
                    for _ in range(3):
                        fn()
                torch.cuda.synchronize()
                samples = {name: [] for name in cell}
                for _ in range(rounds):
                    for name, (fn, _) in cell.items():
                        samples[name].append(time_round(fn, calls))
                med = {name: statistics.median(s) for name, s in samples.items()}
                times.append((n, k, zeros, batch, med))
                errors.append((n, k, zeros, batch, errs))
                print(f"{n}x{k} {zeros:.0%} batch {batch}: " +
                      ", ".join(f"{m} {t * 1e6:.1f} us" for m, t in med.items()), file=sys.stderr)

    lines = [f"| weight (out x in) | sparsity | batch | dense us | " +
             " | ".join(f"{m} us (x dense)" for m in names[1:]) + " |", "|" + "---|" * (3 + len(names))]
    for n, k, zeros, batch, med in times:
        cells = [f"{n}x{k}", f"{zeros:.0%}", str(batch), f"{med['dense'] * 1e6:.1f}"]
        for m in names[1:]:
            cells.append(f"{med[m] * 1e6:.1f} ({med['dense'] / med[m]:.2f}x)" if m in med else "-")
        lines.append("| " + " | ".join(cells) + " |")
    err_lines = ["| weight | sparsity | batch | " + " | ".join(names) + " |", "|" + "---|" * (3 + len(names))]
    for n, k, zeros, batch, errs in errors:
        err_lines.append(f"| {n}x{k} | {zeros:.0%} | {batch} | " +
                         " | ".join(f"{errs[m]:.1e}" if m in errs else "-" for m in names) + " |")
    import importlib.metadata as md
    try:
        triton_version = md.version("triton")
    except md.PackageNotFoundError:
        triton_version = "not installed"
    report = "\n".join([
        provenance("GPU sparse linear: Triton block-sparse vs dense vs 2:4",
                   f"- GPU: {torch.cuda.get_device_name()} (compute capability "
                   f"{'.'.join(map(str, torch.cuda.get_device_capability()))})",
                   f"- torch {torch.__version__}, CUDA {torch.version.cuda}, Triton {triton_version}, "
                   f"dtype {args.dtype}; {rounds} interleaved rounds of {calls} calls, medians",
                   f"- Triton kernel used: {triton_bsr.triton_available()}"),
        "", "## Time per call (speedup over dense in brackets)", "", *lines,
        "", "## Max relative error against dense F.linear on the same weight", "", *err_lines, ""])
    publish(report, args.out)


if __name__ == "__main__":
    main()
