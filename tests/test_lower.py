"""lower(): a plain eager module computing exactly what the optimized graph computes."""

import pytest
import torch

import graphopt
from graphopt.lower import lower
from models import build
from util import outputs, rebatch


@pytest.mark.parametrize("name", ["resnet_basic", "shufflenet", "vit", "hf_llama"])
def test_lowered_module_is_exact_plain_and_reexportable(name):
    case = build(name)
    gm = graphopt.optimize(case.model, ["fuse", "prune-channels:ratio=0.5"], case.example_inputs).module
    low = lower(gm, case.example_inputs)
    assert type(low).__mro__[1] is torch.fx.GraphModule and not low._forward_pre_hooks
    assert not [n for n in low.graph.nodes if n.op == "call_module"]
    direct = [n for n in low.graph.nodes if n.op == "call_function" and not isinstance(n.target, torch._ops.OpOverload)]
    assert len(direct) > 10  # ATen ops now call their direct torch bindings
    for batch in (case.example_inputs, rebatch(case.example_inputs, 3)):
        assert all(torch.equal(a, b) for a, b in zip(outputs(low, batch), outputs(gm, batch)))
    assert type(graphopt.inputs.ExampleInputs.of(case.example_inputs).call(low)) is \
        type(graphopt.inputs.ExampleInputs.of(case.example_inputs).call(case.model))
    again = torch.export.export(low, tuple(case.example_inputs) if isinstance(case.example_inputs, tuple) else (),
                                case.example_inputs if isinstance(case.example_inputs, dict) else None,
                                strict=False).module()
    torch.testing.assert_close(outputs(again, case.example_inputs), outputs(gm, case.example_inputs))
