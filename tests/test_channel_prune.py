"""prune-channels: identity at ratio 0, real reductions at 0.5 on every zoo model, options, errors, lowering."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.analysis.dependency import DependencyGraph, register_rule
from graphopt.analysis.dependency.apply import apply_channel_plan
from graphopt.analysis.dependency.rules_elementwise import elementwise
from graphopt.passes.channel_prune import PruneChannels
from models import NAMES, build
from util import WithCustomOp, assert_same_outputs, mystery, outputs, rebatch

# Where a model cannot lose 40% at ratio 0.5, the reason is listed here (none today: Bert's residual width is
# frozen because it is the model's output, last_hidden_state, yet heads and MLPs still cut 40% of its parameters).
BELOW_40_PERCENT: dict[str, str] = {}


@pytest.mark.parametrize("name", NAMES)
def test_ratio_zero_is_the_identity(name):
    case = build(name)
    res = graphopt.optimize(case.model, [PruneChannels(ratio=0.0)], case.example_inputs)
    assert not res.report.records[0].modified
    for got, want in zip(outputs(res.module, case.example_inputs), outputs(case.model, case.example_inputs)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", NAMES)
def test_half_ratio_shrinks_every_model_and_keeps_its_outputs_shaped(name):
    case = build(name)
    res = graphopt.optimize(case.model, ["prune-channels:ratio=0.5"], case.example_inputs)
    rec = res.report.records[0]
    cut_params = 1 - rec.params_after / rec.params_before
    cut_macs = 1 - rec.macs_after / rec.macs_before
    if name not in BELOW_40_PERCENT:
        assert cut_params >= 0.40 and cut_macs >= 0.40, (name, cut_params, cut_macs)
    for batch in (case.example_inputs, rebatch(case.example_inputs, 3)):
        got, want = outputs(res.module, batch), outputs(case.model, batch)
        assert [g.shape for g in got] == [w.shape for w in want]
        assert all(torch.isfinite(g).all() for g in got if g.is_floating_point())


def test_pruned_graph_is_physical_and_exports_again(tmp_path):
    case = build("resnet_basic")
    res = graphopt.optimize(case.model, ["prune-channels:ratio=0.5"], case.example_inputs)
    gm = res.module
    assert gm.get_parameter("stem.0.weight").shape[0] == 8  # 16 -> 8 channels, really smaller
    again = torch.export.export(gm, case.example_inputs, strict=False).module()
    assert_same_outputs(again, gm, case.example_inputs)
    onnx_path = tmp_path / "pruned.onnx"
    torch.onnx.export(gm, case.example_inputs, str(onnx_path), dynamo=True)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: case.example_inputs[0].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), gm(*case.example_inputs), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_pruned_graph_compiles():
    case = build("mobilenetv2")
    gm = graphopt.optimize(case.model, ["prune-channels:ratio=0.5"], case.example_inputs).module
    compiled = torch.compile(gm)
    torch.testing.assert_close(compiled(*case.example_inputs), gm(*case.example_inputs), rtol=1e-4, atol=1e-4)


def test_round_to_keeps_multiples():
    case = build("resnet_basic")
    gm = graphopt.optimize(case.model, ["prune-channels:ratio=0.3,round_to=8"], case.example_inputs).module
    for name, p in gm.named_parameters():
        if name.endswith("weight") and p.dim() == 4 and name != "stem.0.weight" or name == "stem.0.weight":
            assert p.shape[0] % 8 == 0, (name, p.shape)


def test_ignore_and_per_module_ratios():
    case = build("resnet_basic")
    before = dict(case.model.named_parameters())
    gm = graphopt.optimize(case.model, [PruneChannels(ratio=0.5, ignore=("layers.0.conv1.*",),
                                                      ratios=(("layers.3.conv1*", 0.25),))],
                           case.example_inputs).module
    after = dict(gm.named_parameters())
    assert after["layers.0.conv1.0.weight"].shape[0] == before["layers.0.conv1.0.weight"].shape[0]
    assert after["layers.3.conv1.0.weight"].shape[0] == 48  # 64 * (1 - 0.25)
    assert after["layers.1.conv1.0.weight"].shape[0] == 16  # 32 * (1 - 0.5)


def test_global_ranking_spends_the_same_budget_unevenly():
    case = build("vgg")
    local = graphopt.optimize(case.model, ["prune-channels:ratio=0.4"], case.example_inputs)
    glob = graphopt.optimize(case.model, ["prune-channels:ratio=0.4,global_ranking=true"], case.example_inputs)
    sizes = lambda gm: [p.shape[0] for n, p in gm.named_parameters() if p.dim() == 4]  # noqa: E731
    ratios = lambda gm: [a / b for a, b in zip(sizes(gm), sizes(case.model))]  # noqa: E731
    assert len(set(round(r, 2) for r in ratios(local.module))) <= 2
    assert len(set(round(r, 2) for r in ratios(glob.module))) > 2
    assert abs(local.report.records[0].params_after - glob.report.records[0].params_after) \
        < 0.35 * local.report.records[0].params_before


@pytest.mark.parametrize("mode, heads, head_dim", [("heads", 2, 16), ("head_dim", 4, 8), ("both", 2, 8)])
def test_attention_heads_or_head_dim(mode, heads, head_dim):
    case = build("vit")
    gm = graphopt.optimize(case.model, [PruneChannels(ratio=0.5, attention=mode, ignore=("blocks.*.mlp.*",
                                                                                         "patch_embed"))],
                           case.example_inputs).module
    assert gm.get_parameter("blocks.0.attn.qkv.weight").shape[0] == 3 * heads * head_dim
    assert gm.get_parameter("blocks.0.attn.proj.weight").shape[1] == heads * head_dim


def test_gqa_keeps_query_heads_grouped_with_their_kv_head():
    case = build("hf_llama")
    gm = graphopt.optimize(case.model, [PruneChannels(ratio=0.5, ignore=("model.layers.*.mlp.*",))],
                           case.example_inputs).module
    q = gm.get_parameter("model.layers.0.self_attn.q_proj.weight").shape[0]
    k = gm.get_parameter("model.layers.0.self_attn.k_proj.weight").shape[0]
    assert k < 2 * 16 and q % k == 0  # fewer kv heads, each still serving q/k whole query heads


def test_bn_scale_removes_the_smallest_gammas():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([5.0, 0.1, 4.0, 0.2, 3.0, 0.3, 2.0, 0.4]))
    gm = graphopt.optimize(model.eval(), ["prune-channels:ratio=0.5,importance=bn-scale"],
                           torch.randn(2, 3, 8, 8)).module
    assert sorted(gm.get_parameter("1.weight").tolist()) == [2.0, 3.0, 4.0, 5.0]


def test_taylor_importance_uses_calibration_batches():
    case = build("resnet_basic")
    calib = [(torch.randn(2, 3, 32, 32),) for _ in range(2)]
    res = graphopt.optimize(case.model, ["prune-channels:ratio=0.5,importance=taylor"], case.example_inputs,
                            calib_data=calib)
    assert res.report.records[0].params_after < res.report.records[0].params_before
    assert all(p.grad is None for p in res.module.parameters())


@pytest.mark.parametrize("spec, message", [
    ("prune-channels:ratio=1.0", "prune-channels: ratio must be in [0, 1), got 1.0"),
    ("prune-channels:ratio=-0.1", "prune-channels: ratio must be in [0, 1), got -0.1"),
    ("prune-channels:importance=magic", "prune-channels: unknown importance 'magic'; choose one of l1, l2, "
                                        "bn-scale, taylor, activation, random"),
    ("prune-channels:loss=hinge", "prune-channels: unknown loss 'hinge'; choose one of output-norm, cross-entropy"),
    ("prune-channels:damp=-1", "prune-channels: damp must be >= 0, got -1.0"),
    ("prune-channels:attention=tokens", "prune-channels: attention must be one of heads, head_dim, both, none, "
                                        "got 'tokens'"),
])
def test_bad_options_are_rejected_up_front(spec, message):
    with pytest.raises(graphopt.PipelineError) as info:
        graphopt.optimize(build("mlp").model, [spec], build("mlp").example_inputs)
    assert str(info.value) == message


def test_ignoring_a_module_that_does_not_exist():
    case = build("resnet_basic")
    with pytest.raises(graphopt.PipelineError, match=r"^prune-channels: no parameter matches 'layer9\.\*' "):
        graphopt.optimize(case.model, [PruneChannels(ignore=("layer9.*",))], case.example_inputs)


def test_a_plan_that_empties_a_group_is_refused():
    case = build("resnet_basic")
    gm = graphopt.trace(case.model, case.example_inputs)
    dep = DependencyGraph(gm)
    group = dep.prunable_groups[0]
    with pytest.raises(graphopt.PassError, match=rf"plan would remove all {group.size} channels of group "):
        apply_channel_plan(gm, dep, {group: list(range(group.size))})


def test_custom_op_without_rule_warns_and_freezes_then_a_registered_rule_unlocks_it():
    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(graphopt.GraphoptWarning, match=r"no dependency rule for graphopt_test\.mystery\.default"):
        gm = graphopt.optimize(WithCustomOp(), ["prune-channels:ratio=0.5"], x).module
    assert gm.get_parameter("a.weight").shape[0] == 8  # frozen at the unknown op
    assert gm.get_parameter("b.weight").shape[0] == 4  # the rest still prunes
    register_rule(torch.ops.graphopt_test.mystery)(elementwise)
    with warnings.catch_warnings():
        warnings.simplefilter("error", graphopt.GraphoptWarning)
        gm = graphopt.optimize(WithCustomOp(), ["prune-channels:ratio=0.5"], x).module
    assert gm.get_parameter("a.weight").shape[0] == 4


class BufferMoved(nn.Module):
    """A buffer moved with ``.to(device)`` before use (HF rotary ``inv_freq`` under no_grad): aten.to of a get_attr."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 8), nn.Linear(8, 3)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))

    def forward(self, x):
        return self.out(self.lin(x) * self.scale.to(x.device))


def test_a_buffer_moved_with_to_prunes_with_its_channels():
    x = torch.randn(2, 4)
    with torch.no_grad():  # HF decoders traced under no_grad hit this form
        res = graphopt.optimize(BufferMoved(), "prune-channels:ratio=0.5", (x,))
    assert res.module.scale.shape == (4,) and res.module.lin.weight.shape == (4, 4)
    assert res.module(torch.randn(3, 4)).shape == (3, 3)


EQUIVALENCE_MODELS = ["vgg", "resnet_basic", "resnet_bottleneck", "mobilenetv2", "mobilenetv3", "densenet",
                      "inception", "shufflenet", "unet"]


@pytest.mark.parametrize("name", EQUIVALENCE_MODELS)
def test_pruned_model_computes_what_the_original_does_with_those_channels_ignored(name):
    """Physical pruning is exact: on nets whose channels only meet inside convs/linears (BatchNorm, not channel
    norms), the pruned model equals the original whose consumers give the removed channels zero weight."""
    case = build(name)
    gm = graphopt.trace(case.model, case.example_inputs)
    ctx = graphopt.Context(case.example_inputs)
    dep = DependencyGraph(gm, ctx)
    plan = PruneChannels(ratio=0.4).plan(gm, dep, ctx, 0.4)
    assert plan, "nothing planned"
    reference = copy.deepcopy(gm)
    transposed = {n.args[1].target for n in gm.graph.nodes  # a transposed conv's weight is (in, out, k, k)
                  if n.op == "call_function" and "conv_transpose" in str(n.target)}
    with torch.no_grad():
        for group, removed in plan.items():
            for m in group.members:
                weight = reference.get_parameter(m.param) if m.param.endswith("weight") else None
                consumer_dim = 0 if m.param in transposed else 1
                if weight is None or m.dim != consumer_dim or weight.dim() not in (2, 4) or weight.shape[1] == 1:
                    continue  # only consumers: conv/linear input dims (a depthwise conv's dim 1 has size 1)
                rows = torch.from_numpy(m.rows[np.isin(m.channel, removed)])
                weight.index_fill_(consumer_dim, rows, 0.0)
    apply_channel_plan(gm, dep, plan)
    gm.recompile()
    for batch in (case.example_inputs, rebatch(case.example_inputs, 3)):
        for got, want in zip(outputs(gm, batch), outputs(reference, batch)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
