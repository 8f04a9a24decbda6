"""fake-quant on a trained model: PTQ and QAT accuracy on digits, BatchNorm statistics under QAT, LSQ scales."""

from __future__ import annotations

import pytest
import torch

import graphopt
from digits import accuracy, train, trained_digits_cnn
from graphopt.quant import convert, prepare_qat, quantizers, sqnr_db
from util import outputs


@pytest.fixture(scope="module")
def digits():
    model, (x_train, y_train, x_test, y_test) = trained_digits_cnn()
    calib = [x_train[i:i + 128] for i in range(0, 512, 128)]
    return model, calib, (x_train, y_train, x_test, y_test)


def test_ptq_accuracy_within_one_point(digits):
    model, calib, (_, _, x_test, y_test) = digits
    res = graphopt.optimize(model, "fake-quant", x_test[:2], calib_data=calib)
    assert accuracy(res.module, x_test, y_test) >= accuracy(model, x_test, y_test) - 0.01


def test_qat_keeps_batch_norm_statistics_and_accuracy(digits):
    model, calib, (x_train, y_train, x_test, y_test) = digits
    gm = graphopt.optimize(model, "fake-quant:qat=true", x_test[:2], calib_data=calib).module
    means = {k: v.clone() for k, v in gm.named_buffers() if k.endswith("running_mean")}
    assert len(means) == 4  # BatchNorm is kept for QAT (simulated fold), not folded away
    float_acc = accuracy(model, x_test, y_test)
    assert accuracy(gm, x_test, y_test) >= float_acc - 0.01  # in eval mode the simulated fold is the real fold
    prepare_qat(gm, learnable_scales=True)
    gm.train()  # works on the quantized graph: BatchNorm uses batch statistics and updates its running ones
    train(gm, x_train, y_train, epochs=2, lr=1e-3)  # (digits.train leaves a GraphModule's mode alone)
    gm.eval()
    after = dict(gm.named_buffers())
    assert all(not torch.equal(means[k], after[k]) for k in means)  # running statistics were updated
    assert accuracy(gm, x_test, y_test) >= float_acc - 0.005
    deployed = convert(gm)
    torch.testing.FileCheck().check_not("aten.batch_norm").check_not("qat_bn").check_not("unscale_output").run(deployed.code)
    assert sqnr_db(outputs(gm, (x_test,)), outputs(deployed, (x_test,))) > 30  # the fold matches the simulation
    assert accuracy(deployed, x_test, y_test) >= float_acc - 0.005


def test_learnable_scales_receive_gradients(digits):
    model, calib, (x_train, y_train, _, _) = digits
    gm = graphopt.optimize(model, "fake-quant", x_train[:2], calib_data=calib[:1]).module
    prepare_qat(gm, learnable_scales=True)
    gm.train()
    torch.nn.functional.cross_entropy(gm(x_train[:32]), y_train[:32]).backward()
    grads = [q.scale.grad for q in quantizers(gm).values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    assert all(p.grad is not None for name, p in gm.named_parameters() if name.endswith("weight"))  # STE


def test_prepare_qat_needs_a_calibrated_graph(digits):
    model, calib, (_, _, x_test, _) = digits
    gm = graphopt.optimize(model, "fake-quant", x_test[:2], calib_data=calib[:1]).module
    name, q = next(iter(quantizers(gm).items()))
    q.state = "observe"
    with pytest.raises(graphopt.InputError, match=f"prepare_qat needs a calibrated graph; quantizer {name} has no"):
        prepare_qat(gm)
