"""Sparse kernels vs dense F.linear, torch CSR/BSR and a bandwidth-bound dense reference.

1 thread; weights streamed from memory: each method cycles through enough copies of its weight to exceed twice the
L3 cache, so every call reads its weight from DRAM, as a model bigger than the cache does. Methods are
interleaved round by round; each cell is the median over rounds of the time per call. Each of our formats runs on a
weight pruned in its own pattern (8x1/16x1/1x4 blocks; csr and torch's formats on unstructured zeros, BSR on 8x1
zeros). "lowering's choice" is the format lower-sparse's cost model picks for each pattern's weight, timed the
same way on that weight (dense when it keeps dense).

    .venv/bin/python bench/sparse_kernels.py [--quick] [--out bench/results/sparse_kernels.md]
"""

from __future__ import annotations

import argparse
import warnings
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from benchkit import provenance, publish  # noqa: E402

from graphopt.kernels import choose_format, library, pack  # noqa: E402

CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU time of this process: excludes time spent
# descheduled by other jobs on a shared machine, still counts memory stalls)
PATTERNS = {"8x1": (8, 1), "16x1": (16, 1), "1x4": (1, 4), "csr": (1, 1)}


def l3_bytes() -> int:
    """Largest cache size from sysfs (L3), 32 MiB if unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        sizes.append(int(text[:-1]) * {"K": 1024, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text))
    return max(sizes, default=32 << 20)


def pruned(n: int, k: int, sparsity: float, pattern: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows, cols = PATTERNS[pattern]
    keep = torch.rand(-(-n // rows), -(-k // cols), generator=gen) >= sparsity
    keep = keep.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:n, :k]
    return torch.randn(n, k, generator=gen) * keep


def copies_of(nbytes: int, budget: int) -> int:
    return max(2, -(-budget // max(nbytes, 1)))


def stream_bandwidth(budget: int) -> float:
    """Measured read bandwidth (bytes/s) of one thread summing a buffer larger than the L3."""
    buf = torch.ones(budget // 4)
    times = []
    for _ in range(5):
        start = CLOCK()
        buf.sum()
        times.append(CLOCK() - start)
    return buf.numel() * 4 / statistics.median(times)


def make_calls(n, k, sparsity, batch, budget):
    """name -> (callable over one weight copy, weight, bytes per copy), and lowering's choice per pattern."""
    x = torch.randn(batch, k)
    xt = x.t().contiguous()
    op = (lambda p: torch.ops.graphopt.sparse_linear(x, *p.tensors(), None, p.fmt, k, n, 1))
    dense = pruned(n, k, sparsity, "csr")
    calls = {"dense F.linear": (lambda w: F.linear(x, w), dense, dense.numel() * 4)}
    choices = {}
    for pattern in PATTERNS:
        weight = pruned(n, k, sparsity, pattern)
        p = pack(weight, pattern)
        calls[f"ours {pattern}"] = (op, p, p.nbytes)
        choices[pattern] = choose_format(weight, batch).fmt
        if choices[pattern] not in (None, pattern):  # lowering packs this weight in another format: time that too
            other = pack(weight, choices[pattern])
            calls[f"{choices[pattern]} on {pattern} zeros"] = (op, other, other.nbytes)
    csr = dense.to_sparse_csr()
    calls["torch CSR"] = (lambda w: torch.mm(w, xt), csr, dense.count_nonzero().item() * 12 + (n + 1) * 8)
    try:
        bsr = pruned(n, k, sparsity, "8x1").to_sparse_bsr((8, 8))
        torch.mm(bsr, xt)
        calls["torch BSR 8x8"] = (lambda w: torch.mm(w, xt), bsr, bsr.values().numel() * 4)
    except (RuntimeError, NotImplementedError):
        pass
    return calls, choices


def clone(obj):
    if hasattr(obj, "tensors"):  # PackedWeight
        from graphopt.kernels.formats import PackedWeight
        return PackedWeight(obj.fmt, obj.out_features, obj.in_features, *(t.clone() for t in obj.tensors()))
    return obj.clone()


def time_methods(calls, budget, rounds):
    copies = {name: [clone(w) for _ in range(copies_of(nb, budget))] for name, (_, w, nb) in calls.items()}
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (fn, _, _) in calls.items():
            ws = copies[name]
            start = CLOCK()
            for w in ws:
                fn(w)
            times[name].append((CLOCK() - start) / len(ws))
    return {name: statistics.median(t) for name, t in times.items()}


def lowering_choice(choices, measured):
    """For each pattern's weight: the format lower-sparse's model picks and its measured speedup over dense."""
    out = []
    for pattern, fmt in choices.items():
        name = "dense F.linear" if fmt is None else f"ours {fmt}" if fmt == pattern else f"{fmt} on {pattern} zeros"
        out.append(f"{pattern}->{fmt or 'dense'} {measured['dense F.linear'] / measured[name]:.1f}x")
    return "; ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, batch 1 only")
    parser.add_argument("--out", default="bench/results/sparse_kernels.md")
    parser.add_argument("--note", default="", help="a line for the report, e.g. how loaded the machine was")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time, steadier when other jobs share the cores")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    lib = library()
    budget = 2 * l3_bytes()
    bandwidth = stream_bandwidth(4 * budget)
    rounds = 3 if args.quick else 7
    lines = [f"- kernels: {lib.isa if lib else 'torch reference (no library)'}; 1 thread; weights streamed: "
             f"each method cycles through copies totalling >= {budget >> 20} MiB (2x L3); median of {rounds} "
             f"interleaved rounds; clock: {args.clock}",
             f"- measured 1-thread read bandwidth: {bandwidth / 1e9:.1f} GB/s (torch.sum over 4x that budget); "
             "'dense at bandwidth' = dense fp32 bytes / that bandwidth (the batch-1 floor of a dense GEMV)",
             "- shapes are out_features x in_features; cells: time per call (us) and speedup over dense F.linear",
             *([f"- note: {args.note}"] if args.note else []),
             ""]
    for batch in ([1] if args.quick else [1, 8, 64]):
        for n, k in [(768, 3072), (3072, 768)]:
            rows = []
            for sparsity in (0.5, 0.7, 0.9, 0.95):
                calls, choices = make_calls(n, k, sparsity, batch, budget)
                measured = time_methods(calls, budget, rounds)
                choice = lowering_choice(choices, measured)
                measured = {m: t for m, t in measured.items() if " on " not in m}  # shown in the choice column
                measured["dense at bandwidth"] = n * k * 4 / bandwidth
                rows.append((sparsity, measured, choice))
            lines += table(f"batch {batch}, {n}x{k}", rows)
    lines += act_sparse_table(budget, rounds)
    publish(provenance("Sparse kernels vs dense (1 thread, weights streamed from DRAM)", *lines), args.out)


def act_sparse_table(budget, rounds):
    """Batch-1 zero-input skipping (dense weights, inputs with a share of exact zeros) vs F.linear."""
    out = ["### dynamic activation sparsity: act_sparse_linear vs F.linear, batch 1, dense weights", "",
           "| shape | zero inputs | F.linear | act_sparse_linear | speedup |", "|---|---|---|---|---|"]
    for n, k in [(768, 3072), (3072, 768)]:
        for zero in (0.5, 0.7, 0.9):
            x = torch.randn(1, k) * (torch.rand(1, k) >= zero)
            w = torch.randn(n, k)
            calls = {"dense": (lambda w: F.linear(x, w), w, w.numel() * 4),
                     "act": (lambda wt: torch.ops.graphopt.act_sparse_linear(x, wt, None, 1), w.t().contiguous(),
                             w.numel() * 4)}
            t = time_methods(calls, budget, rounds)
            out.append(f"| {n}x{k} | {zero:.0%} | {t['dense'] * 1e6:.0f} us | {t['act'] * 1e6:.0f} us "
                       f"| {t['dense'] / t['act']:.1f}x |")
    return out + [""]


def table(title, rows):
    names = list(rows[0][1])
    out = [f"### {title}", "", "| sparsity | " + " | ".join(names) + " | lowering's choice (pattern->format) |",
           "|---" * (len(names) + 2) + "|"]
    for sparsity, measured, choice in rows:
        dense = measured["dense F.linear"]
        cells = [f"{measured[m] * 1e6:.0f} us ({dense / measured[m]:.1f}x)" for m in names]
        out.append(f"| {sparsity:.0%} | " + " | ".join(cells) + f" | {choice} |")
    return out + [""]


if __name__ == "__main__":
    main()
