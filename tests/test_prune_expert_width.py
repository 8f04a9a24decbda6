"""prune-channels inside routed experts: each expert of an MoE layer loses the same number of intermediate channels
(the fused tensors stay rectangular), each its own; Mixtral, Qwen2-MoE (shared expert pruned as an MLP), DeepSeek-V3."""

import warnings

import pytest
import torch
import transformers

import graphopt
from graphopt.analysis.moe import find_moe_layers
from graphopt.calibration.expert_energy import expert_input_energy
from graphopt.errors import GraphoptWarning
from graphopt.graph.inputs import ExampleInputs
from test_prune_experts import CALIB, IDS, _model, _params

H, E = 64, 8  # hidden size, experts per layer (tests/test_prune_experts.py's configs)
# the hidden size kept whole (ignoring the embedding freezes its group), so the experts' arithmetic below is exact;
# test_the_hidden_size_prunes_through_the_experts prunes it too
HALF = "prune-channels:ratio=0.5,ignore=[model.embed_tokens]"


def _removed_at_half(family: str) -> int:
    """Parameters HALF removes, from the config arithmetic of each family's test model."""
    experts = lambda width: E * 3 * H * (width // 2)  # noqa: E731 - gate, up rows and down columns of every expert
    mlp = lambda width: 3 * H * (width // 2)  # noqa: E731 - a plain gated MLP
    if family == "mixtral":  # 4 query heads of 16 -> 2 (1 of 2 key-value heads); experts 48 -> 24
        return 2 * (32 * H + 16 * H + 16 * H + H * 32 + experts(48))
    if family == "qwen2_moe":  # the same heads, with q/k/v biases; shared expert 48 -> 24; experts 32 -> 16
        return 2 * (32 * H + 32 + 2 * (16 * H + 16) + H * 32 + mlp(48) + experts(32))
    q_lora = 8 * H + 8 + 8 * 4 * 16  # q_lora_rank 16 -> 8: q_a_proj rows, its norm, q_b_proj columns (4 heads x 16)
    return (q_lora + mlp(48)) + (q_lora + mlp(32) + experts(32))  # layer 0 dense; layer 1 shared + routed experts


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_ratio_zero_changes_nothing(family):
    model = _model(family)
    res = graphopt.optimize(model, "prune-channels:ratio=0", (IDS,))
    assert _params(res.module) == _params(model)
    torch.testing.assert_close(res.module(IDS).logits, model(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_half_the_expert_width_goes_and_the_model_comes_back(family, tmp_path):
    model = _model(family)
    res = graphopt.optimize(model, HALF, (IDS,))
    assert res.module(IDS).logits.shape == model(IDS).logits.shape
    assert _params(model) - _params(res.module) == _removed_at_half(family)
    moe = [name for name, _ in res.module.named_parameters() if name.endswith("experts.down_proj")]
    width = 24 if family == "mixtral" else 16
    for name in moe:
        layer = name.removesuffix(".down_proj")
        assert res.report.records[0].decisions[layer] == (f"expert width {2 * width} -> {width} (8 experts, each its "
                                                          "own channels by l2)")
    back = res.to_model()
    assert type(back) is type(model) and _params(back) == _params(res.module)
    config = back.config
    if family == "mixtral":
        assert config.intermediate_size == 24
    elif family == "qwen2_moe":
        assert (config.moe_intermediate_size, config.shared_expert_intermediate_size) == (16, 24)
        assert config.intermediate_size == 48  # no plain MLP layer: unchanged
    else:
        assert (config.moe_intermediate_size, config.intermediate_size, config.q_lora_rank) == (16, 24, 8)
    assert getattr(model.config, "moe_intermediate_size", model.config.intermediate_size) == 2 * width  # untouched
    torch.testing.assert_close(back(IDS).logits, res.module(IDS).logits)
    assert back.generate(IDS, max_new_tokens=3, do_sample=False).shape == (2, 11)
    back.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(IDS).logits, back(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family,dispatch", [("mixtral", None), ("qwen2_moe", None), ("deepseek_v3", None),
                                             ("qwen2_moe", "batched_mm")])
def test_the_hidden_size_prunes_through_the_experts(family, dispatch, tmp_path):
    model = _model(family)
    if dispatch:  # weights gathered per token and bmm(weight, x.unsqueeze(-1)): a per-token linear, not heads
        model.config._experts_implementation = dispatch
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphoptWarning)  # nothing frozen for want of a rule; the config describes it
        res = graphopt.optimize(model, "prune-channels:ratio=0.5", (IDS,))
        back = res.to_model()
    hidden = res.module.get_parameter("model.embed_tokens.weight").shape[1]
    assert hidden == back.config.hidden_size == H // 2
    for name, p in res.module.named_parameters():
        if name.endswith("experts.down_proj"):
            assert p.shape[:2] == (E, hidden)  # [experts, hidden, width]: the fused tensors follow the hidden size
    assert _params(res.module) < 0.4 * _params(model)  # about dense decoders' share (expert width alone: ~54% left)
    torch.testing.assert_close(back(IDS).logits, res.module(IDS).logits)
    assert back.generate(IDS, max_new_tokens=3, do_sample=False).shape == (2, 11)
    back.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(IDS).logits, back(IDS).logits, rtol=0, atol=0)


def test_each_expert_keeps_its_own_strongest_channels():
    model = _model("mixtral")
    pruned = graphopt.optimize(model, HALF, (IDS,)).module
    experts = model.model.layers[0].mlp.experts
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    kept = []
    for e in range(E):  # l2 score of channel c: its gate row, its up row and its down column, squared
        score = gate_up[e, :48].pow(2).sum(1) + gate_up[e, 48:].pow(2).sum(1) + down[e].pow(2).sum(0)
        keep = score.argsort(descending=True)[:24].sort().values
        kept.append(keep.tolist())
        got = pruned.get_parameter("model.layers.0.mlp.experts.gate_up_proj")[e]
        torch.testing.assert_close(got, torch.cat([gate_up[e, keep], gate_up[e, 48 + keep]]), rtol=0, atol=0)
        got = pruned.get_parameter("model.layers.0.mlp.experts.down_proj")[e]
        torch.testing.assert_close(got, down[e][:, keep], rtol=0, atol=0)
    assert len({tuple(k) for k in kept}) == E  # every expert chose differently


def test_experts_false_and_ignore_keep_the_expert_width():
    model = _model("mixtral")
    whole = graphopt.optimize(model, HALF + ",experts=false", (IDS,)).module
    assert whole.get_parameter("model.layers.1.mlp.experts.down_proj").shape == (E, H, 48)
    res = graphopt.optimize(model, "prune-channels:ratio=0.5,ignore=[model.embed_tokens,model.layers.0.mlp.experts]", (IDS,))
    assert res.module.get_parameter("model.layers.0.mlp.experts.down_proj").shape == (E, H, 48)
    assert res.module.get_parameter("model.layers.1.mlp.experts.down_proj").shape == (E, H, 24)
    with pytest.warns(GraphoptWarning, match=r"the mixtral config holds one intermediate_size, but after pruning its "
                                             r"layers would need \[24, 48\]"):
        back = res.to_model()
    torch.testing.assert_close(back(IDS).logits, res.module(IDS).logits)


def test_round_to_ratios_and_steps_count_experts_like_groups():
    model = _model("mixtral")
    res = graphopt.optimize(model, HALF + ",round_to=16", (IDS,))
    assert res.module.get_parameter("model.layers.0.mlp.experts.down_proj").shape == (E, H, 32)  # 24 up to 32
    spec = HALF + ",ratios=[[model.layers.1.mlp.experts,0.25]],steps=2"
    res = graphopt.optimize(model, spec, (IDS,))
    assert res.module.get_parameter("model.layers.0.mlp.experts.down_proj").shape == (E, H, 24)
    assert res.module.get_parameter("model.layers.1.mlp.experts.down_proj").shape == (E, H, 36)


@pytest.mark.parametrize("importance", ["taylor", "activation", "random"])
def test_other_importances_choose_other_channels(importance):
    model = _model("mixtral")
    ranked = {}
    for how in ("l2", importance):
        res = graphopt.optimize(model, f"{HALF},importance={how}", (IDS,), calib_data=CALIB)
        ranked[how] = res.module.get_parameter("model.layers.0.mlp.experts.down_proj")
        assert res.report.records[0].decisions["model.layers.0.mlp.experts"].endswith(f"by {how})")
        torch.testing.assert_close(res.to_model()(IDS).logits, res.module(IDS).logits)
    assert ranked["l2"].shape == ranked[importance].shape and not torch.equal(ranked["l2"], ranked[importance])


def test_batched_mm_dispatch_is_pruned_the_same_way():
    model = _model("qwen2_moe")
    model.config._experts_implementation = "batched_mm"
    res = graphopt.optimize(model, HALF, (IDS,))
    assert _params(model) - _params(res.module) == _removed_at_half("qwen2_moe")
    back = res.to_model()
    assert back.config.moe_intermediate_size == 16
    torch.testing.assert_close(back(IDS).logits, res.module(IDS).logits)


def test_activation_energy_is_the_down_input_mean_square_over_routed_tokens():
    model = _model("mixtral")
    experts = model.model.layers[0].mlp.experts
    seen = []
    handle = experts.register_forward_pre_hook(lambda m, args: seen.append((args[0], args[1])))
    with torch.no_grad():
        for (ids,) in CALIB:
            model(ids)
    handle.remove()
    total, rows = torch.zeros(E, 48, dtype=torch.float64), torch.zeros(E, 1, dtype=torch.float64)
    for hidden, index in seen:  # the down projection's input silu(gate h) * up h, for the tokens routed to e
        for e in range(E):
            h = hidden[(index == e).any(-1)]
            gate, up = (h @ experts.gate_up_proj[e].detach().T).chunk(2, -1)
            total[e] += (torch.nn.functional.silu(gate) * up).double().pow(2).sum(0)
            rows[e] += h.shape[0]
    gm = graphopt.optimize(model, [], (IDS,)).module
    layer = find_moe_layers(gm)[0]
    energy = expert_input_energy(gm, [(layer, f"{layer.experts}.down_proj", 48)], [ExampleInputs.of(b) for b in CALIB])
    torch.testing.assert_close(energy[layer.experts], total / rows)


def test_gpt_oss_interleaved_gate_up_with_biases_is_pruned_pairwise(tmp_path):
    torch.manual_seed(0)
    config = transformers.GptOssConfig(vocab_size=100, hidden_size=H, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                       num_experts_per_tok=2, max_position_embeddings=64,
                                       layer_types=["full_attention"] * 2)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    res = graphopt.optimize(model, HALF + ",attention=none", (IDS,))
    experts = model.model.layers[0].mlp.experts  # [E, hidden, 2 * width], gate at 2c, up at 2c + 1; down [E, width, H]
    gate_up, bias, down = experts.gate_up_proj.detach(), experts.gate_up_proj_bias.detach(), experts.down_proj.detach()
    pruned = res.module.get_submodule("model.layers.0.mlp.experts")
    for e in range(4):
        score = (gate_up[e].pow(2).sum(0) + bias[e].pow(2)).view(32, 2).sum(1) + down[e].pow(2).sum(1)
        keep = score.argsort(descending=True)[:16].sort().values
        rows = torch.stack([2 * keep, 2 * keep + 1], 1).flatten()
        torch.testing.assert_close(pruned.gate_up_proj[e], gate_up[e][:, rows], rtol=0, atol=0)
        torch.testing.assert_close(pruned.gate_up_proj_bias[e], bias[e][rows], rtol=0, atol=0)
        torch.testing.assert_close(pruned.down_proj[e], down[e][keep], rtol=0, atol=0)
    assert pruned.down_proj_bias.shape == (4, H)  # the output bias is the hidden size's
    assert _params(model) - _params(res.module) == 2 * 4 * (H * 16 * 2 + 16 * 2 + 16 * H)
    back = res.to_model()
    assert back.config.intermediate_size == 16
    torch.testing.assert_close(back(IDS).logits, res.module(IDS).logits)
    back.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(IDS).logits, back(IDS).logits, rtol=0, atol=0)


def test_experts_and_their_width_pruned_in_one_pipeline(tmp_path):
    model = _model("deepseek_v3")
    res = graphopt.optimize(model, ["prune-experts:n=4,criterion=random", HALF], (IDS,))
    back = res.to_model()
    assert (back.config.n_routed_experts, back.config.moe_intermediate_size) == (4, 16)
    assert back.model.layers[1].mlp.experts.gate_up_proj.shape == (4, 32, H)
    back.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(IDS).logits, res.module(IDS).logits)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_pruned_moe_exports_to_onnx_and_onnxruntime_agrees(family, tmp_path):
    model = _model(family)
    res = graphopt.optimize(model, ["prune-experts:n=4,criterion=random", "prune-channels:ratio=0.5"], (IDS,))
    report = graphopt.export_onnx(res.module, (IDS,), tmp_path / f"{family}.onnx")  # grouped_mm: our translation
    assert report.exporter == "dynamo" and report.dynamic_batch and len(report.verified_batches) >= 2
    assert report.max_abs_error is not None and report.max_abs_error < 1e-4
