"""``result.to_model()``: the user's own class back, computing what the optimized graph computes, and trainable."""

from __future__ import annotations

import functools
import io
import warnings

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.errors import WritebackError
from graphopt.result.writeback_structure import ZeroBranch
from models import NAMES, build

PASSES = {
    "prune": "prune-channels:ratio=0.5",
    "remove": "remove-layers:use_example_inputs=true,protect=[],plain=true",
    "low-rank": "low-rank:energy=0.9",
    "fuse": "fuse",
    "sparse": "sparsify:sparsity=0.7,lower-sparse",
}
NO_BLOCKS = {"mlp"}  # remove-layers finds nothing to remove in these (no residual and no plain layer)


@functools.lru_cache(maxsize=None)
def _captured(name: str):
    """One capture per zoo model and test process, shared by the pipelines tested on it (capture is the slow part)."""
    case = build(name)
    inputs = case.example_inputs
    return case, graphopt.trace(case.model, inputs)


def _optimize(name: str, passes: str):
    case, graph = _captured(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = graphopt.optimize(case.model, passes, case.example_inputs, graph=graph)
    return case, res


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _first(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return next(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("kind", list(PASSES))
@pytest.mark.parametrize("name", NAMES)
def test_written_back_model_is_the_same_class_and_matches_the_graph(name, kind):
    if kind == "remove" and name in NO_BLOCKS:
        pytest.skip("no removable block")
    case, res = _optimize(name, PASSES[kind])
    state = {k: v.clone() for k, v in case.model.state_dict().items()}
    model = res.to_model()
    assert type(model) is type(case.model)
    assert model is not case.model
    with torch.no_grad():
        torch.testing.assert_close(_first(_call(model, case.example_inputs)), _first(_call(res.module, case.example_inputs)),
                                   rtol=1e-4, atol=1e-4)
    assert _params(model) == graphopt.count_params(res.module)
    for k, v in case.model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, state[k]), k


TRAINED = [(name, "prune") for name in NAMES] + [
    (name, kind) for kind in ("remove", "low-rank", "fuse", "sparse")
    for name in ("resnet_basic", "mobilenetv2", "vit", "hf_llama", "mlp")]


@pytest.mark.parametrize("name,kind", TRAINED)
def test_written_back_model_trains_in_a_plain_loop(name, kind):
    if kind == "remove" and name in NO_BLOCKS:
        pytest.skip("no removable block")
    case, res = _optimize(name, PASSES[kind])
    model = res.to_model().train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    target = torch.randn_like(_first(_call(model, case.example_inputs)).float())
    opt = torch.optim.Adam(trainable, lr=1e-3)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.mse_loss(_first(_call(model, case.example_inputs)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenetv2", "vgg"])
def test_batchnorm_of_the_written_back_model_uses_batch_statistics_in_train_mode(name):
    case, res = _optimize(name, "prune-channels:ratio=0.5")
    model = res.to_model()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    seen = {}
    bn.register_forward_hook(lambda _m, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    before = bn.running_mean.clone()
    x = case.example_inputs[0] * 3 + 1
    model.train()
    train_out = model(x)
    batch_stats = torch.nn.functional.batch_norm(seen["x"], None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    torch.testing.assert_close(seen["y"], batch_stats)
    assert not torch.equal(bn.running_mean, before)
    model.eval()
    assert not torch.allclose(train_out, model(x))


def test_removed_blocks_leave_their_lists_and_branches_become_zero_modules():
    case, res = _optimize("hf_llama", "remove-layers:blocks=[model.layers.0]")
    model = res.to_model()
    assert len(model.model.layers) == len(case.model.model.layers) - 1 == model.config.num_hidden_layers
    assert model.model.layers[0].self_attn.layer_idx == 0  # renumbered: the KV cache indexes the kept layers
    assert case.model.config.num_hidden_layers == 2  # the caller's config is untouched
    case, res = _optimize("resnet_basic", "remove-layers:blocks=[layers.2]")
    model = res.to_model()  # ReLU(x + f(x)): the block stays, its branch modules give zeros
    block = model.layers[2]
    assert all(isinstance(m, ZeroBranch) for name, m in block.named_children() if name != "relu")
    case, res = _optimize("hf_llama", "remove-layers:blocks=[model.layers.1.mlp],unit=branch")
    model = res.to_model()
    assert isinstance(model.model.layers[1].mlp, ZeroBranch)


def test_low_rank_layers_become_two_layers_and_masks_stay_parametrizations():
    _, res = _optimize("mlp", "low-rank:rank_ratio=0.25")
    model = res.to_model()
    pairs = [m for m in model.modules() if isinstance(m, nn.Sequential) and len(m) == 2
             and all(isinstance(c, nn.Linear) for c in m)]
    assert pairs and pairs[0][0].bias is None
    _, res = _optimize("vgg", "sparsify:sparsity=0.5")
    model = res.to_model()
    masked = [m for m in model.modules() if torch.nn.utils.parametrize.is_parametrized(m, "weight")]
    assert masked
    assert float((masked[0].weight == 0).float().mean()) >= 0.45


def test_folded_batchnorm_becomes_identity_and_the_conv_gets_a_bias():
    case, res = _optimize("resnet_basic", "fuse")
    model = res.to_model()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.Identity) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs)
    assert not all(c.bias is not None for c in case.model.modules() if isinstance(c, nn.Conv2d))


def test_written_back_model_saves_and_loads_with_torch_save():
    case, res = _optimize("resnet_basic", "prune-channels:ratio=0.5")
    model = res.to_model()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(*case.example_inputs), model(*case.example_inputs))
    fresh = build("resnet_basic").model
    with pytest.raises(RuntimeError):  # the pruned state no longer fits the original architecture
        fresh.load_state_dict(model.state_dict())


class HardCodedHeads(nn.Module):
    """An attention whose forward hard-codes its head layout in a tuple attribute graphopt cannot update."""

    def __init__(self):
        super().__init__()
        self.layout = (4, 16)
        self.qkv = nn.Linear(64, 192)
        self.proj = nn.Linear(64, 64)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, *self.layout).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


class HardCodedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = HardCodedHeads()
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        return self.head(x + self.attn(x))


def test_a_forward_with_a_hard_coded_pruned_size_gets_an_error_naming_module_and_attribute():
    torch.manual_seed(0)
    model = HardCodedNet().eval()
    res = graphopt.optimize(model, "prune-channels:ratio=0.5", (torch.randn(2, 5, 64),))
    with pytest.raises(WritebackError) as err:
        res.to_model()
    text = str(err.value)
    assert "module `attn`" in text
    assert "`attn.layout` = (4, 16)" in text
    assert "result.module" in text
    res.module(torch.randn(3, 5, 64))  # the graph result stays usable


def test_to_model_of_a_class_that_cannot_be_imported_says_so():
    class Local(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x)

    res = graphopt.optimize(Local(), "fuse", (torch.randn(2, 8),))
    with pytest.raises(WritebackError, match="not an nn.Module class you can import"):
        res.to_model()


def test_to_model_of_a_loaded_result_points_to_result_module(tmp_path):
    case, res = _optimize("mlp", "fuse")
    graphopt.save(res, tmp_path / "m.pt")
    loaded = graphopt.load(tmp_path / "m.pt")
    with pytest.raises(WritebackError, match="needs the result of graphopt.optimize in this process"):
        loaded.to_model()


def test_to_model_of_a_result_left_in_training_mode_checks_in_eval_and_restores_the_mode():
    from graphopt.examples.models import example_model

    model, inputs = example_model()
    res = graphopt.optimize(model, "prune-channels:ratio=0.5", inputs)
    res.module.train()  # the user trained result.module and did not switch it back
    written = res.to_model()
    assert res.module.training and type(written) is type(model)
    res.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(written.eval()(*inputs if isinstance(inputs, tuple) else (inputs,)),
                                   res.module(*inputs if isinstance(inputs, tuple) else (inputs,)))
