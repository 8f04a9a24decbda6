"""Realized share of the MAC cut of channel pruning, in eager torch and after ONNX export in onnxruntime.

Depthwise-heavy nets (MobileNet, ShuffleNet, EfficientNet-style) are overhead-bound in eager mode: a narrower
depthwise conv costs about as much Python/dispatcher time as a wide one. onnxruntime has no per-op Python overhead,
so it shows how much of the cut a deployed model really keeps. For each model: prune at ``--ratio`` (L2, local),
streamline, export original and pruned with ``graphopt.export_onnx``; time eager torch (original vs pruned, interleaved)
and onnxruntime (one live session at a time, FACTS.md: alternate sessions round by round, ``--runs`` calls each).
"real" = speedup / MAC-reduction factor.

Run from the repository root::

    .venv/bin/python bench/prune_ort.py
    .venv/bin/python bench/prune_ort.py --models mobilenet_v2,resnet50 --rounds 5
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
sys.path.insert(0, str(ROOT / "bench"))

import graphopt  # noqa: E402
import big_models  # noqa: E402
from benchkit import geomean, provenance, publish  # noqa: E402
from graphopt.export.onnx_verify import ort_session  # noqa: E402
from models import CNN_NAMES, build  # noqa: E402

DEFAULT_MODELS = ("resnet50", "mobilenet_v2", *CNN_NAMES)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="zoo or big_models names")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="alternating onnxruntime rounds")
    p.add_argument("--runs", type=int, default=10, help="timed calls per session per round")
    p.add_argument("--repeats", type=int, default=30, help="interleaved eager rounds")
    p.add_argument("--out", default="bench/results/prune_ort.md")
    return p.parse_args(argv)


def load(name: str) -> tuple[torch.nn.Module, tuple]:
    """A model and batch-1 inputs: big_models at 224x224, else the zoo's inputs cut to one row."""
    if name in big_models.BUILDERS:
        return big_models.build(name)
    case = build(name)
    return case.model, tuple(x[:1] for x in case.example_inputs)


def ort_medians(paths: dict[str, str], x: torch.Tensor, threads: int, rounds: int, runs: int) -> dict[str, float]:
    """Median ms per model, sessions alternating round by round with only one alive at a time."""
    samples: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for key, path in paths.items():
            session = ort_session(path, threads=threads)
            feeds = {session.get_inputs()[0].name: x.numpy()}
            for _ in range(3):
                session.run(None, feeds)
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, feeds)
                samples[key].append(time.perf_counter() - start)
            del session
    return {k: 1e3 * statistics.median(v) for k, v in samples.items()}


@torch.no_grad()
def bench_model(name: str, args: argparse.Namespace, folder: str) -> dict:
    """Prune, streamline, export and time one model; returns its row."""
    model, inputs = load(name)
    res = graphopt.optimize(model, [f"prune-channels:ratio={args.ratio},importance=l2"], inputs)
    pruned = graphopt.streamline(res.module, inputs)
    macs = {"original": res.report.records[0].macs_before, "pruned": res.report.records[0].macs_after}
    paths = {}
    for key, module in (("original", model), ("pruned", pruned)):
        paths[key] = f"{folder}/{name}-{key}.onnx"
        graphopt.export_onnx(module, inputs, paths[key], dynamic_batch=False)
    eager = graphopt.paired_latency({"original": lambda: model(*inputs), "pruned": lambda: pruned(*inputs)},
                                    warmup=3, repeats=args.repeats, threads=args.threads)
    ort = ort_medians(paths, inputs[0], args.threads, args.rounds, args.runs)
    gain = macs["original"] / macs["pruned"]
    return {"model": name, "gain": gain, "macs": macs,
            "eager": {k: v.median_ms for k, v in eager.items()}, "ort": ort}


def row(r: dict) -> str:
    """One markdown table row."""
    e, o, gain = r["eager"], r["ort"], r["gain"]
    es, os_ = e["original"] / e["pruned"], o["original"] / o["pruned"]
    return (f"| {r['model']} | {r['macs']['original'] / 1e6:.1f}M → {r['macs']['pruned'] / 1e6:.1f}M ({gain:.2f}x) | "
            f"{e['original']:.2f} → {e['pruned']:.2f} | {es:.2f}x | {es / gain:.0%} | "
            f"{o['original']:.2f} → {o['pruned']:.2f} | {os_:.2f}x | {os_ / gain:.0%} |")


def main(argv: list[str] | None = None) -> None:
    """Bench every model and publish the table."""
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows.append(bench_model(name, args, folder))
    lines = ["| model | MACs (cut) | eager ms | eager speedup | eager real | ORT ms | ORT speedup | ORT real |",
             "|---|---|---|---|---|---|---|---|", *map(row, rows)]
    share = lambda key: geomean([(r[key]["original"] / r[key]["pruned"]) / r["gain"] for r in rows])  # noqa: E731
    summary = (f"Geometric mean of the realized share: eager {share('eager'):.0%}, onnxruntime {share('ort'):.0%} "
               f"over {len(rows)} models.")
    head = provenance("Pruned CNNs: realized share of the MAC cut, eager torch vs onnxruntime",
                      f"- torch {torch.__version__}; ratio {args.ratio}, L2, local; batch 1; {args.threads} threads; "
                      f"eager: {args.repeats} interleaved rounds; ORT: {args.rounds} alternating rounds x "
                      f"{args.runs} calls, one live session")
    publish(f"{head}\n\n" + "\n".join(lines) + f"\n\n{summary}\n", args.out)


if __name__ == "__main__":
    main()
