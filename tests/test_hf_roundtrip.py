"""Hugging Face models in their default configs (``use_cache=True``, ``return_dict=True``): optimize, write back,
then ``generate()`` with the KV cache equals cache-free greedy decoding, and ``save_pretrained`` +
``from_pretrained`` rebuilds the pruned model from its config alone with identical logits."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import graphopt

transformers = pytest.importorskip("transformers")

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               max_position_embeddings=64)
_GQA = dict(_COMMON, num_key_value_heads=2)
FAMILIES = {  # name -> (config class, model class, config kwargs, extra pass options)
    "llama": ("LlamaConfig", "LlamaForCausalLM", _GQA, ""),
    "mistral": ("MistralConfig", "MistralForCausalLM", _GQA, ""),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _GQA, ""),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_GQA, head_dim=16), ""),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_GQA, head_dim=16), ",ignore=[model.embed_tokens]"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_GQA, pad_token_id=0), ""),
    "phi": ("PhiConfig", "PhiForCausalLM", _COMMON, ""),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64), ""),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _COMMON, ""),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, ffn_dim=128, max_position_embeddings=64,
                                                word_embed_proj_dim=64), ""),
}
REMOVE_FAILS = {"opt": "remove-layers' scoring fails on OPT's graph (a size mismatch in the pass; not write-back)"}


def _build(family: str):
    config_cls, model_cls, kwargs, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    assert model.config.use_cache and model.config.use_return_dict  # the default config, as from_pretrained gives
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, extra


@functools.lru_cache(maxsize=None)
def _captured(family: str):
    """One capture per family and test process (HF capture is the slow step), shared by its pipelines."""
    model, inputs, extra = _build(family)
    return model, inputs, extra, graphopt.trace(model, inputs)


def _write_back(family: str, passes: str):
    model, inputs, extra, graph = _captured(family)
    passes += extra if passes.startswith("prune") else ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = graphopt.optimize(model, passes, inputs, graph=graph)
        pruned = res.to_model()
    notes = [str(w.message) for w in caught if "to_model" in str(w.message)]
    assert not notes, notes  # the config describes the model
    return model, inputs, res, pruned


@pytest.mark.slow
@pytest.mark.parametrize("passes", ["prune-channels:ratio=0.5", "remove-layers:n=1,use_example_inputs=true,protect=[]"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_pruned_hf_model_generates_saves_and_reloads(family, passes, tmp_path):
    if passes.startswith("remove") and family in REMOVE_FAILS:
        pytest.skip(REMOVE_FAILS[family])
    model, inputs, res, pruned = _write_back(family, passes)
    assert type(pruned) is type(model)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(pruned(**inputs).logits, res.module(**inputs).logits, rtol=1e-4, atol=1e-4)
    prompt = dict(inputs, max_new_tokens=6, do_sample=False)
    cached = pruned.generate(**prompt, use_cache=True)
    assert torch.equal(cached, pruned.generate(**prompt, use_cache=False))
    assert cached.shape == (2, 14)
    rebuilt = type(pruned)(pruned.config)  # the config alone gives modules of the pruned shapes
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    pruned.save_pretrained(tmp_path)
    reloaded = getattr(transformers, "AutoModelForCausalLM").from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(pruned)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, pruned(**inputs).logits)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64  # the caller's config untouched


def test_config_fields_follow_pruned_shapes():
    model, inputs, res, pruned = _write_back("llama", "prune-channels:ratio=0.5")
    c = pruned.config
    attn = pruned.model.layers[0].self_attn
    assert c.hidden_size == pruned.model.embed_tokens.embedding_dim < 64
    assert attn.q_proj.out_features == c.num_attention_heads * c.head_dim
    assert attn.k_proj.out_features == c.num_key_value_heads * c.head_dim
    assert pruned.model.layers[0].mlp.up_proj.out_features == c.intermediate_size < 128


def test_removed_layer_renumbers_layer_idx_and_layer_count():
    model, inputs, res, pruned = _write_back("qwen2", "remove-layers:blocks=[model.layers.0]")
    assert pruned.config.num_hidden_layers == len(pruned.model.layers) == 1
    assert len(pruned.config.layer_types) == 1
    assert pruned.model.layers[0].self_attn.layer_idx == 0


def test_a_config_that_cannot_describe_the_result_warns():
    model, inputs, _ = _build("gemma")  # Gemma scales embeddings by sqrt(hidden_size): pruning it cannot be described
    res = graphopt.optimize(model, "prune-channels:ratio=0.5", inputs)
    with pytest.warns(graphopt.GraphoptWarning, match="from_pretrained cannot rebuild this model"):
        pruned = res.to_model()
    torch.testing.assert_close(pruned(**inputs).logits, res.module(**inputs).logits, rtol=1e-4, atol=1e-4)


def test_layers_of_different_widths_still_write_back_and_warn_about_the_config():
    model, inputs, _ = _build("llama")
    res = graphopt.optimize(model, "prune-channels:ratio=0.5,ratios=[[model.layers.0.mlp.*,0.25]]", inputs)
    with pytest.warns(graphopt.GraphoptWarning, match="different widths after pruning"):
        pruned = res.to_model()
    widths = [layer.mlp.up_proj.out_features for layer in pruned.model.layers]
    assert widths[0] != widths[1]
    torch.testing.assert_close(pruned(**inputs).logits, res.module(**inputs).logits, rtol=1e-4, atol=1e-4)


def test_global_ranking_keeps_repeated_layers_uniform_on_hf_models():
    model, inputs, _extra, graph = _captured("llama")

    def mlp_widths(passes: str) -> list[int]:
        res = graphopt.optimize(model, passes, inputs, graph=graph)
        return res, [p.shape[0] for n, p in res.module.named_parameters() if n.endswith("up_proj.weight")]

    res, widths = mlp_widths("prune-channels:ratio=0.5,global_ranking=true")
    assert len(set(widths)) == 1 and widths[0] < 128
    with warnings.catch_warnings():
        warnings.simplefilter("error", graphopt.GraphoptWarning)  # the config describes it: no warning
        assert res.to_model().config.intermediate_size == widths[0]
    _, free = mlp_widths("prune-channels:ratio=0.5,global_ranking=true,uniform=false")
    assert sum(free) == pytest.approx(sum(widths), abs=len(widths))  # the same budget, spent per layer
