"""graphopt's graph results are first-class modules: ``.train()``/``.eval()`` switch BatchNorm and dropout as the
eager model does, and ``torch.save(module)`` / pickle / deepcopy round-trip (graph/module.py, graph/pickling.py)."""

from __future__ import annotations

import copy
import functools
import io
import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from models import NAMES, build, randomize_batchnorm  # noqa: E402
from util import outputs  # noqa: E402

import graphopt  # noqa: E402
from graphopt.result.graph_json import SaveError  # noqa: E402
from graphopt.graph.module import GraphoptModule  # noqa: E402
from graphopt.graph.inputs import ExampleInputs  # noqa: E402

aten = torch.ops.aten
_DROPOUT = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default)


@functools.cache
def _captured(name: str):
    case = build(name)
    return case, graphopt.optimize(case.model, [], case.example_inputs).module


def captured(name: str):
    """A zoo case and its captured graph, each test with its own copy (capturing HF models takes seconds)."""
    case, gm = _captured(name)
    return copy.deepcopy(case), copy.deepcopy(gm)


def seeded(module, inputs, seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return outputs(module, inputs)


def assert_all_close(got, want, **tol):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


def active_dropouts(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target in _DROPOUT and n.args[1] > 0]


def call(module, inputs):
    with torch.no_grad():
        return ExampleInputs.of(inputs).call(module)


def round_trip(module):
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def bake_sensitive(name: str) -> bool:
    """HF attention passes ``dropout_p = 0.0 if not self.training`` to SDPA: a Python branch the eval capture
    fixed, so in train mode the graph's attention dropout stays off while eager's is on."""
    return name.startswith("hf_")


@pytest.mark.parametrize("name", NAMES)
def test_train_and_eval_switch_batchnorm_and_dropout_like_the_eager_model(name):
    case, gm = captured(name)
    eager = copy.deepcopy(case.model)
    assert isinstance(gm, GraphoptModule)
    assert not any(m.training for m in gm.modules())  # captured in eval mode, and it says so
    assert gm.train() is gm and all(m.training for m in gm.modules())
    eager.train()
    if not bake_sensitive(name):
        # the same ops draw the same random numbers in the same order: batch statistics and dropout masks agree
        assert_all_close(seeded(gm, case.example_inputs), seeded(eager, case.example_inputs), rtol=1e-4, atol=1e-5)
        want = eager.state_dict()
        for key, value in gm.state_dict().items():  # running statistics and num_batches_tracked moved alike
            torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-6, msg=key)
    if active_dropouts(gm):  # on a copy: each train-mode call moves the running statistics
        twin = copy.deepcopy(gm)
        assert twin.training and not torch.equal(seeded(twin, case.example_inputs, 1)[0],
                                                 seeded(twin, case.example_inputs, 2)[0])
    assert gm.eval() is gm and not any(m.training for m in gm.modules())
    eager.eval()
    assert_all_close(outputs(gm, case.example_inputs), outputs(eager, case.example_inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_after_a_train_eval_cycle_gives_the_original_outputs(name):
    case, gm = captured(name)
    before = copy.deepcopy(dict(gm.named_buffers()))
    gm.train().eval()
    assert not [n for n in gm.graph.nodes if n.target is aten.add_.Tensor]
    assert_all_close(outputs(gm, case.example_inputs), outputs(case.model, case.example_inputs), rtol=1e-4, atol=1e-5)
    for key, value in gm.named_buffers():  # no train-mode call happened: nothing moved
        assert torch.equal(value, before[key]), key


def test_batchnorm_nodes_and_counters_follow_the_mode():
    case, gm = captured("resnet_basic")
    norms = [n for n in gm.graph.nodes if n.target is aten.batch_norm.default]
    assert norms and all(n.args[5] is False for n in norms)
    gm.train()
    assert all(n.args[5] is True for n in norms)
    counts = [n for n in gm.graph.nodes if n.target is aten.add_.Tensor]
    assert len(counts) == len(norms)
    gm(*case.example_inputs)
    assert int(gm.get_buffer("stem.1.num_batches_tracked")) == 1
    gm.eval()
    assert all(n.args[5] is False for n in norms)
    assert not [n for n in gm.graph.nodes if n.target is aten.add_.Tensor]
    gm.graph.lint()


def test_a_batchnorm_without_running_statistics_uses_batch_statistics_in_both_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = graphopt.optimize(model, [], (x,)).module
    for _ in range(2):
        gm.train().eval()
        torch.testing.assert_close(gm(x), model(x))
        gm.train()
        torch.testing.assert_close(gm(x), model.train()(x))
        model.eval()


def test_batchnorm_with_cumulative_average_warns_that_its_statistics_stay():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=None)).eval()
    gm = graphopt.optimize(model, [], (torch.randn(3, 4),)).module
    with pytest.warns(graphopt.GraphoptWarning, match=r"momentum 0, so their running statistics stay as they are"):
        gm.train()


def test_fx_fallback_graphs_switch_modes_too():
    case = build("vgg")
    gm = graphopt.optimize(case.model, [], case.example_inputs, capture="fx").module
    assert gm.meta["graphopt_capture"] == "symbolic_trace" and not gm.training
    eager = copy.deepcopy(case.model).train()
    gm.train()
    assert_all_close(seeded(gm, case.example_inputs), seeded(eager, case.example_inputs), rtol=1e-4, atol=1e-5)
    gm.eval()
    assert_all_close(outputs(gm, case.example_inputs), outputs(eager.eval(), case.example_inputs), rtol=1e-4,
                     atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_torch_save_pickle_and_deepcopy_round_trip(name):
    case, gm = captured(name)
    want = outputs(gm, case.example_inputs)
    for copied in (round_trip(gm), pickle.loads(pickle.dumps(gm)), copy.deepcopy(gm)):
        assert isinstance(copied, GraphoptModule) and not copied.training
        assert_all_close(outputs(copied, case.example_inputs), want, rtol=0, atol=0)
        assert copied.state_dict().keys() == gm.state_dict().keys()
        assert type(call(copied, case.example_inputs)) is type(call(gm, case.example_inputs))  # HF ModelOutput too


def test_a_module_saved_in_train_mode_loads_in_train_mode():
    case, gm = captured("mobilenetv2")
    loaded = round_trip(gm.train())
    assert loaded.training and all(m.training for m in loaded.modules())
    eager = copy.deepcopy(case.model).train()
    assert_all_close(seeded(loaded, case.example_inputs), seeded(eager, case.example_inputs), rtol=1e-4, atol=1e-5)
    loaded.eval()
    assert_all_close(outputs(loaded, case.example_inputs), outputs(eager.eval(), case.example_inputs), rtol=1e-4,
                     atol=1e-5)


def test_a_pickle_names_only_graphopt_rebuild_and_the_module_class():
    """Everything else is torch's or the model's: graphopt's internals may change between save and load."""
    _, gm = captured("resnet_basic")
    names = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            names.add(f"{module}.{name}")
            return super().find_class(module, name)

    loaded = Recording(io.BytesIO(pickle.dumps(gm))).load()
    assert isinstance(loaded, GraphoptModule)
    assert {n for n in names if n.startswith("graphopt")} == {"graphopt.graph.pickling.rebuild",
                                                                "graphopt.graph.module.GraphoptModule"}


def test_pickling_a_graph_that_calls_a_lambda_says_what_to_do():
    _, gm = captured("mlp")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        node = gm.graph.call_function(lambda t: t * 2, (out.args[0][0],))
    out.args = ((node,),)
    gm.recompile()
    with pytest.raises(SaveError, match=r"cannot pickle this GraphModule: .*lambda.*define it at module level, "
                                        r"or keep the model with graphopt.save\(result, path\)"):
        torch.save(gm, io.BytesIO())


@pytest.mark.parametrize("name", ["resnet_basic", "mlp", "hf_bert"])
def test_lowered_modules_switch_modes_and_round_trip(name):
    case, gm = captured(name)
    lowered = graphopt.streamline(gm, case.example_inputs)
    assert isinstance(lowered, GraphoptModule) and not lowered.training
    targets = {n.target for n in lowered.graph.nodes if n.op == "call_function"}
    eager = copy.deepcopy(case.model).train()
    lowered.train()
    if not bake_sensitive(name):
        assert_all_close(seeded(lowered, case.example_inputs), seeded(eager, case.example_inputs), rtol=1e-4,
                         atol=1e-5)
    loaded = round_trip(lowered.eval())
    assert {n.target for n in loaded.graph.nodes if n.op == "call_function"} == targets  # still the fast bindings
    assert_all_close(outputs(loaded, case.example_inputs), outputs(eager.eval(), case.example_inputs), rtol=1e-4,
                     atol=1e-5)


def test_finetune_trains_batchnorm_in_train_mode_and_restores_the_mode():
    case, gm = captured("resnet_basic")
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    means = {k: v.clone() for k, v in gm.named_buffers() if k.endswith("running_mean")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graphopt.finetune(gm, (x, y), epochs=1, lr=1e-3, batch_size=8)
    assert not any(m.training for m in gm.modules())
    assert all(not torch.equal(v, means[k]) for k, v in gm.named_buffers() if k in means)
    assert int(gm.get_buffer("stem.1.num_batches_tracked")) == 2  # two batches of 8
    assert all(n.args[5] is False for n in gm.graph.nodes if n.target is aten.batch_norm.default)
    gm.train()
    graphopt.finetune(gm, (x, y), epochs=1, lr=1e-3, batch_size=8)
    assert all(m.training for m in gm.modules())


def test_graphopt_save_and_load_keep_the_mode(tmp_path):
    case, gm = captured("resnet_basic")
    eager = copy.deepcopy(case.model).train()
    graphopt.save(gm.train(), tmp_path / "m.pt", example_inputs=case.example_inputs)
    assert gm.training  # saving checks in eval mode and puts the module back
    loaded = graphopt.load(tmp_path / "m.pt").module
    assert isinstance(loaded, GraphoptModule) and loaded.training
    assert_all_close(seeded(loaded, case.example_inputs), seeded(eager, case.example_inputs), rtol=1e-4, atol=1e-5)
    graphopt.save(loaded.eval(), tmp_path / "e.pt", example_inputs=case.example_inputs)
    again = graphopt.load(tmp_path / "e.pt").module
    assert not again.training
    assert_all_close(outputs(again, case.example_inputs), outputs(eager.eval(), case.example_inputs), rtol=1e-4,
                     atol=1e-5)


def test_a_randomized_batchnorm_model_trains_like_eager_over_several_steps():
    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                              nn.Dropout(0.3), nn.Linear(8 * 6 * 6, 4))).eval()
    x = torch.randn(4, 3, 8, 8)
    gm = graphopt.optimize(model, [], (x,)).module.train()
    eager = copy.deepcopy(model).train()
    for step in range(3):
        assert_all_close(seeded(gm, (x + step,), step), seeded(eager, (x + step,), step), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gm.state_dict(), eager.state_dict(), rtol=1e-4, atol=1e-6)
