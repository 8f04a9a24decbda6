"""ONNX export of every zoo model after a graphopt pipeline: graph size, file size, onnxruntime vs torch latency.

For each zoo model: run the pipeline (default ``prune-channels:ratio=0.5,fuse``) on batch-1 inputs, export with
``graphopt.export_onnx`` (dynamic batch, onnxsim, onnxruntime verification), then time the lowered torch module
(``graphopt.lower``) and the onnxruntime session on the same batch-1 inputs, interleaved round by round
(``graphopt.paired_latency``), both at a fixed thread count. Only one onnxruntime session is alive at a time: an idle
session keeps a spinning worker thread that would slow everything else down (FACTS.md). The markdown table goes to
stdout and to ``--out``.

Run from the repository root::

    .venv/bin/python bench/export.py                                  # every zoo model, 2 threads, 50 rounds
    .venv/bin/python bench/export.py --models resnet_basic,vit --passes fuse --repeats 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import graphopt  # noqa: E402
from graphopt.inputs import ExampleInputs  # noqa: E402
from graphopt.onnx_io import FlatIO  # noqa: E402
from graphopt.onnx_verify import ort_session  # noqa: E402
from models import NAMES, build  # noqa: E402
from benchkit import geomean, provenance, publish  # noqa: E402

WARMUP = 10
COLUMNS = ("model", "fx ops", "ONNX nodes exported → onnxsim", "file KB", "max abs err", "export s",
           "torch ms", "ORT ms", "torch/ORT")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(NAMES), help="comma-separated zoo names (default: all)")
    p.add_argument("--passes", default="prune-channels:ratio=0.5,fuse", help="graphopt pipeline before export")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=50, help="interleaved timing rounds (default 50)")
    p.add_argument("--out", default="bench/results/export.md", help="markdown file to write")
    return p.parse_args(argv)


def first_row(example_inputs):
    """The zoo's example inputs cut to batch 1 (non-tensor options kept)."""
    def one(x):
        return x[:1] if isinstance(x, torch.Tensor) and x.dim() else x
    if isinstance(example_inputs, dict):
        return {k: one(v) for k, v in example_inputs.items()}
    return tuple(one(x) for x in example_inputs)


@torch.no_grad()
def bench_model(name: str, passes: str, threads: int, repeats: int, folder: str) -> dict:
    """Optimize, export, verify and time one zoo model; returns one row of results."""
    case = build(name)
    inputs = first_row(case.example_inputs)
    result = graphopt.optimize(case.model, passes, inputs)
    lowered = graphopt.lower(result.module, inputs)
    path = f"{folder}/{name}.onnx"
    report = graphopt.export_onnx(result.module, inputs, path)
    flat = FlatIO(lowered, ExampleInputs.of(inputs))  # the same flat feeds export_onnx verified with
    feeds = {n: t.numpy() for n, t in zip(flat.input_names, flat.tensors)}
    call = ExampleInputs.of(inputs).call
    session = ort_session(path, threads=threads)
    try:
        lat = graphopt.paired_latency({"torch": lambda: call(lowered), "ort": lambda: session.run(None, feeds)},
                                      warmup=WARMUP, repeats=repeats, threads=threads)
    finally:
        del session  # one live session at a time
    ops = sum(n.op == "call_function" for n in lowered.graph.nodes)
    return {"model": name, "ops": ops, "report": report, "torch": lat["torch"].median_ms, "ort": lat["ort"].median_ms}


def table(rows: list[dict]) -> str:
    """Markdown table of the result rows."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} |" + " |" * (len(COLUMNS) - 2))
            continue
        rep = r["report"]
        cells = (r["model"], r["ops"], f"{rep.nodes_exported} → {rep.nodes}", f"{rep.file_bytes / 1e3:.1f}",
                 f"{rep.max_abs_error:.1e}", f"{rep.seconds:.1f}", f"{r['torch']:.3f}", f"{r['ort']:.3f}",
                 f"{r['torch'] / r['ort']:.2f}x")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def reading(rows: list[dict]) -> str:
    """A paragraph computed from the numbers, so it stays true on a rerun."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return "No model exported."
    speed = {r["model"]: r["torch"] / r["ort"] for r in ok}
    cut = [1 - r["report"].nodes / r["report"].nodes_exported for r in ok]
    changed = [r["model"] for r in ok if r["report"].nodes < r["report"].nodes_exported]
    failed = [r["model"] for r in rows if "error" in r]
    text = (f"{len(ok)} of {len(rows)} models exported and matched torch in onnxruntime at batch 1 and 2 (largest "
            f"max abs error {max(r['report'].max_abs_error for r in ok):.1e}). onnxsim removed nodes from "
            f"{len(changed)} models ({', '.join(changed) or 'none'}; median cut {statistics.median(cut):.0%}): the "
            "torch.export-based exporter already folds constants and BatchNorm, so most graphs come out minimal. "
            f"onnxruntime vs the lowered eager torch module at batch 1: {geomean(list(speed.values())):.2f}x "
            f"(geometric mean), from {min(speed.values()):.2f}x ({min(speed, key=speed.get)}) to "
            f"{max(speed.values()):.2f}x ({max(speed, key=speed.get)}); these models are tiny, so per-op overhead "
            "(Python dispatch in eager torch, kernel launch in onnxruntime) dominates both. ")
    if failed:
        text += f"Failed: {', '.join(failed)} (see the table). "
    return text


def header(args: argparse.Namespace, load_note: str) -> str:
    """Provenance lines: command, date, versions, settings, CPU."""
    import onnxruntime

    return provenance(
        "ONNX export: graph and file size, onnxruntime vs torch latency",
        f"- torch {torch.__version__}, onnxruntime {onnxruntime.__version__}",
        f"- pipeline before export: `{args.passes}`; export: `graphopt.export_onnx` defaults (torch.export-based "
        "exporter, dynamic batch, onnxsim, verified at batch 1 and 2)",
        f"- timing: batch 1, {args.threads} threads for torch and onnxruntime, {args.repeats} interleaved rounds "
        f"after {WARMUP} warmup calls each, medians; torch runs the `graphopt.lower`ed module",
        load_note,
    )


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the markdown report and write it to ``--out``."""
    args = parse_args(argv)
    rows = []
    start = time.time()
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            try:
                rows.append(bench_model(name.strip(), args.passes, args.threads, args.repeats, folder))
                r = rows[-1]
                print(f"{name}: {r['report'].nodes} nodes, torch {r['torch']:.3f} ms, ORT {r['ort']:.3f} ms",
                      file=sys.stderr)
            except graphopt.GraphoptError as e:
                rows.append({"model": name, "error": str(e).splitlines()[0][:200]})
                print(f"{name}: FAILED {e}", file=sys.stderr)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    note = (f"- load average at the end: {', '.join(load)} over {time.time() - start:.0f} s; numbers taken while "
            "other jobs shared the 2 cores are distorted: re-run on a quiet machine before quoting them")
    publish(f"{header(args, note)}\n\n{table(rows)}\n\n{reading(rows)}\n", args.out)


if __name__ == "__main__":
    main()
