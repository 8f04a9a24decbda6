"""End to end: a 90%-sparse GPT-2 (hidden 768, MLP 3072) lowered by lower-sparse vs the same masked model dense.

Every weight of the transformer blocks (attention c_attn/c_proj, MLP c_fc/c_proj; HF GPT-2 runs them as addmm)
is magnitude-pruned to 90% zeros, either in 8x1 blocks (block score: L2 norm) or unstructured. Both models are the
same traced graph; the lowered one runs graphopt's sparse kernels where the cost model predicts a win. Batch 1,
1 thread, interleaved medians; sequence length 1 (a decoding step: GEMV) and 16 (16 rows per layer: SpMM).
Output error: max |lowered - dense masked| over the logits.

    .venv/bin/python bench/sparse_e2e.py [--layers 4] [--out bench/results/sparse_e2e.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from benchkit import provenance, publish  # noqa: E402

import graphopt  # noqa: E402

CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_medians(fns: dict, clock, repeats: int = 15, warmup: int = 3) -> dict:
    """Median seconds per call of each function, timed round by round so load hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            samples[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in samples.items()}


def gpt2(layers: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=2048, n_positions=128, n_embd=768, n_layer=layers, n_head=12)
    return GPT2LMHeadModel(config).eval()


def magnitude_prune_(weight: torch.Tensor, sparsity: float, rows: int) -> None:
    """Zero the lowest-magnitude ``rows x 1`` blocks along dim 0 of an (in, out) Conv1D weight's transpose."""
    w = weight.data.t()  # HF Conv1D stores (in, out); blocks run along output rows of W = weight.t()
    n, k = w.shape
    score = w.reshape(n // rows, rows, k).norm(dim=1)
    keep = score >= score.flatten().kthvalue(int(sparsity * score.numel())).values
    w.mul_(keep.repeat_interleave(rows, 0).to(w.dtype))


def sparse_model(layers: int, pattern: str) -> torch.nn.Module:
    model = gpt2(layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("transformer.h.") and name.endswith(".weight") and param.dim() == 2:
                magnitude_prune_(param, 0.9, 8 if pattern == "8x1" else 1)
    return model


def measure(layers: int, pattern: str, seq: int, clock):
    model = sparse_model(layers, pattern)
    inputs = {"input_ids": torch.randint(0, 2048, (1, seq)), "use_cache": False}
    dense = graphopt.optimize(model, [], inputs).module
    result = graphopt.optimize(model, ["lower-sparse"], inputs)
    stats = result.report.records[-1].stats
    formats = sorted({v for v in stats["layers"].values()}, key=str)
    with torch.no_grad():
        want, got = dense(**inputs).logits, result.module(**inputs).logits
        lat = interleaved_medians({"dense": lambda: dense(**inputs), "lowered": lambda: result.module(**inputs)},
                                  clock)
    err = float((got - want).abs().max())
    d, s = lat["dense"], lat["lowered"]
    return (f"| {pattern} | {seq} | {stats['lowered']}/{len(stats['layers'])} ({', '.join(map(str, formats))}) "
            f"| {d * 1e3:.2f} ms | {s * 1e3:.2f} ms | {d / s:.2f}x | {err:.2e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", default="bench/results/sparse_e2e.md")
    parser.add_argument("--note", default="", help="a line for the report, e.g. how loaded the machine was")
    parser.add_argument("--clock", choices=list(CLOCK), default="wall",
                        help="cpu: process CPU time, steadier when other jobs share the cores")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(args.layers, pattern, seq, CLOCK[args.clock])
            for pattern in ("8x1", "unstructured") for seq in (1, 16)]
    lines = [f"- model: GPT2LMHeadModel, {args.layers} layers, hidden 768, MLP 3072, 12 heads, vocab 2048, random "
             "init; every block weight magnitude-pruned to 90% zeros; batch 1; 1 thread; median of 15 interleaved "
             f"runs; clock: {args.clock}",
             *([f"- note: {args.note}"] if args.note else []),
             "", "| pattern | seq len | layers lowered (formats) | dense | lowered | speedup | max abs error |",
             "|---|---|---|---|---|---|---|", *rows]
    publish(provenance("90%-sparse GPT-2 lowered by lower-sparse vs dense (batch 1)", *lines), args.out)


if __name__ == "__main__":
    main()
