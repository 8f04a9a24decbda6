"""Pruning warnings say what really blocks: ops without a dependency rule are named only where they alone keep
channels whole (not HF's mask and position arithmetic), and a prune that removes almost nothing says why."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
import models
from graphopt.analysis.dependency import DependencyGraph
from graphopt.analysis.dependency.walk import RULES
from util import WithCustomOp, mystery


@pytest.fixture(autouse=True)
def _mystery_has_no_rule():
    """test_channel_prune registers a rule for the mystery op; here it must have none."""
    op = torch.ops.graphopt_test.mystery
    saved = {k: RULES.pop(k) for k in (op, op.default) if k in RULES}
    yield
    RULES.update(saved)


def _prune(model, inputs, spec="prune-channels:ratio=0.5"):
    """optimize(...) and the messages of the GraphoptWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = graphopt.optimize(model, spec, inputs)
    return result, [str(w.message) for w in caught if issubclass(w.category, graphopt.GraphoptWarning)]


def _hf_opt():
    from transformers import OPTConfig, OPTForCausalLM
    return OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _lm_inputs(**extra):
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.int64), **extra}


@pytest.mark.parametrize("make,extra", [(models.make_hf_llama, {"use_cache": False}),
                                        (models.make_hf_gpt2, {"use_cache": False}),
                                        (_hf_opt, {})],  # OPT's positions are attention_mask.cumsum
                         ids=["llama", "gpt2", "opt"])
def test_hf_decoders_prune_without_naming_mask_and_position_ops(make, extra):
    result, messages = _prune(make().eval(), _lm_inputs(**extra))
    record = result.report.records[0]
    assert record.params_after < 0.5 * record.params_before
    assert not [m for m in messages if "cumsum" in m or "diff" in m or "dependency rule" in m], messages
    assert not [m for m in messages if "almost nothing" in m], messages


def test_opt_cumsum_is_analysed_but_freezes_no_group():
    gm = graphopt.trace(_hf_opt().eval(), _lm_inputs())
    dep = DependencyGraph(gm)
    assert any("cumsum" in reason for reason in dep.unknown_ops.values())  # it is there, without a rule
    assert not dep.blocking_ops()
    assert not [r for g in dep.groups for r in g.frozen.values() if "cumsum" in r]


def test_custom_op_on_a_channel_path_is_named_with_its_node():
    x = torch.randn(2, 3, 4, 4)
    result, messages = _prune(WithCustomOp(), x)
    named = [m for m in messages if "no dependency rule for graphopt_test.mystery.default" in m]
    assert len(named) == 1 and "`mystery`" in named[0] and "register_rule" in named[0], messages
    assert result.module.get_parameter("a.weight").shape[0] == 8
    dep = DependencyGraph(graphopt.trace(WithCustomOp(), x))
    group = next(g for g in dep.groups if any((m.param, m.dim) == ("a.weight", 0) for m in g.members))
    reasons = set(group.frozen.values())
    assert len(reasons) == 1
    reason = reasons.pop()
    assert "graphopt_test.mystery.default" in reason and "node `mystery`" in reason and "dependency rule" in reason
    assert "Which channels move together" in reason  # where the README shows how to write one
    assert dep.blocking_ops() == {"mystery": (reason, 16)}  # a.weight rows and b.weight columns


class CustomOpOffTheChannels(nn.Module):
    """The unknown op sees only a mask input (no channel of any group): it is no reason to warn."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x, mask):
        return self.down(F.relu(self.up(x))) * mystery(mask).mean()


def test_custom_op_off_the_channel_paths_is_not_named():
    result, messages = _prune(CustomOpOffTheChannels(), (torch.randn(2, 8), torch.ones(2, 4)))
    assert not [m for m in messages if "mystery" in m or "almost nothing" in m], messages
    assert result.module.get_parameter("up.weight").shape[0] == 8


class FalconStyleBlock(nn.Module):
    """Multi-query attention (one shared K/V head) and an MLP, both reading one LayerNorm output, summed into the
    residual (Falcon-7B's parallel block)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.ln = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim + 2 * self.head_dim, bias=False)
        self.dense = nn.Linear(dim, dim, bias=False)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln(x)
        q, k, v = self.qkv(h).split([d, self.head_dim, self.head_dim], dim=-1)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = (z.view(b, t, 1, self.head_dim).transpose(1, 2) for z in (k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attn = self.dense(attn.transpose(1, 2).reshape(b, t, d))
        return x + attn + self.down(F.gelu(self.up(h)))


class FalconStyle(nn.Module):
    def __init__(self, vocab=64, dim=32, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(FalconStyleBlock(dim) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def test_falcon_style_block_prunes_without_warnings():
    """Multi-query attention and a parallel MLP need nothing special: heads and MLP channels go."""
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    result, messages = _prune(FalconStyle().eval(), ids)
    assert not messages
    assert result.module.get_parameter("blocks.0.up.weight").shape[0] == 64


def _hf_falcon():
    from transformers import FalconConfig, FalconForCausalLM
    return FalconForCausalLM(FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                                          pad_token_id=0, bos_token_id=1, eos_token_id=2))


def test_hf_falcon_multi_query_parallel_block_prunes_through_tensor_t(tmp_path):
    """transformers' Falcon linear layers compute ``x @ weight.T`` (aten.numpy_T): with its rule, the default-config
    model (multi-query attention, parallel attention/MLP) prunes at ratio 0.5 without any warning of frozen
    channels, keeps its output shapes, and its written-back model still generates and round-trips through
    save_pretrained/from_pretrained (its query heads go with the hidden size, as its config derives head_dim)."""
    model = _hf_falcon().eval()
    inputs = _lm_inputs()
    result, messages = _prune(model, inputs)
    assert not [m for m in messages if "almost nothing" in m or "no dependency rule" in m], messages
    record = result.report.records[0]
    assert record.params_after < 0.5 * record.params_before
    with torch.no_grad():
        want = model(**inputs).logits
        got = result.module(**inputs)
    got = got["logits"] if isinstance(got, dict) else got[0]
    assert got.shape == want.shape
    with warnings.catch_warnings():
        warnings.simplefilter("error", graphopt.GraphoptWarning)  # the config describes it: heads went with the hidden
        written = result.to_model()  # size (the key/value head picked by a constant index is renumbered)
    assert written.config.num_attention_heads * 16 == written.config.hidden_size < 64
    assert written.generate(inputs["input_ids"][:1], max_new_tokens=3, do_sample=False).shape == (1, 11)
    written.save_pretrained(tmp_path)
    reloaded = type(written).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, written(**inputs).logits, rtol=0, atol=0)
        torch.testing.assert_close(written(**inputs).logits, got, rtol=1e-5, atol=1e-5)


class AllBehindCustomOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.c(mystery(self.b(mystery(self.a(x)))))


def test_blocked_model_warns_almost_nothing_with_top_reasons_by_parameters():
    result, messages = _prune(AllBehindCustomOps(), torch.randn(2, 8))
    almost = [m for m in messages if "removed almost nothing" in m]
    assert len(almost) == 1, messages
    top = almost[0].split("by parameters held: ")[1]
    assert top.startswith("no dependency rule for graphopt_test.mystery.default at nodes `mystery`, `mystery_1` ("), top
    assert "model input `x`" in top and "model output" in top  # the next reasons, each with its share
    unknown = [m for m in messages if m.startswith("prune-channels: no dependency rule")]
    assert len(unknown) == 1 and "`mystery`, `mystery_1`" in unknown[0]


@pytest.mark.parametrize("name", ["mlp", "resnet_basic"])
def test_plain_prunes_do_not_warn(name):
    case = models.build(name)
    result, messages = _prune(case.model, case.example_inputs)
    assert not messages
    assert result.report.records[0].params_after < 0.5 * result.report.records[0].params_before


def test_ratio_zero_never_warns_almost_nothing():
    _, messages = _prune(models.make_mlp().eval(), (torch.randn(2, 64),), "prune-channels:ratio=0")
    assert not messages
