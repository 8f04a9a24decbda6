"""Expert pruning on a trained toy MoE: output error and loss as ``prune-experts`` removes experts per layer,
ranked by REAP (router-weighted expert output norm), routing frequency, or at random.

The model is a small HF Mixtral (hidden 64, 2 layers, 8 experts, top-2) trained from scratch for ``--steps`` on a
synthetic corpus: sequences from ``--languages`` random bigram "languages" (each its own sparse next-token table
over a shared vocabulary), so the router has something to specialise on. Experts are ranked on ``--calib``
batches of that corpus; the error is measured on held-out batches: ||logits_k - logits|| / ||logits||, the
next-token cross-entropy (the trained model's and the corpus' entropy floor are printed), and the share of positions
whose top-1 prediction is unchanged. Random is the mean of ``--seeds`` seeds.

Run from the repository root::

    .venv/bin/python bench/prune_experts.py            # writes bench/results/prune_experts.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import graphopt  # noqa: E402
from benchkit import provenance, publish  # noqa: E402

VOCAB, SEQ = 128, 32


def corpus(languages: int, seed: int = 0) -> torch.Tensor:
    """[languages, VOCAB, VOCAB] next-token probabilities: each language allows 4 successors per token."""
    gen = torch.Generator().manual_seed(seed)
    tables = torch.zeros(languages, VOCAB, VOCAB)
    for lang in range(languages):
        for tok in range(VOCAB):
            nxt = torch.randperm(VOCAB, generator=gen)[:4]
            tables[lang, tok, nxt] = torch.rand(4, generator=gen) + 0.2
    return tables / tables.sum(-1, keepdim=True)


def sample(tables: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    langs = torch.randint(0, tables.shape[0], (batch,), generator=gen)
    ids = torch.empty(batch, SEQ, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (batch,), generator=gen)
    for t in range(1, SEQ):
        ids[:, t] = torch.multinomial(tables[langs, ids[:, t - 1]], 1, generator=gen).squeeze(1)
    return ids


def entropy_floor(tables: torch.Tensor) -> float:
    """Mean next-token entropy of the corpus (nats), uniform over languages and current tokens (approximately)."""
    p = tables.clamp(min=1e-12)
    return float(-(p * p.log()).sum(-1).mean())


def train(tables: torch.Tensor, steps: int, batch: int) -> transformers.MixtralForCausalLM:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                        num_experts_per_tok=2, max_position_embeddings=SEQ, output_router_logits=True,
                                        router_aux_loss_coef=0.01)
    model = transformers.MixtralForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for step in range(steps):
        ids = sample(tables, batch, gen)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
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
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--languages", type=int, default=8)
    parser.add_argument("--calib", type=int, default=8, help="calibration batches of --batch sequences")
    parser.add_argument("--seeds", type=int, default=3, help="seeds averaged for criterion=random")
    parser.add_argument("--out", default=str(ROOT / "bench/results/prune_experts.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    tables = corpus(args.languages)
    start = time.perf_counter()
    model = train(tables, args.steps, args.batch)
    trained_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(2)
    calib = [(sample(tables, args.batch, gen),) for _ in range(args.calib)]
    held_out = [sample(tables, args.batch, gen) for _ in range(4)]
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
        f"- model: MixtralForCausalLM hidden 64, 2 layers, 8 experts, top-2, trained {args.steps} steps x "
        f"{args.batch} sequences of {SEQ} tokens on {args.languages} random bigram languages ({trained_s:.0f} s)",
        f"- dense model loss {dense_loss:.3f} nats; corpus entropy floor ~{entropy_floor(tables):.3f} nats "
        f"(uniform over {VOCAB} tokens: {torch.log(torch.tensor(float(VOCAB))):.3f})",
        f"- ranked on {args.calib} calibration batches, measured on 4 held-out batches; random: mean of "
        f"{args.seeds} seeds", "", *lines, "")
    publish(report, args.out)


if __name__ == "__main__":
    main()
