"""Hugging Face models as from_pretrained gives them (use_cache=True, return_dict=True), and dynamic dims that hold:
traced at batch 1 and called at 4, traced at 8 and called at 1, other sequence lengths, padded masks."""

import warnings

import pytest
import torch
import torch.nn as nn

import graphopt
from models import build
from util import assert_same_outputs, rebatch

transformers = pytest.importorskip("transformers")

_SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, **_SPECIAL)


def _hf(name: str) -> nn.Module:
    """A small HF model in its default configuration (use_cache=True), in eval mode as from_pretrained returns it."""
    T = transformers
    builders = {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DECODER)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**_DECODER)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_DECODER)),
        "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**_DECODER, head_dim=16)),
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**_DECODER, head_dim=16)),
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**_DECODER, head_dim=16, sliding_window=4)),
        "phi": lambda: T.PhiForCausalLM(T.PhiConfig(**_DECODER)),
        "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**_DECODER)),
        "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
            **{k: v for k, v in _DECODER.items() if k != "num_key_value_heads"})),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_positions=64, n_embd=64, n_layer=2,
                                                       n_head=4, **_SPECIAL)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=100, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                                    num_attention_heads=4, max_position_embeddings=64,
                                                    word_embed_proj_dim=64, **_SPECIAL)),
        "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                             num_attention_heads=4, **_SPECIAL)),
        "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=4,
                                                          **_SPECIAL)),
        "bert": lambda: T.BertModel(T.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=128,
                                                 max_position_embeddings=64, pad_token_id=0)),
    }
    torch.manual_seed(0)
    return builders[name]().eval()


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(3, 100, (batch, seq), generator=torch.Generator().manual_seed(batch * 100 + seq))


def _padded(batch: int, seq: int) -> torch.Tensor:
    """Left padding, a different amount per row (row 0 none)."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        mask[row, : row % seq] = 0
    return mask


def _main(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _assert_same(gm, model, **inputs):
    with torch.no_grad():
        want, got = model(**inputs), gm(**inputs)
    assert type(got) is type(want)
    torch.testing.assert_close(_main(got), _main(want), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module", params=["llama", "gpt2", "bert"])
def captured(request):
    """(model, graph traced at batch 1 with input_ids + attention_mask, the model's config before the trace)."""
    model = _hf(request.param)
    config_before = model.config.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = graphopt.trace(model, {"input_ids": _ids(1, 8), "attention_mask": torch.ones(1, 8, dtype=torch.long)})
    return model, gm, config_before


def test_default_config_captures_and_returns_the_models_output_class(captured):
    model, gm, _ = captured
    assert gm.meta["graphopt_capture"] == "export"
    _assert_same(gm, model, input_ids=_ids(1, 8), attention_mask=torch.ones(1, 8, dtype=torch.long))
    out = gm(input_ids=_ids(1, 8))
    assert getattr(out, "past_key_values", None) is None  # no KV cache in a graph of one forward pass


@pytest.mark.parametrize("batch,seq", [(4, 8), (2, 5), (3, 16), (8, 1), (1, 1)])
def test_other_batches_and_lengths_with_padded_masks(captured, batch, seq):
    model, gm, _ = captured
    _assert_same(gm, model, input_ids=_ids(batch, seq), attention_mask=_padded(batch, seq))


@pytest.mark.parametrize("batch,seq", [(1, 8), (4, 6)])
def test_attention_mask_stays_optional(captured, batch, seq):
    model, gm, _ = captured
    _assert_same(gm, model, input_ids=_ids(batch, seq))  # an all-ones mask is what HF computes for None
    with torch.no_grad():  # input_ids positionally, as on the model
        torch.testing.assert_close(_main(gm(_ids(batch, seq))), _main(model(_ids(batch, seq))), rtol=1e-4, atol=1e-4)


def test_users_model_and_config_are_unchanged(captured):
    model, _, config_before = captured
    assert model.config.to_dict() == config_before
    assert model.config.use_cache is True and not model.training


@pytest.mark.parametrize("traced,called", [(1, 4), (8, 1)])
def test_llama_from_input_ids_alone_holds_across_batch_sizes(traced, called):
    model = _hf("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = graphopt.trace(model, {"input_ids": _ids(traced, 8)})
    _assert_same(gm, model, input_ids=_ids(called, 8))
    _assert_same(gm, model, input_ids=_ids(called, 5), attention_mask=_padded(called, 5))


@pytest.mark.slow  # 10-25 s each on 2 shared cores
@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt_neox", "opt",
                                  "falcon", "bloom"])
def test_more_families_in_default_config(name):
    model = _hf(name)
    gm = graphopt.optimize(model, ["dce"], {"input_ids": _ids(1, 8), "attention_mask": torch.ones(1, 8).long()}).module
    for batch, seq in [(1, 8), (4, 5)]:
        _assert_same(gm, model, input_ids=_ids(batch, seq), attention_mask=_padded(batch, seq))
        _assert_same(gm, model, input_ids=_ids(batch, seq))


@pytest.mark.slow
def test_vit_in_default_config():
    T = transformers
    torch.manual_seed(0)
    model = T.ViTModel(T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   image_size=32, patch_size=8)).eval()
    gm = graphopt.trace(model, {"pixel_values": torch.randn(1, 3, 32, 32)})
    for batch in (1, 4):
        _assert_same(gm, model, pixel_values=torch.randn(batch, 3, 32, 32))


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenetv2", "vit", "phi3_style"])
@pytest.mark.parametrize("traced,called", [(1, 4), (8, 1)])
def test_zoo_models_hold_across_batch_sizes(name, traced, called):
    case = build(name)
    gm = graphopt.trace(case.model, rebatch(case.example_inputs, traced))
    assert_same_outputs(gm, case.model, rebatch(case.example_inputs, called))


class ShortcutAtOne(nn.Module):
    """Branches on the batch being 1, with the same result either way (a shortcut, like HF's `q_len > 1`)."""

    def forward(self, x):
        if x.shape[0] > 1:
            return (x.unsqueeze(1) * 2).squeeze(1)
        return x * 2


class DifferentAtOne(nn.Module):
    def forward(self, x):
        return x * 2 if x.shape[0] > 1 else x


def test_a_size_one_guard_goes_where_the_graph_is_right_at_one():
    gm = graphopt.trace(ShortcutAtOne(), (torch.randn(3, 4),))
    x = torch.randn(1, 4)
    torch.testing.assert_close(gm(x), x * 2)


def test_a_size_one_guard_stays_where_size_one_computes_something_else():
    gm = graphopt.trace(DifferentAtOne(), (torch.randn(3, 4),))
    with pytest.raises(AssertionError, match=r"Guard failed: x.size\(\)\[0\] > 1"):
        gm(torch.randn(1, 4))


class CacheReturning(nn.Module):
    """Wraps an HF decoder and calls it in its default config: its output holds a DynamicCache."""

    def __init__(self):
        super().__init__()
        self.lm = _hf("llama")

    def forward(self, ids):
        return self.lm(input_ids=ids)


def test_a_cache_in_the_output_is_named_with_the_right_remedy():
    with pytest.raises(graphopt.TraceError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graphopt.trace(CacheReturning(), (_ids(1, 4),), capture="export", dynamic=False)
    message = str(info.value)
    assert message.endswith("What you can do: the model returns a DynamicCache object, which a graph cannot return: "
                            "return tensors, tuples, dicts or dataclasses instead (for a Hugging Face model inside "
                            "a wrapper, call it with use_cache=False).")
    assert "control flow" not in message
