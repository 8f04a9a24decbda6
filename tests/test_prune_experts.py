"""prune-experts: whole routed experts removed from HF mixture-of-experts models (Mixtral, Qwen2-MoE, DeepSeek-V3)."""

import pytest
import torch
import transformers

import graphopt
from graphopt.errors import MissingDataError, PassError, PipelineError

COMMON = dict(vocab_size=100, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64)


def _model(family: str, **extra):
    torch.manual_seed(0)
    common = {**COMMON, **extra}
    if family == "mixtral":
        config = transformers.MixtralConfig(**{"num_local_experts": 8, **common})
    elif family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**{"num_experts": 8, "moe_intermediate_size": 32,
                                                "shared_expert_intermediate_size": 48, **common})
    else:
        config = transformers.DeepseekV3Config(**{
            "n_routed_experts": 8, "moe_intermediate_size": 32, "n_shared_experts": 1, "n_group": 2, "topk_group": 1,
            "first_k_dense_replace": 1, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8, "v_head_dim": 16, **common, "num_key_value_heads": 4})
    return transformers.AutoModelForCausalLM.from_config(config).eval()


IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
CALIB = [(torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(s)),) for s in (2, 3)]
EXPERT_COUNT = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "deepseek_v3": "n_routed_experts"}


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_half_the_experts_go_and_the_model_comes_back_with_its_config(family, tmp_path):
    model = _model(family)
    res = graphopt.optimize(model, "prune-experts:ratio=0.5", (IDS,), calib_data=CALIB)
    stats = res.report.records[0].stats
    assert stats["experts_before"] == 8 and stats["experts_after"] == 4
    assert res.module(IDS).logits.shape == model(IDS).logits.shape
    back = res.to_model()
    assert type(back) is type(model)
    assert getattr(back.config, EXPERT_COUNT[family]) == 4 and back.config.num_experts_per_tok == 2
    assert getattr(model.config, EXPERT_COUNT[family]) == 8  # the caller's model is untouched
    assert _params(back) == _params(res.module)
    original = dict(model.named_parameters())
    per_expert = 0
    for layer, gone in stats["removed"].items():
        assert len(gone) == 4
        keep = torch.tensor([e for e in range(8) if e not in gone])
        mlp = back.get_submodule(layer)
        for name, tensor in [*mlp.experts.named_parameters(prefix="experts"), ("gate.weight", mlp.gate.weight)]:
            torch.testing.assert_close(tensor, original[f"{layer}.{name}"][keep], rtol=0, atol=0)
            per_expert += original[f"{layer}.{name}"][0].numel()
        assert mlp.experts.num_experts == 4
    assert _params(back) == _params(model) - 4 * per_expert
    torch.testing.assert_close(back(IDS).logits, res.module(IDS).logits)
    assert back.generate(IDS, max_new_tokens=3, do_sample=False).shape == (2, 11)
    back.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(IDS).logits, back(IDS).logits)


def test_shared_experts_stay_whole():
    model = _model("qwen2_moe")
    back = graphopt.optimize(model, "prune-experts:n=3", (IDS,), calib_data=CALIB).to_model()
    for i in range(2):
        for name, p in model.model.layers[i].mlp.shared_expert.named_parameters():
            torch.testing.assert_close(back.model.layers[i].mlp.shared_expert.get_parameter(name), p, rtol=0, atol=0)
        assert back.model.layers[i].mlp.gate.weight.shape == (5, 64)


def test_group_limited_routing_loses_as_many_experts_in_every_group():
    model = _model("deepseek_v3")
    res = graphopt.optimize(model, "prune-experts:n=2", (IDS,), calib_data=CALIB)
    gone = res.report.records[0].stats["removed"]["model.layers.1.mlp"]
    assert sorted(e // 4 for e in gone) == [0, 1]  # one from each group of 4
    back = res.to_model()
    assert back.model.layers[1].mlp.gate.e_score_correction_bias.shape == (6,)
    assert back.config.n_routed_experts == 6 and back.config.n_group == 2
    with pytest.raises(PassError, match=r"'model.layers.1.mlp' routes within 2 groups of 4 experts .* must be a "
                                        r"multiple of 2, got 1: use n=2"):
        graphopt.optimize(model, "prune-experts:n=1", (IDS,), calib_data=CALIB)
    with pytest.raises(PassError, match=r"scores each of its 2 expert groups by its top 2 experts; removing 6 "
                                        r"leaves 1 per group: remove at most 4"):
        graphopt.optimize(model, "prune-experts:n=6,criterion=random", (IDS,))


def test_fewer_experts_left_than_top_k_caps_top_k(tmp_path):
    model = _model("mixtral", num_local_experts=4)
    res = graphopt.optimize(model, "prune-experts:n=3", (IDS,), calib_data=CALIB)
    stats = res.report.records[0].stats
    assert stats["experts_after"] == 1 and stats["top_k"] == {"model.layers.0.mlp": 1, "model.layers.1.mlp": 1}
    assert res.report.records[0].decisions["model.layers.0.mlp"].endswith("; top-k 2 -> 1")
    out = res.module(IDS).logits
    assert out.shape == model(IDS).logits.shape
    back = res.to_model()
    assert back.config.num_local_experts == 1 and back.config.num_experts_per_tok == 1
    assert model.config.num_experts_per_tok == 2  # the caller's model is untouched
    for layer in back.model.layers:
        assert layer.mlp.top_k == layer.mlp.gate.top_k == 1 and layer.mlp.experts.gate_up_proj.shape[0] == 1
    torch.testing.assert_close(back(IDS).logits, out)
    assert back.generate(IDS, max_new_tokens=3, do_sample=False).shape == (2, 11)
    back.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_experts_per_tok == 1
    torch.testing.assert_close(loaded(IDS).logits, out)


@pytest.mark.parametrize("family, implementation, extra, n, left", [
    ("mixtral", "batched_mm", {}, 7, 1),  # repeat_interleave(k) and the [tokens, k, hidden] view follow k
    ("qwen2_moe", None, {}, 7, 1),
    ("deepseek_v3", None, {"num_experts_per_tok": 6, "topk_group": 2}, 4, 4),  # 2 groups of 2 left, top-6 -> 4
])
def test_top_k_is_capped_in_every_family_and_dispatch(family, implementation, extra, n, left):
    model = _model(family, **extra)
    if implementation:
        model.config._experts_implementation = implementation
    res = graphopt.optimize(model, f"prune-experts:n={n},criterion=random", (IDS,))
    assert res.module(IDS).logits.shape == (2, 8, 100)
    back = res.to_model()
    assert back.config.num_experts_per_tok == left
    torch.testing.assert_close(back(IDS).logits, res.module(IDS).logits)


def test_batched_mm_dispatch_is_pruned_the_same_way():
    model = _model("mixtral")
    model.config._experts_implementation = "batched_mm"
    res = graphopt.optimize(model, "prune-experts:ratio=0.5,criterion=random", (IDS,))
    assert "histc" not in res.module.code
    back = res.to_model()
    assert back.config.num_local_experts == 4
    torch.testing.assert_close(back(IDS).logits, res.module(IDS).logits)


def _removed(model, spec: str, **kwargs) -> dict:
    res = graphopt.optimize(model, spec, (IDS,), **kwargs)
    return res.report.records[0].stats


def test_the_criteria_rank_differently_and_random_follows_its_seed():
    model = _model("mixtral")
    reap = _removed(model, "prune-experts:n=4", calib_data=CALIB)
    freq = _removed(model, "prune-experts:n=4,criterion=frequency", calib_data=CALIB)
    rand = _removed(model, "prune-experts:n=4,criterion=random")
    assert reap["removed"] != freq["removed"] != rand["removed"] != reap["removed"]
    assert _removed(model, "prune-experts:n=4,criterion=random")["removed"] == rand["removed"]
    assert _removed(model, "prune-experts:n=4,criterion=random,seed=1")["removed"] != rand["removed"]
    # frequency removes the experts least often in a token's top-k
    for layer, counts in freq["scores"].items():
        assert sum(counts) == 2 * 2 * 8 * 2  # batches x batch x sequence x top-k
        assert max(counts[e] for e in freq["removed"][layer]) <= min(
            c for e, c in enumerate(counts) if e not in freq["removed"][layer])


def test_reap_removes_a_silent_expert_first_though_it_is_routed_to_most():
    model = _model("mixtral")
    counts = _removed(model, "prune-experts:n=1,criterion=frequency", calib_data=CALIB)["scores"]["model.layers.0.mlp"]
    busiest = max(range(8), key=lambda e: counts[e])
    with torch.no_grad():  # the busiest expert of layer 0 now outputs zeros
        model.model.layers[0].mlp.experts.down_proj[busiest].zero_()
    reap = _removed(model, "prune-experts:n=1", calib_data=CALIB)
    freq = _removed(model, "prune-experts:n=1,criterion=frequency", calib_data=CALIB)
    assert reap["scores"]["model.layers.0.mlp"][busiest] == 0 < min(
        s for e, s in enumerate(reap["scores"]["model.layers.0.mlp"]) if e != busiest)
    assert reap["removed"]["model.layers.0.mlp"] == [busiest]  # it contributes nothing: REAP takes it first
    assert freq["removed"]["model.layers.0.mlp"] != [busiest]  # the router still picks it most


def test_ratio_zero_changes_nothing():
    res = graphopt.optimize(_model("mixtral"), "prune-experts:ratio=0,criterion=random", (IDS,))
    assert not res.report.records[0].modified
    assert res.to_model().config.num_local_experts == 8


@pytest.mark.parametrize("spec, message", [
    ("prune-experts:ratio=1.5", "prune-experts: ratio must be in [0, 1), got 1.5"),
    ("prune-experts:ratio=-0.1", "prune-experts: ratio must be in [0, 1), got -0.1"),
    ("prune-experts", "prune-experts: give either ratio= (a share of each layer's experts) or n= (experts removed "
                      "per layer), e.g. prune-experts:ratio=0.5"),
    ("prune-experts:ratio=0.5,n=2", "prune-experts: give either ratio="),
    ("prune-experts:n=-1", "prune-experts: n must be a whole number >= 0, got -1"),
    ("prune-experts:n=2,criterion=loudest", "prune-experts: criterion must be one of reap, frequency, random; got "
                                            "'loudest'"),
])
def test_bad_options_are_refused_before_anything_runs(spec, message):
    with pytest.raises(PipelineError) as info:
        graphopt.optimize(_model("mixtral"), spec, (IDS,))
    assert str(info.value).startswith(message)


def test_bad_counts_and_missing_data_are_clear_errors():
    model = _model("mixtral")
    with pytest.raises(PassError, match=r"n=8 would remove every one of the 8 experts of each MoE layer; n must be "
                                        r"below 8"):
        graphopt.optimize(model, "prune-experts:n=8,criterion=random", (IDS,))
    for criterion in ("reap", "frequency"):
        with pytest.raises(MissingDataError, match=f"prune-experts criterion={criterion} needs calibration data to "
                                                   "rank the experts"):
            graphopt.optimize(model, f"prune-experts:n=2,criterion={criterion}", (IDS,))


def test_a_model_without_experts_is_refused():
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    with pytest.raises(PassError, match=r"prune-experts: this model has no mixture-of-experts layer"):
        graphopt.optimize(model, "prune-experts:n=1,criterion=random", (IDS,))
