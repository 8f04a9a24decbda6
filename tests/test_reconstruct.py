"""prune-channels' one-shot repair (reconstruct=true), the activation-aware importance, named Taylor losses and
what a ratio means on grouped-query attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
import graphopt.calibration.reconstruct as reconstruct
from graphopt.analysis.importance import named_loss
from graphopt.errors import MissingDataError

transformers = pytest.importorskip("transformers")


class MLP(nn.Module):
    def __init__(self, widths=(8, 16, 4)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def _correlated(n=256, features=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 3, generator=g)
    return base @ torch.randn(3, features, generator=g) + 0.05 * torch.randn(n, features, generator=g)


def _kept_rows(new: torch.Tensor, old: torch.Tensor) -> list[int]:
    """Which rows of ``old`` the pruned ``new`` kept (rows are copied, not changed, by pruning a producer)."""
    return [int((old - row).abs().sum(1).argmin()) for row in new]


def test_refit_is_the_least_squares_optimum_on_the_kept_inputs_with_the_mean_in_the_bias():
    torch.manual_seed(0)
    model = MLP().eval()
    x = _correlated()
    calib = [(x[i:i + 64],) for i in range(0, 256, 64)]
    res = graphopt.optimize(model, ["prune-channels:ratio=0.5,reconstruct=true,damp=0"], (x[:4],), calib_data=calib)
    first, second = res.module.get_submodule("layers.0"), res.module.get_submodule("layers.1")
    kept = _kept_rows(first.weight.detach(), model.layers[0].weight.detach())
    assert len(kept) == 8
    with torch.no_grad():
        hidden = torch.relu(model.layers[0](x))
        target = model.layers[1](hidden)
        design = torch.cat([hidden[:, kept], torch.ones(len(x), 1)], 1).double()
        solution = torch.linalg.lstsq(design, target.double()).solution
    torch.testing.assert_close(second.weight.detach().double(), solution[:-1].T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second.bias.detach().double(), solution[-1], rtol=1e-4, atol=1e-5)
    plain = graphopt.optimize(model, ["prune-channels:ratio=0.5"], (x[:4],)).module
    with torch.no_grad():
        err = lambda m: float((m(x) - model(x)).pow(2).mean())  # noqa: E731
        assert err(res.module) < 0.5 * err(plain)
    decision = res.report.records[0].decisions["layers.1"]
    assert "in 16 -> 8" in decision and "refit on 256 input rows (8 of 16 inputs removed)" in decision
    assert "folded into bias" in decision
    assert res.report.records[0].stats["layers_refit"] == 1


def test_each_layer_is_refit_on_the_inputs_of_the_already_repaired_layers_before_it(monkeypatch):
    torch.manual_seed(1)
    model = MLP((8, 16, 16, 4)).eval()
    x = _correlated(seed=1)
    calib = [(x[i:i + 128],) for i in range(0, 256, 128)]
    seen = {}
    real = reconstruct.refit_least_squares

    def recording(weight, xtx, kept, **kw):
        new, bias = real(weight, xtx, kept, **kw)
        seen[kw["layer"]] = dict(xtx=xtx.clone(), kept=kept.clone(), weight=new, bias=bias)
        return new, bias

    monkeypatch.setattr(reconstruct, "refit_least_squares", recording)
    graphopt.optimize(model, ["prune-channels:ratio=0.5,reconstruct=true"], (x[:4],), calib_data=calib)
    assert set(seen) == {"layers.1.weight", "layers.2.weight"}
    b = seen["layers.1.weight"]
    repaired = torch.zeros(16, 16, dtype=b["weight"].dtype)
    repaired[:, b["kept"]] = b["weight"]
    with torch.no_grad():
        h1 = torch.relu(model.layers[0](x))
        h2_repaired = torch.relu(h1 @ repaired.T + b["bias"]).double()
        h2_original = torch.relu(model.layers[1](h1)).double()
    torch.testing.assert_close(seen["layers.2.weight"]["xtx"], h2_repaired.T @ h2_repaired, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(seen["layers.2.weight"]["xtx"], h2_original.T @ h2_original, rtol=1e-3)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))).mean((2, 3))


def test_a_conv_without_bias_gets_the_removed_mean_through_the_batchnorm_after_it():
    torch.manual_seed(0)
    model = ConvBN()
    with torch.no_grad():  # statistics that describe the data, as after training
        model.train()
        for _ in range(20):
            model(torch.randn(32, 3, 8, 8) + 1)
    model.eval()
    calib = [(torch.randn(16, 3, 8, 8) + 1,) for _ in range(4)]
    x = torch.randn(8, 3, 8, 8) + 1
    plain = graphopt.optimize(model, ["prune-channels:ratio=0.5"], (x,)).module
    res = graphopt.optimize(model, ["prune-channels:ratio=0.5,reconstruct=true"], (x,), calib_data=calib)
    state = res.module.state_dict()
    assert state["conv2.weight"].shape == (8, 8, 3, 3) and "conv2.bias" not in state
    with torch.no_grad():
        ref = model(x)
        err = lambda m: float((m(x) - ref).pow(2).mean() / ref.pow(2).mean())  # noqa: E731
        assert err(res.module) < 0.5 * err(plain)
    assert "folded into the next BatchNorm's running mean" in res.report.records[0].decisions["conv2"]
    assert not torch.equal(state["bn2.running_mean"], model.bn2.running_mean)


def test_reconstruct_needs_calibration_data_and_says_so():
    model = MLP().eval()
    x = _correlated()[:4]
    with pytest.raises(MissingDataError, match=r"prune-channels needs calibration data for reconstruct=true"):
        graphopt.optimize(model, ["prune-channels:reconstruct=true"], (x,))


def test_the_user_model_is_untouched_by_reconstruct():
    model = MLP().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _correlated()
    graphopt.optimize(model, ["prune-channels:ratio=0.5,reconstruct=true"], (x[:4],), calib_data=[(x,)])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_activation_importance_removes_a_channel_with_big_weights_that_never_fires():
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():
        model.layers[0].weight[3] = -0.01 * model.layers[0].weight[3].abs().sign()  # small, and relu keeps it ~0
        model.layers[0].bias[3] = -1.0
        model.layers[1].weight[:, 3] = 50.0  # huge weights: l2 ranks channel 3 first
    x = _correlated().abs()
    kept = {}
    for importance in ("l2", "activation"):
        res = graphopt.optimize(model, [f"prune-channels:ratio=0.5,importance={importance}"], (x[:4],),
                                calib_data=[(x,)])
        kept[importance] = _kept_rows(res.module.get_submodule("layers.0").weight.detach(), model.layers[0].weight.detach())
    assert 3 in kept["l2"] and 3 not in kept["activation"]


def _llama(heads=8, kv_heads=4, hidden=128, layers=1):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=96,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def test_cross_entropy_loss_is_the_models_own_next_token_loss():
    model = _llama()
    ids = torch.randint(0, 64, (2, 12))
    out = model(input_ids=ids)
    torch.testing.assert_close(named_loss("cross-entropy")(out, {"input_ids": ids}),
                               model(input_ids=ids, labels=ids).loss)
    logits = torch.randn(5, 3)
    torch.testing.assert_close(named_loss("cross-entropy")(logits, (torch.randn(5, 2),)),
                               nn.functional.cross_entropy(logits, logits.argmax(1)))
    assert named_loss("output-norm") is None


def test_taylor_with_a_named_loss_prunes_differently_from_the_output_norm():
    model = _llama(layers=2)
    ids = torch.randint(0, 64, (2, 12))
    calib = [{"input_ids": torch.randint(0, 64, (4, 12))} for _ in range(2)]
    widths = {}
    for loss in ("output-norm", "cross-entropy"):
        res = graphopt.optimize(model, [f"prune-channels:ratio=0.25,importance=taylor,loss={loss}"],
                                {"input_ids": ids}, calib_data=calib)
        widths[loss] = res.module.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert widths["output-norm"].shape == widths["cross-entropy"].shape == (72, 96)
    assert not torch.equal(widths["output-norm"], widths["cross-entropy"])


def test_a_ratio_removes_that_share_of_the_query_heads_once_cutting_key_value_heads_first():
    model = _llama()
    ids = torch.randint(0, 64, (2, 12))
    res = graphopt.optimize(model, ["prune-channels:ratio=0.5"], {"input_ids": ids})
    pruned = res.to_model()
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (4, 2)
    assert pruned.model.layers[0].self_attn.num_key_value_groups == 2
    note = res.report.records[0].decisions["model.layers.0.self_attn"]
    assert note == "query heads 8 -> 4 (4 key-value heads x 2 repeats -> 2 x 2; cut: key-value heads)"
    torch.testing.assert_close(pruned(input_ids=ids).logits, res.module(input_ids=ids).logits)


def test_reconstruct_on_a_decoder_lowers_the_error_and_gives_back_a_model_that_generates():
    model = _llama(heads=4, kv_heads=2, layers=2)
    ids = torch.randint(0, 64, (2, 12))
    calib = [{"input_ids": torch.randint(0, 64, (8, 12))} for _ in range(4)]
    ref = model(input_ids=ids).logits
    errors = {}
    for rec in ("false", "true"):
        res = graphopt.optimize(model, [f"prune-channels:ratio=0.25,reconstruct={rec}"], {"input_ids": ids},
                                calib_data=calib)
        pruned = res.to_model()
        with torch.no_grad():
            errors[rec] = float((pruned(input_ids=ids).logits - ref).pow(2).mean())
    assert errors["true"] < errors["false"]
    out = pruned.generate(input_ids=ids[:, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 7)


def test_bad_calibration_input_gets_its_documented_error():
    from graphopt.errors import InputError

    model = MLP().eval()
    x = _correlated()
    with pytest.raises(InputError, match=r"calibration batch 1: input .* is \(4, 9\) float32, but the model was "
                                         r"traced with \(4, 8\) float32; only the batch dimension may differ"):
        graphopt.optimize(model, ["prune-channels:reconstruct=true"], (x[:4],), calib_data=[(x[:4],), (torch.randn(4, 9),)])
    with pytest.raises(InputError, match=r"calibration batch 0"):
        graphopt.optimize(model, ["sparsify:method=sparsegpt"], (x[:4],), calib_data=[(torch.randn(4, 9),)])
    nan = x.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(InputError, match=r"layers\.0\.weight"):
        graphopt.optimize(model, ["sparsify:method=sparsegpt"], (x[:4],), calib_data=[(nan,)])


def test_a_singular_gram_matrix_is_damped_and_without_damping_named_with_a_remedy():
    from graphopt.errors import InputError

    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():  # hidden channels 0..7 are copies of 8..15: the kept inputs are linearly dependent
        model.layers[0].weight[:8] = model.layers[0].weight[8:]
        model.layers[0].bias[:8] = model.layers[0].bias[8:]
    x = _correlated()
    calib = [(x,)]
    res = graphopt.optimize(model, ["prune-channels:ratio=0.25,reconstruct=true"], (x[:4],), calib_data=calib)
    assert torch.isfinite(res.module(x)).all()
    with pytest.raises(InputError, match=r"layer 'layers\.1\.weight': the kept inputs' Gram matrix is singular even "
                                         r"with damping 0 \(damp=0.0\).*use damp > 0"):
        graphopt.optimize(model, ["prune-channels:ratio=0.25,reconstruct=true,damp=0"], (x[:4],), calib_data=calib)
