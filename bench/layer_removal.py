"""Depth pruning, one block at a time: latency, parameters and output error of ResNet-50 and a small HF Llama as
``remove-layers`` drops their residual blocks in the order of a criterion (default ``block-influence``).

The blocks are ranked once on calibration batches of the original model, then for k = 0, 1, 2 ... the k
lowest-scoring blocks are removed (``RemoveLayers(blocks=...)`` on a copy of one traced graph) and the result is
lowered (``graphopt.streamline``). All variants of a model are timed interleaved round by round
(``graphopt.paired_latency``), medians of ``--repeats`` rounds, batch 1, a fixed thread count. The output error is
||y_k - y|| / ||y|| on a held-out batch (for Llama also the share of positions whose top-1 next token is unchanged).
Weights are seeded random (no downloads), so the error column shows how the graph degrades, not task accuracy.

Run from the repository root::

    .venv/bin/python bench/layer_removal.py                     # both models, 1 thread, 20 rounds
    .venv/bin/python bench/layer_removal.py --models llama --criterion angular --repeats 50
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import graphopt  # noqa: E402
from benchkit import provenance, publish  # noqa: E402
from graphopt.analysis.blocks import find_blocks  # noqa: E402
from graphopt.passes.remove_layers import RemoveLayers  # noqa: E402
from graphopt.graph.shapes import propagate  # noqa: E402
from util import outputs  # noqa: E402

COLUMNS = ("removed", "last block removed", "score", "params", "GMACs", "ms", "speedup", "rel. output error")


def resnet(size: int):
    """ResNet-50 (torchvision layout, bench/big_models.py) on size x size images."""
    from big_models import resnet50

    model = resnet50()
    gen = torch.Generator().manual_seed(1)
    batch = lambda n: (torch.randn(n, 3, size, size, generator=gen),)  # noqa: E731
    return model, batch(1), [batch(2) for _ in range(4)], batch(4)


def llama(seq: int):
    """A small LlamaForCausalLM: 8 layers, hidden 256, GQA 8/4 heads, vocab 2000, seeded random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)

    def batch(n):
        ids = torch.randint(3, 2000, (n, seq), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    return model, batch(1), [batch(2) for _ in range(4)], batch(4)


MODELS = {"resnet50": lambda a: resnet(a.size), "llama": lambda a: llama(a.seq)}


def ranking(traced, example, calib, criterion: str) -> list[tuple[str, float]]:
    """Every unprotected block with its score, lowest first (what remove-layers would drop first)."""
    gm = copy.deepcopy(traced)
    n = len(find_blocks(gm)) - 2  # every unprotected block, to get all their scores
    gm, report = graphopt.PassManager([RemoveLayers(n=n, criterion=criterion)]).run(
        gm, graphopt.Context(example, calib_data=calib))
    scores = report.records[0].stats["scores"]
    return sorted(((k, v) for k, v in scores.items() if isinstance(v, float)), key=lambda kv: kv[1])


def variants(traced, example, order: list[tuple[str, float]], max_blocks: int):
    """(k, graph with the k first blocks of ``order`` removed, report record) for k = 0 .. max_blocks."""
    out = []
    for k in range(min(max_blocks, len(order)) + 1):
        names = tuple(name for name, _ in order[:k])
        gm, report = graphopt.PassManager([RemoveLayers(blocks=names)] if k else []).run(
            copy.deepcopy(traced), graphopt.Context(example))
        with torch.no_grad():
            macs = graphopt.count_macs(gm, example)
        out.append((k, graphopt.streamline(gm, example), macs))
    return out


def bench_model(name: str, args) -> tuple[str, dict]:
    model, example, calib, held_out = MODELS[name](args)
    traced = graphopt.trace(model, example)
    propagate(traced, graphopt.graph.inputs.ExampleInputs.of(example), fake=True)
    order = ranking(traced, example, calib, args.criterion)
    rows = variants(traced, example, order, args.max_blocks)
    call = graphopt.graph.inputs.ExampleInputs.of(example).call
    fns = {k: (lambda gm=gm: call(gm)) for k, gm, _ in rows}
    latency = graphopt.paired_latency(fns, warmup=3, repeats=args.repeats, threads=args.threads)
    want = outputs(model, held_out)[0]
    base = latency[0].median_ms
    series = {"removed": [], "speedup": [], "error": []}
    lines = ["| " + " | ".join(COLUMNS + (("top-1 kept",) if name == "llama" else ())) + " |",
             "|" + "---|" * (len(COLUMNS) + (name == "llama"))]
    for k, gm, macs in rows:
        got = outputs(gm, held_out)[0]
        err = float((got - want).norm() / want.norm())
        cells = [str(k), order[k - 1][0] if k else "-", f"{order[k - 1][1]:.4f}" if k else "-",
                 f"{graphopt.count_params(gm) / 1e6:.2f}M", f"{macs / 1e9:.3f}", f"{latency[k].median_ms:.2f}",
                 f"{base / latency[k].median_ms:.2f}x", f"{err:.3f}"]
        if name == "llama":
            cells.append(f"{float((got.argmax(-1) == want.argmax(-1)).float().mean()):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
        for key, value in (("removed", k), ("speedup", base / latency[k].median_ms), ("error", err)):
            series[key].append(value)
    shape = f"{args.size}x{args.size} images" if name == "resnet50" else f"{args.seq} tokens"
    text = f"\n## {name} (batch 1, {shape}; {len(order)} removable unprotected blocks)\n\n" + "\n".join(lines)
    return text, series


def plot(results: dict[str, dict], path: Path) -> None:
    """Speedup and output error against the number of removed blocks, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, s in results.items():
        left.plot(s["removed"], s["speedup"], marker="o", label=name)
        right.plot(s["removed"], s["error"], marker="o", label=name)
    left.set(xlabel="blocks removed", ylabel="speedup (batch 1)", title="latency")
    right.set(xlabel="blocks removed", ylabel="||y_k - y|| / ||y||", title="output error (random weights)")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet50,llama")
    p.add_argument("--criterion", default="block-influence", choices=("block-influence", "angular", "output-error"))
    p.add_argument("--max-blocks", type=int, default=6)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--note", default="", help="a line for the header (e.g. 'taken under load')")
    p.add_argument("--out", default=str(ROOT / "bench/results/layer_removal.md"), help="also writes a .png beside it")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    results = {name: bench_model(name, args) for name in args.models.split(",")}
    sections = [text for text, _ in results.values()]
    head = provenance(
        "Depth pruning: latency, size and output error as residual blocks are removed one by one",
        f"- criterion: {args.criterion} (ranked once on 4 calibration batches of 2; first and last block "
        "protected); latency of the lowered graph, median of interleaved rounds",
        f"- threads: {args.threads}, rounds: {args.repeats}", *([f"- note: {args.note}"] if args.note else []))
    png = Path(args.out).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    plot({name: series for name, (_, series) in results.items()}, png)
    publish(head + f"\n\n![speedup and output error]({png.name})\n" + "\n".join(sections) + "\n", args.out)


if __name__ == "__main__":
    main()
