"""prune-channels on the breadth zoo (tests/models_breadth.py): nn.MultiheadAttention's folded heads, patch
regrouping and im2col/col2im, per-head bias tables, sequence pooling, ``x @ weight.T`` with multi-query attention,
dynamic convolution heads and TF-"SAME" padding.

Each model: ratio 0 is the identity; ratio 0.5 runs on two batch sizes with the original output shapes, removes at
least half of the parameters, is written back into the user's class and exported to ONNX (checked in onnxruntime);
and the pruning is exact: the pruned model equals the original with the removed channels' weights zeroed.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.analysis.dependency import DependencyGraph
from graphopt.analysis.dependency.apply import apply_channel_plan
from graphopt.errors import WritebackError
from graphopt.passes.channel_prune import PruneChannels
from graphopt.result.pruned_mha import PrunedMultiheadAttention
from models import BREADTH_NAMES, build
from models_breadth import FalconStyle, ParallelMqaBlock
from util import assert_same_outputs, outputs, rebatch

aten = torch.ops.aten
NORMS = (aten.layer_norm.default, aten.rms_norm.default, aten.group_norm.default)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", BREADTH_NAMES)
def test_ratio_zero_is_the_identity(name):
    case = build(name)
    res = graphopt.optimize(case.model, [PruneChannels(ratio=0.0)], case.example_inputs)
    assert _n_params(res.module) == _n_params(case.model)
    for batch in (case.example_inputs, rebatch(case.example_inputs, 3)):
        assert_same_outputs(res.module, case.model, batch, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pruned():
    """name -> (case, result of prune-channels at ratio 0.5), built once per model."""
    cache = {}

    def get(name):
        if name not in cache:
            case = build(name)
            before = copy.deepcopy(case.model.state_dict())
            res = graphopt.optimize(case.model, [PruneChannels(ratio=0.5)], case.example_inputs)
            for k, v in case.model.state_dict().items():
                assert torch.equal(v, before[k]), f"optimize changed the caller's `{k}`"
            cache[name] = (case, res)
        return cache[name]
    return get


@pytest.mark.parametrize("name", BREADTH_NAMES)
def test_half_ratio_runs_keeps_shapes_and_removes_parameters(name, pruned):
    case, res = pruned(name)
    assert _n_params(res.module) <= 0.5 * _n_params(case.model), res.report
    for batch in (case.example_inputs, rebatch(case.example_inputs, 3)):
        got, want = outputs(res.module, batch), outputs(case.model, batch)
        assert [g.shape for g in got] == [w.shape for w in want]
        assert all(torch.isfinite(g).all() for g in got)


@pytest.mark.parametrize("name", BREADTH_NAMES)
def test_half_ratio_writes_back_into_the_users_class(name, pruned):
    case, res = pruned(name)
    model = res.to_model()
    assert type(model) is type(case.model)
    assert _n_params(model) == _n_params(res.module)
    assert set(model.state_dict()) <= set(case.model.state_dict())  # graph constants are not attached as state
    for batch in (case.example_inputs, rebatch(case.example_inputs, 3)):
        assert_same_outputs(model, res.module, batch, rtol=1e-5, atol=1e-5)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert_same_outputs(torch.load(buffer, weights_only=False), model, case.example_inputs, rtol=0, atol=0)


@pytest.mark.parametrize("name", BREADTH_NAMES)
def test_half_ratio_exports_and_onnxruntime_agrees(name, pruned, tmp_path):
    case, res = pruned(name)
    report = graphopt.export_onnx(res.module, case.example_inputs, tmp_path / f"{name}.onnx")
    assert report.dynamic_batch and len(report.verified_batches) >= 2
    assert report.max_abs_error is not None and report.max_abs_error < 1e-3


def _groups_outside_norms(gm, dep) -> list:
    """Prunable groups none of whose members a channel norm (LayerNorm, RMSNorm, GroupNorm) reads: removing their
    channels is exactly equivalent to zeroing them."""
    normed = {n.target for node in gm.graph.nodes if node.op == "call_function" and node.target in NORMS
              for n in node.all_input_nodes if n.op == "get_attr"}
    return [g for g in dep.prunable_groups if not any(m.param in normed for m in g.members)]


@pytest.mark.parametrize("name", BREADTH_NAMES)
def test_pruning_equals_zeroing_the_removed_channels(name):
    """Zero every parameter row of the removed channels (producers' outputs, norms' scales and shifts, consumers'
    inputs): those channels then carry zeros and no kept channel reads them, which is what removing them means.
    A wrong dependency rule (channels of a folded reshape, im2col rows, a bias table or a pooled sequence
    mapped to the wrong rows) makes the two differ."""
    case = build(name)
    gm = graphopt.trace(case.model, case.example_inputs)
    ctx = graphopt.Context(case.example_inputs)
    dep = DependencyGraph(gm, ctx)
    groups = _groups_outside_norms(gm, dep)
    assert groups, "no group to check"
    pass_ = PruneChannels(ratio=0.4)
    plan = {g: idx for g, idx in pass_.plan(gm, dep, ctx, 0.4).items() if g in groups and len(idx)}
    assert plan, "nothing planned outside the norms"
    reference = copy.deepcopy(gm)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for group, removed in plan.items():
            for m in group.members:
                if m.param in params:
                    rows = torch.from_numpy(m.rows[np.isin(m.channel, removed)])
                    params[m.param].index_fill_(m.dim, rows, 0.0)
    apply_channel_plan(gm, dep, plan)
    assert _n_params(gm) < _n_params(reference)
    for batch in (case.example_inputs, rebatch(case.example_inputs, 3)):
        for got, want in zip(outputs(gm, batch), outputs(reference, batch)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_multihead_attention_loses_heads_and_comes_back_as_a_narrow_subclass(pruned):
    case, res = pruned("mha_vit")
    model = res.to_model()
    for path, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            assert type(m) is PrunedMultiheadAttention, path
            assert m.num_heads < 4 and m.in_proj_weight.shape == (3 * m.num_heads * m.head_dim, m.embed_dim)
            assert m.embed_dim == res.module.get_parameter(f"{path}.out_proj.weight").shape[0]


@pytest.mark.parametrize("batch_first", [True, False])
def test_pruned_multihead_attention_computes_what_torch_does(batch_first):
    """Unpruned, the subclass is nn.MultiheadAttention: outputs and attention weights agree, with masks."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    ours = copy.deepcopy(ref)
    ours.__class__ = PrunedMultiheadAttention
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    pad = torch.tensor([[False] * 6 + [True], [False] * 7])
    causal = torch.randn(5, 7)
    for kwargs in (dict(), dict(key_padding_mask=pad), dict(attn_mask=causal, average_attn_weights=False),
                   dict(attn_mask=causal > 0.5, key_padding_mask=pad)):
        want, want_w = ref(q, kv, kv, **kwargs)
        got, got_w = ours(q, kv, kv, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-5)
    unbatched = q[:, 0] if not batch_first else q[0]
    torch.testing.assert_close(ours(unbatched, unbatched, unbatched)[0], ref(unbatched, unbatched, unbatched)[0],
                               rtol=1e-5, atol=1e-5)


class HeadsPlusTwoBlock(ParallelMqaBlock):
    """The block with its fused head count written as arithmetic on an attribute: ``self.heads + 2``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.norm(x)
        qkv = self.qkv(h).view(b, n, self.heads + 2, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (qkv[:, :, :-2], qkv[:, :, [-2]], qkv[:, :, [-1]]))
        attn = torch.nn.functional.scaled_dot_product_attention(q, k.expand_as(q), v.expand_as(q), is_causal=True)
        return x + self.dense(attn.transpose(1, 2).reshape(b, n, -1)) + self.down(torch.nn.functional.gelu(self.up(h)))


def test_a_head_count_written_as_arithmetic_is_named_when_write_back_cannot_follow():
    """The graph prunes the query heads (the view's 6 becomes 4); the module's ``heads + 2`` cannot be updated from
    that constant, so to_model() names the module and what to write instead, rather than returning a broken model."""
    torch.manual_seed(0)
    model = FalconStyle().eval()
    for block in model.blocks:
        block.__class__ = HeadsPlusTwoBlock
    ids = torch.randint(0, 100, (2, 16))
    res = graphopt.optimize(model, [PruneChannels(ratio=0.5)], (ids,))
    assert res.module(ids).shape == model(ids).shape
    with pytest.raises(WritebackError, match=r"module `blocks.0` raised RuntimeError.*write it as -1"):
        res.to_model()
