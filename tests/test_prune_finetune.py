"""Pruning a trained model for real: half the channels go, a short fine-tune brings the accuracy back.

The other pruning tests check that a pruned graph runs and keeps its shapes consistent; these check that what is
left is still a working network: the kept channels are the right ones, the sliced weights line up, gradients flow
through the pruned GraphModule, and the ``finetune`` hook of iterative pruning runs when it should.
"""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn", reason="the digits dataset ships with scikit-learn (a dev dependency)")

import graphopt  # noqa: E402
from digits import accuracy, torch_threads, train, trained_digits_cnn  # noqa: E402
from graphopt.passes.channel_prune import PruneChannels  # noqa: E402

MIN_ACCURACY = 0.93  # the unpruned model must have learned the task, or recovery means nothing
TOLERANCE = 0.02  # pruned + fine-tuned may lose at most 2 points of test accuracy
FINETUNE = dict(epochs=20, lr=5e-3)  # one-shot: the whole recovery happens after pruning
STEP_FINETUNE = dict(epochs=3, lr=3e-3)  # iterative: a little recovery between steps ...
FINAL_FINETUNE = dict(epochs=5, lr=3e-3)  # ... and a short one after the last


@pytest.fixture
def one_thread():
    """Run on one thread: deterministic numerics on any machine, no oversubscription of a small shared one."""
    with torch_threads(1):
        yield


@pytest.fixture
def trained(one_thread):
    model, data = trained_digits_cnn()
    acc_full = accuracy(model, data[2], data[3])
    assert acc_full >= MIN_ACCURACY, f"DigitsCNN reached only {acc_full:.4f} test accuracy"
    return model, data, acc_full


def test_prune_half_then_finetune_recovers_accuracy(trained):
    model, (x_train, y_train, x_test, y_test), acc_full = trained

    res = graphopt.optimize(model, ["prune-channels:ratio=0.5"], (x_test[:2],))
    pruned = res.module
    n_full, n_pruned = graphopt.count_params(model), graphopt.count_params(pruned)
    assert n_pruned <= 0.6 * n_full, f"parameters {n_full} -> {n_pruned}: expected a drop of at least 40%\n{res}"

    acc_pruned = accuracy(pruned, x_test, y_test)
    train(pruned, x_train, y_train, **FINETUNE)
    acc_finetuned = accuracy(pruned, x_test, y_test)
    assert acc_finetuned >= acc_full - TOLERANCE, (
        f"test accuracy: full {acc_full:.4f} ({n_full} params), right after pruning {acc_pruned:.4f}, "
        f"after fine-tuning {acc_finetuned:.4f} ({n_pruned} params)")
    assert accuracy(model, x_test, y_test) == acc_full  # the caller's model is untouched


def test_iterative_prune_with_recovery(trained):
    model, (x_train, y_train, x_test, y_test), acc_full = trained
    seen = []  # (step, params, accuracy before recovery) at each call of the hook

    def recover(gm, step):
        seen.append((step, graphopt.count_params(gm), accuracy(gm, x_test, y_test)))
        train(gm, x_train, y_train, seed=step + 1, **STEP_FINETUNE)

    res = graphopt.optimize(model, [PruneChannels(ratio=0.5, steps=3, finetune=recover)], (x_test[:2],))
    assert [step for step, *_ in seen] == [0, 1], f"finetune hook calls (step, params, acc): {seen}"
    n_full, n_pruned = graphopt.count_params(model), graphopt.count_params(res.module)
    assert n_pruned <= 0.6 * n_full, res

    acc_pruned = accuracy(res.module, x_test, y_test)
    train(res.module, x_train, y_train, seed=3, **FINAL_FINETUNE)
    acc_final = accuracy(res.module, x_test, y_test)
    assert acc_final >= acc_full - TOLERANCE, (
        f"test accuracy: full {acc_full:.4f} ({n_full} params); hook calls (step, params, acc): {seen}; "
        f"after the last step {acc_pruned:.4f}, after the final fine-tune {acc_final:.4f} ({n_pruned} params)")


def test_iterative_pruning_prunes_at_every_step(trained):
    model, (_, _, x_test, _), _ = trained
    sizes = []
    res = graphopt.optimize(
        model, [PruneChannels(ratio=0.5, steps=3, finetune=lambda gm, step: sizes.append(graphopt.count_params(gm)))],
        (x_test[:2],))
    sizes = [graphopt.count_params(model), *sizes, graphopt.count_params(res.module)]
    assert all(a > b for a, b in zip(sizes, sizes[1:])), f"parameters after each step: {sizes}\n{res}"
    assert sizes[-1] <= 0.6 * sizes[0], f"parameters after each step: {sizes}: expected a drop of at least 40%"
