"""graphopt.finetune: recovery after pruning, distillation from the original, bf16 autocast, the pruning hook."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn", reason="the digits dataset ships with scikit-learn (a dev dependency)")

import graphopt  # noqa: E402
from digits import accuracy, torch_threads, trained_digits_cnn  # noqa: E402
from graphopt.passes.channel_prune import PruneChannels  # noqa: E402
from graphopt.training.loop import distillation_loss, finetune_callback  # noqa: E402


@pytest.fixture
def pruned():
    """A trained DigitsCNN, the data, and the graph with half its channels removed (accuracy drops)."""
    with torch_threads(1):
        model, data = trained_digits_cnn()
        res = graphopt.optimize(model, "prune-channels:ratio=0.5", (data[2][:2],))
        yield model, data, res.module


def test_finetune_recovers_pruned_accuracy_with_distillation(pruned):
    model, (x_train, y_train, x_test, y_test), gm = pruned
    acc_full, acc_pruned = accuracy(model, x_test, y_test), accuracy(gm, x_test, y_test)
    history = graphopt.finetune(gm, (x_train, y_train), epochs=10, lr=5e-3, teacher=model)
    acc_tuned = accuracy(gm, x_test, y_test)
    assert len(history) == 10 and history[-1] < history[0], history
    assert acc_tuned >= acc_full - 0.02 and acc_tuned > acc_pruned, (acc_full, acc_pruned, acc_tuned, history)
    assert accuracy(model, x_test, y_test) == acc_full  # the teacher is not trained


def test_bf16_autocast_trains_fp32_weights(pruned):
    _, (x_train, y_train, x_test, y_test), gm = pruned
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    history = graphopt.finetune(gm, (x_train[:256], y_train[:256]), epochs=2, lr=1e-3, amp="bf16")
    assert all(torch.isfinite(torch.tensor(history)))
    assert all(p.dtype == torch.float32 for p in gm.parameters())
    changed = [k for k, v in gm.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no parameter changed"


def test_distillation_alone_from_unlabelled_batches(pruned):
    model, (x_train, _, x_test, _), gm = pruned
    with torch.no_grad():
        gap = distillation_loss(gm(x_test), model(x_test), 4.0).item()
    batches = [x_train[i:i + 64] for i in range(0, 512, 64)]
    history = graphopt.finetune(gm, batches, epochs=3, lr=3e-3, teacher=model, alpha=1.0)
    with torch.no_grad():
        after = distillation_loss(gm(x_test), model(x_test), 4.0).item()
    assert after < gap and history[-1] < history[0], (gap, after, history)


def test_callback_runs_between_pruning_steps(pruned):
    model, (x_train, y_train, _, _), _ = pruned
    calls = []
    recover = finetune_callback((x_train[:128], y_train[:128]), epochs=1, lr=1e-3)
    res = graphopt.optimize(model, [PruneChannels(ratio=0.5, steps=3,
                                                  finetune=lambda gm, step: (calls.append(step), recover(gm, step)))],
                            (x_train[:2],))
    assert calls == [0, 1]
    assert graphopt.count_params(res.module) < 0.6 * graphopt.count_params(model)


@pytest.mark.parametrize("kwargs, message", [
    (dict(epochs=0, lr=1e-3), "finetune: epochs must be a positive integer, got 0"),
    (dict(epochs=1, lr=1e-3, amp="fp16"), "finetune: amp='fp16' needs a CUDA model; on CPU use amp='bf16'"),
    (dict(epochs=1, lr=1e-3, amp="int8"), "finetune: amp must be None, 'bf16' or 'fp16', got 'int8'"),
])
def test_bad_options(pruned, kwargs, message):
    _, (x_train, y_train, _, _), gm = pruned
    with pytest.raises(graphopt.InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        graphopt.finetune(gm, (x_train, y_train), **kwargs)


def test_inputs_without_targets_need_a_teacher(pruned):
    _, (x_train, _, _, _), gm = pruned
    with pytest.raises(graphopt.InputError, match="a batch of inputs without targets needs a teacher="):
        graphopt.finetune(gm, [x_train[:8]], epochs=1, lr=1e-3)
