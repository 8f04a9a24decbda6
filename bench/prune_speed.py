"""Analysis + prune time on ResNet-50-sized models: graphopt's prune-channels pass vs Torch-Pruning, side by side.

Both tools prune a fresh copy of the same model at ``--ratio`` with L2 importance, local ranking, the last layer
kept. graphopt's time is its ``prune-channels`` pass on the captured graph: dependency analysis, importance, plan and
apply. Torch-Pruning's is ``BasePruner(...)`` (its dependency graph, traced with an autograd forward) plus
``step()``. graphopt's capture (``torch.export`` + checks, shared by every pass of a pipeline) is timed apart and
shown too, so the whole cost is in the table. Runs are interleaved round by round (graphopt, tp, capture) at one
thread; each figure is the median of ``--repeats`` rounds, on the wall clock and on process CPU time (steadier
when the machine is shared).

Run from the repository root (needs the ``bench`` extra: ``pip install --no-deps torch-pruning``)::

    .venv/bin/python bench/prune_speed.py
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

import big_models  # noqa: E402
import graphopt  # noqa: E402
from benchkit import provenance, publish  # noqa: E402
from graphopt.pipeline.manager import Context  # noqa: E402
from graphopt.passes.channel_prune import PruneChannels  # noqa: E402
from prune_zoo import final_layer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,mobilenet_v2")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="bench/results/prune_speed.md")
    return p.parse_args(argv)


def clocks(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_model(name: str, ratio: float, repeats: int) -> dict:
    """Median wall and CPU seconds of graphopt's pass, tp's pruner, and graphopt's capture."""
    import torch_pruning as tp

    model, inputs = big_models.build(name)
    captured = graphopt.trace(model, inputs)
    keep = final_layer(model)
    keep_name = next(n for n, m in model.named_modules() if m is keep)
    prune = PruneChannels(ratio=ratio, importance="l2", ignore=(keep_name,))

    def graphopt_pass():
        gm = copy.deepcopy(captured)
        ctx = Context(inputs)
        ctx.gm = gm
        return lambda: prune.run(gm, ctx)

    def tp_pruner():
        m = copy.deepcopy(model)
        last = final_layer(m)
        return lambda: tp.pruner.BasePruner(m, inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                            pruning_ratio=ratio, global_pruning=False, round_to=None,
                                            ignored_layers=[last]).step()

    def capture():
        return lambda: graphopt.trace(model, inputs)

    def optimize():  # the whole call a user makes: capture, manager (instruments), pass, write-back snapshot
        return lambda: graphopt.optimize(model, [prune], inputs)

    jobs = {"graphopt": graphopt_pass, "tp": tp_pruner, "capture": capture, "optimize": optimize}
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in jobs}
    for k, make in jobs.items():  # warm-up round
        clocks(make())
    for _ in range(repeats):
        for k, make in jobs.items():
            samples[k].append(clocks(make()))  # the copy is made outside the timed call
    med = {k: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v)) for k, v in samples.items()}
    return {"model": name, **med, "split": split_of_optimize(model, inputs, prune)}


# where one optimize() call spends its time: (module, function, label)
_PARTS = (("graphopt.capture.tracing", "_run_eagerly", "eager reference run"),
          ("graphopt.capture.tracing", "_export", "torch.export (with the size-1 guard probe)"),
          ("graphopt.capture.tracing", "relax_size_one_guards", "of which: size-1 guard probe"),
          ("graphopt.capture.tracing", "propagate", "capture check (graph run vs eager)"),
          ("graphopt.pipeline.manager.PassManager", "_graph_run", "manager: graph runs for the instruments"),
          ("graphopt.api", "snapshot", "write-back snapshot"),
          ("graphopt.passes.channel_prune.PruneChannels", "run", "the prune-channels pass"))


@contextlib.contextmanager
def _timed(parts: dict):
    """Wrap the functions of _PARTS so that ``parts[label]`` sums their wall time; restored on exit."""
    saved = []
    for where, name, label in _PARTS:
        module, _, cls = where.partition(".PassManager") if ".PassManager" in where else (where, "", "")
        if ".PruneChannels" in where:
            owner = importlib.import_module("graphopt.passes.channel_prune").PruneChannels
        elif cls or where.endswith("PassManager"):
            owner = importlib.import_module("graphopt.pipeline.manager").PassManager
        else:
            owner = importlib.import_module(where)
        original = owner.__dict__[name]

        def timed(*a, _f=original, _label=label, **k):
            start = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                parts[_label] = parts.get(_label, 0.0) + time.perf_counter() - start

        saved.append((owner, name, original))
        setattr(owner, name, timed)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def split_of_optimize(model, inputs, prune) -> dict[str, float]:
    """One instrumented optimize() call (after the warm-up rounds): seconds per part, the rest as "other"."""
    parts: dict[str, float] = {}
    with _timed(parts):
        start = time.perf_counter()
        graphopt.optimize(model, [prune], inputs)
        total = time.perf_counter() - start
    parts["other (copies, report, checks)"] = total - sum(v for k, v in parts.items() if not k.startswith("of which"))
    parts["total"] = total
    return parts


def main(argv: list[str] | None = None) -> None:
    """Bench each model and publish the table."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    rows = [bench_model(n, args.ratio, args.repeats) for n in args.models.split(",")]
    lines = ["| model | clock | graphopt pass s | tp s | tp / graphopt pass | capture s | tp / (capture + pass) | "
             "optimize() s | tp / optimize() |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for i, clock in enumerate(("wall", "CPU")):
            go, tp_, cap, opt = r["graphopt"][i], r["tp"][i], r["capture"][i], r["optimize"][i]
            lines.append(f"| {r['model']} | {clock} | {go:.3f} | {tp_:.3f} | {tp_ / go:.2f}x | {cap:.2f} | "
                         f"{tp_ / (go + cap):.2f}x | {opt:.2f} | {tp_ / opt:.2f}x |")
    labels = list(rows[0]["split"])
    lines += ["", "Where one `graphopt.optimize(model, [prune-channels], x)` call spends its time (one instrumented "
              "call after the timed rounds, wall seconds):", "",
              "| part | " + " | ".join(r["model"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    lines += [f"| {label} | " + " | ".join(f"{r['split'].get(label, 0.0):.3f}" for r in rows) + " |" for label in labels]
    head = provenance("Analysis + prune time: graphopt's prune-channels pass vs Torch-Pruning",
                      f"- torch {torch.__version__}; ratio {args.ratio}, L2, local, last layer kept; 1 thread; "
                      f"median of {args.repeats} interleaved rounds")
    note = ("`tp / graphopt pass` is the analysis+prune comparison: both start from a model in memory, and "
            "graphopt's pass starts from the captured graph. graphopt's capture (torch.export, the canonical graph "
            "every pass of a pipeline shares, plus its check against eager) is a one-off cost shown apart; "
            "`tp / (capture + pass)` counts it in, and `tp / optimize()` is the whole user-facing call.")
    publish(f"{head}\n\n" + "\n".join(lines) + f"\n\n{note}\n", args.out)


if __name__ == "__main__":
    main()
