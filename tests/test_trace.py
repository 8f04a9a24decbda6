"""Tracing: every zoo model lands in the one canonical ATen form, runs like the original, and errors are clear."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.graph.shapes import shape_of
from models import NAMES, build
from util import assert_same_outputs, outputs, rebatch

_PYTHON_OPS = {"getitem", "mul", "add", "sub", "floordiv", "truediv", "sym_size", "wrap_with_set_grad_enabled"}


def _non_aten_calls(gm):
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"
            and not isinstance(n.target, torch._ops.OpOverload)
            and getattr(n.target, "__name__", "") not in _PYTHON_OPS}


@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_traces_to_canonical_aten_graph(name):
    case = build(name)
    gm = graphopt.trace(case.model, case.example_inputs)
    assert gm.meta["graphopt_capture"] == "export"
    assert _non_aten_calls(gm) == set()
    state = case.model.state_dict()
    params = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in state]
    assert len(params) >= len(list(case.model.parameters())) - 1  # tied weights read once
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.meta.get("val"), torch.Tensor):
            assert shape_of(node) is not None, f"{node.name} has no recorded shape"
    assert_same_outputs(gm, case.model, case.example_inputs)
    assert_same_outputs(gm, case.model, rebatch(case.example_inputs, 3))  # batch stays dynamic


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenetv3", "densenet", "shufflenet", "vit", "swin"])
def test_fx_fallback_lands_in_the_same_dialect(name):
    case = build(name)
    by_export = graphopt.trace(case.model, case.example_inputs, capture="export")
    by_fx = graphopt.trace(case.model, case.example_inputs, capture="fx")
    assert by_fx.meta["graphopt_capture"] == "symbolic_trace"
    ops = lambda gm: {n.target for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)}  # noqa
    assert {op for op in ops(by_fx)} - ops(by_export) <= {torch.ops.aten.reshape.default}
    assert ops(by_export) & {torch.ops.aten.conv2d.default, torch.ops.aten.linear.default} <= ops(by_fx)
    assert not [n for n in by_fx.graph.nodes if n.op == "call_module"]
    assert_same_outputs(by_fx, case.model, case.example_inputs)


def test_batch_of_one_stays_dynamic():
    case = build("resnet_basic")
    x = case.example_inputs[0][:1]
    gm = graphopt.trace(case.model, (x,))
    assert gm.meta["graphopt_capture"] == "export"  # dynamic, not the static retry
    y = torch.randn(5, *x.shape[1:])
    torch.testing.assert_close(gm(y), case.model(y), rtol=1e-4, atol=1e-4)


def test_keyword_inputs_and_model_output_structure_are_kept():
    case = build("hf_bert")
    gm = graphopt.trace(case.model, case.example_inputs)
    want, got = case.model(**case.example_inputs), gm(**case.example_inputs)
    assert type(got) is type(want)
    assert list(got.keys()) == list(want.keys())
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state)


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, scale=2.0):
        y = self.fc(x) * scale
        return {"logits": y, "aux": (y.sum(-1), x.mean())}


def test_dict_and_tuple_outputs_keep_their_structure():
    x = torch.randn(2, 4)
    model = DictOut().eval()
    gm = graphopt.trace(model, (x,))
    out = gm(x)
    assert set(out) == {"logits", "aux"} and isinstance(out["aux"], tuple)
    torch.testing.assert_close(out["aux"][0], model(x)["aux"][0])


def test_callers_model_is_not_mutated():
    case = build("resnet_basic")
    model = case.model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graphopt.optimize(model, ["fuse", "dce"], case.example_inputs)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class NumpyScale(nn.Module):
    """Leaves torch for numpy, which torch.export cannot follow."""

    def forward(self, x):
        return x * float(np.abs(x.detach().numpy()).max())


class WithNumpy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.scale = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), NumpyScale()

    def forward(self, x):
        return self.scale(torch.relu(self.bn(self.conv(x)))).mean((2, 3))


def test_leaf_module_falls_back_to_symbolic_trace_and_stays_opaque():
    model, x = WithNumpy().eval(), torch.randn(2, 3, 8, 8)
    res = graphopt.optimize(model, ["fuse"], (x,), leaf_modules=[NumpyScale])
    assert res.capture == "symbolic_trace"
    assert [n.target for n in res.module.graph.nodes if n.op == "call_module"] == ["scale"]
    torch.testing.FileCheck().check("aten.conv2d").check_not("batch_norm").check("self.scale").run(res.module.code)
    torch.testing.assert_close(res.module(x), model(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.gate = nn.Linear(4, 4), Gate()

    def forward(self, x):
        return self.gate(self.fc(x))


def test_untraceable_model_names_module_line_and_remedy():
    with pytest.raises(graphopt.TraceError) as info:
        graphopt.trace(Gated(), (torch.randn(2, 4),))
    msg = str(info.value)
    assert msg.startswith("could not trace Gated:\n  torch.export failed in module `gate` (Gate) at test_trace.py:")
    assert "`if x.sum() > 0:`" in msg
    assert "torch.fx.symbolic_trace failed in module `gate` (Gate)" in msg
    assert "leaf_modules=[ItsClass]" in msg
    assert info.value.__cause__ is not None


def test_the_suggested_remedy_works():
    model, x = Gated().eval(), torch.randn(2, 4)
    gm = graphopt.trace(model, (x,), leaf_modules=[Gate])
    torch.testing.assert_close(gm(x), model(x))
    torch.testing.assert_close(gm(-x), model(-x))  # the branch is decided at run time, inside the leaf


def test_non_module_is_rejected():
    with pytest.raises(graphopt.InputError, match=r"^graphopt expects a torch.nn.Module, got function; wrap plain "
                                                  r"functions in an nn.Module$"):
        graphopt.trace(lambda x: x, (torch.randn(2),))


def test_wrong_input_shape_names_the_module():
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(graphopt.InputError) as info:
        graphopt.optimize(model, ["fuse"], (torch.randn(2, 12),))
    assert str(info.value) == (
        "example_inputs ((2, 12) float32) do not fit the model: module `0` (Linear) raised RuntimeError: mat1 and "
        "mat2 shapes cannot be multiplied (2x12 and 10x8). Pass inputs of the shapes and dtypes the model expects."
    )


def test_bad_example_inputs_type():
    with pytest.raises(graphopt.InputError, match="example_inputs must be a tensor, a tuple of positional inputs or a "
                                                  "dict of keyword inputs, got set"):
        graphopt.trace(nn.Linear(2, 2), {torch.randn(2)})


def test_unknown_capture_route_is_refused():
    with pytest.raises(graphopt.InputError, match=r"^capture must be 'auto', 'export' or 'fx', not 'symbolic_trace'$"):
        graphopt.trace(nn.Linear(2, 2), torch.randn(1, 2), capture="symbolic_trace")


def test_single_tensor_input_is_accepted():
    model = nn.Linear(3, 2).eval()
    x = torch.randn(4, 3)
    torch.testing.assert_close(graphopt.trace(model, x)(x), model(x))
    assert outputs(graphopt.trace(model, x), (x,))[0].shape == (4, 2)
