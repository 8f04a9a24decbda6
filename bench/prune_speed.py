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
import copy
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
from graphopt.pipeline import Context  # noqa: E402
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

    jobs = {"graphopt": graphopt_pass, "tp": tp_pruner, "capture": capture}
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in jobs}
    for k, make in jobs.items():  # warm-up round
        clocks(make())
    for _ in range(repeats):
        for k, make in jobs.items():
            samples[k].append(clocks(make()))  # the copy is made outside the timed call
    med = {k: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v)) for k, v in samples.items()}
    return {"model": name, **med}


def main(argv: list[str] | None = None) -> None:
    """Bench each model and publish the table."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    rows = [bench_model(n, args.ratio, args.repeats) for n in args.models.split(",")]
    lines = ["| model | clock | graphopt pass s | tp s | tp / graphopt pass | capture s | tp / (capture + pass) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        for i, clock in enumerate(("wall", "CPU")):
            go, tp_, cap = r["graphopt"][i], r["tp"][i], r["capture"][i]
            lines.append(f"| {r['model']} | {clock} | {go:.3f} | {tp_:.3f} | {tp_ / go:.2f}x | {cap:.2f} | "
                         f"{tp_ / (go + cap):.2f}x |")
    head = provenance("Analysis + prune time: graphopt's prune-channels pass vs Torch-Pruning",
                      f"- torch {torch.__version__}; ratio {args.ratio}, L2, local, last layer kept; 1 thread; "
                      f"median of {args.repeats} interleaved rounds")
    note = ("`tp / graphopt pass` is the analysis+prune comparison: both start from a model in memory, and "
            "graphopt's pass starts from the captured graph. graphopt's capture (torch.export, the canonical graph "
            "every pass of a pipeline shares, plus its check against eager) is a one-off cost shown apart; "
            "`tp / (capture + pass)` counts it in.")
    publish(f"{head}\n\n" + "\n".join(lines) + f"\n\n{note}\n", args.out)


if __name__ == "__main__":
    main()
