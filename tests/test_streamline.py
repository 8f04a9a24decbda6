"""streamline(): a plain eager module computing exactly what the optimized graph computes."""

import pytest
import torch

import graphopt
from graphopt.graph.module import GraphoptModule
from graphopt.export.streamline import streamline
from models import build
from util import outputs, rebatch


@pytest.mark.parametrize("name", ["resnet_basic", "shufflenet", "vit", "hf_llama"])
def test_lowered_module_is_exact_plain_and_reexportable(name):
    case = build(name)
    gm = graphopt.optimize(case.model, ["fuse", "prune-channels:ratio=0.5"], case.example_inputs).module
    low = streamline(gm, case.example_inputs)
    assert type(low).__mro__[1:3] == (GraphoptModule, torch.fx.GraphModule) and not low._forward_pre_hooks
    assert not [n for n in low.graph.nodes if n.op == "call_module"]
    direct = [n for n in low.graph.nodes if n.op == "call_function" and not isinstance(n.target, torch._ops.OpOverload)]
    assert len(direct) > 10  # ATen ops now call their direct torch bindings
    for batch in (case.example_inputs, rebatch(case.example_inputs, 3)):
        assert all(torch.equal(a, b) for a, b in zip(outputs(low, batch), outputs(gm, batch)))
    assert type(graphopt.graph.inputs.ExampleInputs.of(case.example_inputs).call(low)) is \
        type(graphopt.graph.inputs.ExampleInputs.of(case.example_inputs).call(case.model))
    again = torch.export.export(low, tuple(case.example_inputs) if isinstance(case.example_inputs, tuple) else (),
                                case.example_inputs if isinstance(case.example_inputs, dict) else None,
                                strict=False).module()
    torch.testing.assert_close(outputs(again, case.example_inputs), outputs(gm, case.example_inputs))


@pytest.mark.parametrize("name", ["resnet_basic", "unet", "vit"])
def test_channels_last_lowering_matches_and_leaves_the_source_alone(name):
    case = build(name)
    gm = graphopt.optimize(case.model, ["prune-channels:ratio=0.5"], case.example_inputs).module
    strides = {k: v.stride() for k, v in gm.state_dict().items()}
    low = streamline(gm, case.example_inputs, memory_format="channels_last")
    assert {k: v.stride() for k, v in gm.state_dict().items()} == strides  # gm's weights untouched
    convs = [n for n in low.graph.nodes if n.op == "call_function" and n.target is torch.conv2d]
    for conv in convs:
        assert low.get_parameter(conv.args[1].target).is_contiguous(memory_format=torch.channels_last)
    for batch in (case.example_inputs, rebatch(case.example_inputs, 3)):
        got, want = outputs(low, batch), outputs(gm, batch)
        for g, w in zip(got, want):
            assert g.is_contiguous()  # callers get the standard layout back
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_unknown_memory_format_is_refused():
    case = build("mlp")
    with pytest.raises(ValueError, match="memory_format must be 'preserve' or 'channels_last', not 'nhwc'"):
        streamline(graphopt.trace(case.model, case.example_inputs), case.example_inputs, memory_format="nhwc")
