"""One-shot channel pruning on the demo's trained digits network, no fine-tuning: graphopt's plain L2 pruning, the
same followed by ``recalibrate-bn``, with ``reconstruct=true`` (least-squares refit of the layers reading removed
channels, their mean folded into the next BatchNorm) and with ``importance=activation``; and Torch-Pruning (L2) with and without a BatchNorm re-estimation on the same
calibration batches, at the same ratio and at the ratio that keeps as many parameters as graphopt's result (one ratio
removes more in Torch-Pruning, which also prunes the residual stream feeding the ignored head).

    .venv/bin/python bench/oneshot_digits.py [--ratios 0.5,0.7] [--out bench/results/oneshot_digits.md]

The network is ``graphopt.examples.digits.DigitsNet`` trained as ``make demo`` trains it (seeded, 10 epochs), then
pruned with its BatchNorms in place (no ``fuse``, which would fold them away). Calibration: 8 training batches of 64.
Torch-Pruning needs ``pip install "torch-pruning>=1.5"`` (the bench extra); its rows are left out without it.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))
import graphopt  # noqa: E402
from benchkit import provenance, publish  # noqa: E402
from graphopt.examples.digits import DigitsNet, accuracy, load_digits_tensors  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", default="0.5,0.7")
    parser.add_argument("--out", default="bench/results/oneshot_digits.md")
    return parser.parse_args(argv)


def trained_model(data) -> nn.Module:
    """DigitsNet trained like the demo trains it."""
    x_train, y_train, _, _ = data
    torch.manual_seed(0)
    model = DigitsNet()
    graphopt.finetune(model, (x_train, y_train), epochs=10, lr=1e-2)
    return model.eval()


def reestimate_bn(model: nn.Module, calib) -> nn.Module:
    """Torch-Pruning's side of the comparison: running statistics reset, then averaged over the batches."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over all batches
    model.train()
    with torch.no_grad():
        for (x,) in calib:
            model(x)
    return model.eval()


def torch_pruning(model: nn.Module, example, ratio: float) -> nn.Module | None:
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    m = copy.deepcopy(model)
    tp.pruner.BasePruner(m, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                         global_pruning=False, ignored_layers=[m.head]).step()
    return m.eval()


def rows_for(model, data, calib, ratio: float) -> list[tuple[str, float, float]]:
    """(method, accuracy, parameter share kept) for one ratio."""
    _, _, x_test, y_test = data
    example = (x_test[:1],)
    dense = sum(p.numel() for p in model.parameters())
    params = lambda m: sum(p.numel() for p in m.parameters()) / dense  # noqa: E731
    prune = f"prune-channels:ratio={ratio},ignore=[head]"
    out = []
    plain = graphopt.optimize(model, [prune], example).module
    out.append(("graphopt l2", accuracy(plain, x_test, y_test), params(plain)))
    recal = graphopt.optimize(model, [prune, "recalibrate-bn"], example, calib_data=calib).module
    out.append(("graphopt l2 + recalibrate-bn", accuracy(recal, x_test, y_test), params(recal)))
    for label, passes in (("l2 + reconstruct", [prune + ",reconstruct=true"]),
                          ("l2 + reconstruct + recalibrate-bn", [prune + ",reconstruct=true", "recalibrate-bn"]),
                          ("activation + recalibrate-bn", [prune + ",importance=activation", "recalibrate-bn"]),
                          ("activation + reconstruct + recalibrate-bn",
                           [prune + ",importance=activation,reconstruct=true", "recalibrate-bn"])):
        pruned = graphopt.optimize(model, passes, example, calib_data=calib).module
        out.append((f"graphopt {label}", accuracy(pruned, x_test, y_test), params(pruned)))
    same_budget = _ratio_for_budget(model, example, params(recal), params)
    for label, tp_ratio in ((f"ratio {ratio:g}", ratio), (f"same parameters (ratio {same_budget:.3f})", same_budget)):
        tp_model = torch_pruning(model, example, tp_ratio)
        if tp_model is None:
            break
        out.append((f"Torch-Pruning l2, {label}", accuracy(tp_model, x_test, y_test), params(tp_model)))
        tp_model = reestimate_bn(tp_model, calib)
        out.append((f"Torch-Pruning l2 + BN re-estimation, {label}", accuracy(tp_model, x_test, y_test),
                    params(tp_model)))
    return out


def _ratio_for_budget(model, example, share: float, params) -> float:
    """The Torch-Pruning ratio whose result keeps ``share`` of the parameters (bisection): Torch-Pruning also
    prunes the channels of the residual stream that feeds the ignored head, so one ratio removes more there."""
    low, high = 0.0, 0.9
    for _ in range(12):
        mid = (low + high) / 2
        m = torch_pruning(model, example, mid)
        if m is None:
            return mid
        low, high = (mid, high) if params(m) > share else (low, mid)
    return (low + high) / 2


def main(argv=None) -> None:
    """Train, prune at each ratio, publish the table."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    data = load_digits_tensors()
    model = trained_model(data)
    x_train = data[0]
    calib = [(x_train[i:i + 64],) for i in range(0, 512, 64)]
    dense_acc = accuracy(model, data[2], data[3])
    lines = ["| ratio | method | test accuracy | parameters kept |", "|---|---|---|---|",
             f"| 0 | dense | {dense_acc:.2%} | 100% |"]
    for ratio in (float(r) for r in args.ratios.split(",")):
        for method, acc, kept in rows_for(model, data, calib, ratio):
            lines.append(f"| {ratio:g} | {method} | {acc:.2%} | {kept:.1%} |")
    head = provenance("One-shot channel pruning of the digits network, no fine-tuning",
                      f"- torch {torch.__version__}; DigitsNet trained 10 epochs (seed 0); 8 calibration batches of "
                      "64 training images; accuracy on the 450 held-out test images")
    publish(f"{head}\n\n" + "\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
