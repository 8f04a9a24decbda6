"""Expert pruning on a trained toy MoE: output error and loss as ``prune-experts`` removes experts per layer,
ranked by REAP (router-weighted expert output norm), routing frequency, or at random.

The model is a small HF Mixtral (hidden 64, 2 layers, 8 experts, top-2) trained from scratch, byte by byte, on real
text that ships with the venv: numpy's own ``.py`` sources (tests excluded; every 10th file held out), for
``--steps`` AdamW steps (warm-up, then cosine decay) at one thread, seeded: a fixed budget of about three CPU
minutes. Experts are ranked on ``--calib`` batches of the training files and measured on held-out files:
||logits_k - logits|| / ||logits||, the next-byte cross-entropy (the dense model's, and the held-out text's unigram
byte entropy, the loss of a model that ignores context, are printed), and the share of positions whose top-1
prediction is unchanged. Random is the mean of ``--seeds`` seeds.

Run from the repository root::

    .venv/bin/python bench/prune_experts.py            # writes bench/results/prune_experts.md
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy
import torch
import torch.nn.functional as F
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import graphopt  # noqa: E402
from benchkit import provenance, publish  # noqa: E402

VOCAB, SEQ = 256, 64


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """(training bytes, held-out bytes) of numpy's non-test ``.py`` sources, sorted by path, every 10th held out."""
    files = sorted(p for p in Path(numpy.__file__).parent.rglob("*.py") if "tests" not in p.parts)
    parts: tuple[list, list] = ([], [])
    for i, path in enumerate(files):
        parts[i % 10 == 9].append(path.read_bytes())
    return tuple(torch.frombuffer(bytearray(b"".join(p)), dtype=torch.uint8).long() for p in parts)


def sample(text: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` windows of SEQ bytes at random offsets."""
    start = torch.randint(0, text.numel() - SEQ, (batch,), generator=gen)
    return torch.stack([text[s:s + SEQ] for s in start.tolist()])


def unigram_entropy(text: torch.Tensor) -> float:
    """Entropy (nats) of the byte frequencies of ``text``."""
    p = torch.bincount(text, minlength=VOCAB).double() / text.numel()
    return float(-(p[p > 0] * p[p > 0].log()).sum())


def train(text: torch.Tensor, steps: int, batch: int, lr: float) -> transformers.MixtralForCausalLM:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                        num_experts_per_tok=2, max_position_embeddings=SEQ, output_router_logits=True,
                                        router_aux_loss_coef=0.01)
    model = transformers.MixtralForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    gen = torch.Generator().manual_seed(1)
    model.train()
    for step in range(steps):
        ids = sample(text, batch, gen)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"step {step}: loss {float(loss.detach()):.3f}", flush=True)
    model.config.output_router_logits = False
    return model.eval()


@torch.no_grad()
def evaluate(model, reference: list[torch.Tensor], held_out: list[torch.Tensor]) -> tuple[float, float, float]:
    errs, losses, same = [], [], []
    for ids, ref in zip(held_out, reference):
        logits = model(ids).logits
        errs.append(float((logits - ref).norm() / ref.norm()))
        losses.append(float(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())))
        same.append(float((logits.argmax(-1) == ref.argmax(-1)).float().mean()))
    n = len(held_out)
    return sum(errs) / n, sum(losses) / n, sum(same) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--calib", type=int, default=8, help="calibration batches of --batch sequences")
    parser.add_argument("--held-out", type=int, default=8, help="measured batches of --batch sequences")
    parser.add_argument("--seeds", type=int, default=3, help="seeds averaged for criterion=random")
    parser.add_argument("--out", default=str(ROOT / "bench/results/prune_experts.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_text, held_text = corpus()
    start = time.perf_counter()
    model = train(train_text, args.steps, args.batch, args.lr)
    trained_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(2)
    calib = [(sample(train_text, args.batch, gen),) for _ in range(args.calib)]
    held_out = [sample(held_text, args.batch, gen) for _ in range(args.held_out)]
    with torch.no_grad():
        reference = [model(ids).logits for ids in held_out]
    _, dense_loss, _ = evaluate(model, reference, held_out)
    graph = graphopt.trace(model, calib[0])
    rows = []
    for n in (1, 2, 3, 4, 5, 6):
        for criterion in ("reap", "frequency", "random"):
            seeds = range(args.seeds) if criterion == "random" else (0,)
            results = []
            for seed in seeds:
                spec = f"prune-experts:n={n},criterion={criterion},seed={seed}"
                res = graphopt.optimize(model, spec, calib[0], calib_data=calib, graph=graph)
                results.append(evaluate(res.module, reference, held_out))
            err, loss, same = (sum(r[i] for r in results) / len(results) for i in range(3))
            rows.append(f"| {n} | {8 - n} | {criterion} | {err:.3f} | {loss:.3f} | {same:.1%} |")
            print(rows[-1], flush=True)
    lines = ["| removed per layer | experts left | criterion | rel. logits error | loss (nats) | top-1 same |",
             "|---|---|---|---|---|---|", *rows]
    report = provenance(
        "prune-experts: REAP vs frequency vs random on a trained toy Mixtral",
        f"- model: MixtralForCausalLM hidden 64, 2 layers, 8 experts (width 128), top-2, bytes as tokens; trained "
        f"{args.steps} steps x {args.batch} sequences of {SEQ} bytes of numpy {numpy.__version__}'s .py sources "
        f"({train_text.numel() / 1e6:.1f} MB, tests excluded), AdamW lr {args.lr:g} warm-up + cosine, 1 thread, "
        f"seeded ({trained_s:.0f} s)",
        f"- dense model held-out loss {dense_loss:.3f} nats ({dense_loss / math.log(2):.2f} bits/byte); unigram byte "
        f"entropy of the held-out text {unigram_entropy(held_text):.3f} nats (uniform: {math.log(VOCAB):.3f})",
        f"- ranked on {args.calib} calibration batches of the training files, measured on {args.held_out} batches of "
        f"the held-out files ({held_text.numel() / 1e6:.2f} MB); random: mean of {args.seeds} seeds",
        "- still a toy: 2 layers of hidden 64 trained for minutes; a criterion's lead of a few hundredths of a nat "
        "here is no claim about real MoE models", "", *lines, "")
    publish(report, args.out)


if __name__ == "__main__":
    main()
