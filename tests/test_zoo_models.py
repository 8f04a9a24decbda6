"""Sanity tests for the shared model zoo in tests/models.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from models import CNN_NAMES, HF_NAMES, NAMES, TRANSFORMER_NAMES, ZooCase, build

# HF models import transformers (slow-ish); mark them so `-m "not slow"` can skip them.
PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in HF_NAMES else n for n in NAMES]

REQUIRED = {
    "mlp", "vgg", "resnet_basic", "resnet_bottleneck", "mobilenetv2", "mobilenetv3",
    "densenet", "inception", "shufflenet", "convnext", "vit", "unet", "swin", "mlp_mixer",
    "poolformer", "masked_conv", "phi3_style",
    "hf_bert", "hf_gpt2", "hf_llama", "hf_mistral", "hf_qwen2",
}  # fmt: skip


def run(case: ZooCase) -> list[torch.Tensor]:
    """Call the model with its example inputs; return every output tensor, flattened."""
    with torch.no_grad():
        if isinstance(case.example_inputs, dict):
            out = case.model(**case.example_inputs)
        else:
            out = case.model(*case.example_inputs)
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def test_names_and_subsets():
    assert set(NAMES) == REQUIRED
    assert len(NAMES) == len(set(NAMES))
    assert set(HF_NAMES) == {n for n in NAMES if n.startswith("hf_")}
    assert set(HF_NAMES) <= set(TRANSFORMER_NAMES)
    assert {"poolformer", "masked_conv", "unet", "convnext"} <= set(CNN_NAMES)
    assert {"vit", "swin", "mlp_mixer", "phi3_style"} <= set(TRANSFORMER_NAMES)
    assert not set(CNN_NAMES) & set(TRANSFORMER_NAMES)


def test_unknown_name():
    with pytest.raises(KeyError):
        build("no_such_model")


@pytest.mark.parametrize("name", PARAMS)
def test_builds_and_runs(name):
    case = build(name)
    assert case.name == name
    assert isinstance(case.model, nn.Module)
    assert not any(m.training for m in case.model.modules()), "model must be in eval() mode"
    assert isinstance(case.example_inputs, (tuple, dict))
    assert sum(p.numel() for p in case.model.parameters()) < 2_000_000
    outputs = run(case)
    assert outputs
    for out in outputs:
        assert out.shape[0] == 2  # batch size 2 everywhere
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", PARAMS)
def test_deterministic(name):
    a, b = build(name), build(name)
    for x, y in zip(tree_leaves(a.example_inputs), tree_leaves(b.example_inputs)):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)
    for x, y in zip(run(a), run(b)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", PARAMS)
def test_tags(name):
    case = build(name)
    bns = [m for m in case.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert ("bn" in case.tags) == bool(bns)
    assert ("cnn" in case.tags) == (name in CNN_NAMES)
    assert ("transformer" in case.tags) == (name in TRANSFORMER_NAMES)
    assert ("hf" in case.tags) == (name in HF_NAMES)
    # BatchNorm must not be the identity, or conv-BN folding tests would prove nothing.
    for bn in bns:
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
