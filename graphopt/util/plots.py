"""PNG plots for the demo and reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch.nn as nn


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_ratio(ratios: Sequence[float], curves: dict[str, Sequence[float]], baseline: float,
                      path: str | Path) -> Path | None:
    """Accuracy (one curve per label) against the channel pruning ratio; None if matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for label, values in curves.items():
        ax.plot(ratios, [100 * v for v in values], marker="o", label=label)
    ax.axhline(100 * baseline, color="gray", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("channels removed (prune-channels ratio)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits: accuracy vs pruning ratio")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def channels_per_layer(original: nn.Module, pruned: nn.Module, path: str | Path) -> Path | None:
    """Output channels of every conv/linear weight before and after pruning, as grouped bars."""
    plt = _pyplot()
    if plt is None:
        return None
    before = {n.removesuffix(".weight"): p.shape[0] for n, p in original.named_parameters()
              if n.endswith("weight") and p.dim() >= 2}
    after = {n.removesuffix(".weight"): p.shape[0] for n, p in pruned.named_parameters()
             if n.endswith("weight") and p.dim() >= 2}
    names = list(before)
    fig, ax = plt.subplots(figsize=(max(5.5, 0.45 * len(names)), 3.8), dpi=110)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [before[n] for n in names], width=0.4, label="original")
    ax.bar([x + 0.2 for x in xs], [after.get(n, 0) for n in names], width=0.4, label="optimized (0 = removed)")
    ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title("channels kept per layer")
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
