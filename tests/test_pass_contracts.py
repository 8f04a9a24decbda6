"""The contracts the pass manager enforces: analyses follow requires/preserves, a pass never runs another pass,
instruments see every pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.errors import PipelineError
from graphopt.pipeline.instruments import Instrument
from graphopt.pipeline.pass_base import Context, Pass, PassResult
from graphopt.passes.fuse import Fuse
from graphopt.pipeline.manager import PassManager


class NodeCount:
    """A toy analysis: the graph's node count when it was computed; counts its own constructions."""

    built = 0

    def __init__(self, gm, ctx):
        type(self).built += 1
        self.nodes = len(gm.graph.nodes)


@dataclass(frozen=True)
class AddZero(Pass):
    """Changes the graph (adds a node that adds 0 to the output); keeps what ``preserves`` says."""

    name: ClassVar[str] = "add-zero"

    def run(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        value = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
        with gm.graph.inserting_before(out):
            added = gm.graph.call_function(torch.ops.aten.add.Tensor, (value, 0.0))
        out.replace_input_with(value, added)
        return PassResult(gm, modified=True)


@dataclass(frozen=True)
class AddZeroKeeping(AddZero):
    name: ClassVar[str] = "add-zero-keeping"
    preserves: ClassVar[tuple] = (NodeCount,)


@dataclass(frozen=True)
class Reads(Pass):
    """Reads NodeCount and remembers what it saw."""

    name: ClassVar[str] = "reads"
    seen: list = None

    def run(self, gm, ctx):
        self.seen.append((ctx.analysis(NodeCount), len(gm.graph.nodes)))
        return PassResult(gm, modified=False)


@dataclass(frozen=True)
class Needs(Reads):
    name: ClassVar[str] = "needs"
    requires: ClassVar[tuple] = (NodeCount,)
    cached_at_start: list = None

    def run(self, gm, ctx):
        self.cached_at_start.append(ctx.cached(NodeCount, gm) and NodeCount.built == 1)
        return super().run(gm, ctx)  # super().run is the same pass, not a nested one


def _model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


def _run(passes):
    gm = graphopt.trace(_model(), (torch.randn(2, 4),))
    ctx = Context((torch.randn(2, 4),))
    return PassManager(passes).run(gm, ctx)


def test_a_pass_that_changes_the_graph_without_preserving_the_analysis_gets_a_fresh_one():
    seen = []
    _run([Reads(seen=seen), AddZero(), Reads(seen=seen)])
    (first, nodes_before), (second, nodes_after) = seen
    assert second is not first and nodes_after == nodes_before + 1
    assert first.nodes == nodes_before and second.nodes == nodes_after  # each describes the graph it was read on


def test_an_analysis_the_pass_preserves_is_kept_and_unchanged_graphs_keep_theirs():
    seen = []
    _run([Reads(seen=seen), AddZeroKeeping(), Reads(seen=seen), Reads(seen=seen)])
    assert seen[0][0] is seen[1][0] is seen[2][0]  # the pass said NodeCount stays valid: the manager kept it


def test_the_manager_computes_required_analyses_before_the_pass_runs():
    NodeCount.built = 0
    seen, cached = [], []
    _run([Needs(seen=seen, cached_at_start=cached)])
    assert cached == [True] and NodeCount.built == 1


@dataclass(frozen=True)
class CallsFuse(Pass):
    name: ClassVar[str] = "calls-fuse"

    def run(self, gm, ctx):
        return Fuse().run(gm, ctx)


def test_a_pass_that_runs_another_pass_is_refused_by_name():
    with pytest.raises(PipelineError, match=r"pass 'calls-fuse' called pass 'fuse' directly; a pass never runs "
                                            r"another pass"):
        _run([CallsFuse()])
    gm = graphopt.trace(_model(), (torch.randn(2, 4),))  # outside any pass, calling a pass directly is fine
    assert isinstance(Fuse().run(gm, Context((torch.randn(2, 4),))), PassResult)


def test_fake_quant_folds_batchnorm_through_the_shared_function_not_by_running_fuse():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(2, 3, 12, 12)
    res = graphopt.optimize(model, "fake-quant", x, calib_data=[x])
    assert [r.name for r in res.report.records] == ["fake-quant"]
    assert res.report.records[0].stats["bn_folded"] == 1


class Recorder(Instrument):
    def __init__(self):
        self.events = []

    def before_pipeline(self, gm, ctx, run):
        self.events.append(("start", run is not None and run.fake))

    def before_pass(self, p, gm, ctx):
        self.events.append(("before", p.name))

    def after_pass(self, p, result, ctx, before, after, fields):
        self.events.append(("after", p.name, result.modified, after is not None, "seconds" in fields))


def test_instruments_see_every_pass_in_order_with_the_shared_graph_run(tmp_path):
    recorder = Recorder()
    x = torch.randn(2, 3, 12, 12)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    res = graphopt.optimize(model, "fuse,prune-channels:ratio=0.5,dce", x, instruments=[recorder],
                            dump_ir=tmp_path / "ir")
    names = ["fuse", "prune-channels", "dce"]
    assert recorder.events[0][0] == "start"  # the input graph ran once (real tensors here: cheaper than fake)
    assert [e[1] for e in recorder.events[1:] if e[0] == "before"] == names
    # user instruments run after the built-in ones, so they see the fields those wrote (Timing's seconds)
    assert [e[1:] for e in recorder.events if e[0] == "after"] == [
        ("fuse", True, True, True), ("prune-channels", True, True, True), ("dce", False, True, True)]
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == [
        "00-input.py", "01-fuse.py", "02-prune-channels.py", "03-dce.py"]
    assert "batch_norm" in (tmp_path / "ir" / "00-input.py").read_text()
    assert "batch_norm" not in (tmp_path / "ir" / "01-fuse.py").read_text()
    assert all(r.seconds > 0 for r in res.report.records) and res.report.records[0].max_abs_error is not None


def test_without_verification_no_graph_runs_and_macs_are_not_counted():
    recorder = Recorder()
    res = graphopt.optimize(_model(), "prune-channels:ratio=0.5", (torch.randn(2, 4),), verify=False,
                            instruments=[recorder])
    assert recorder.events[0] == ("start", False)
    assert recorder.events[-1] == ("after", "prune-channels", True, False, True)
    record = res.report.records[0]
    assert record.macs_after is None and record.params_after < record.params_before


def test_every_layer_pass_reports_its_decisions_per_layer_in_one_shape():
    from graphopt.graph.layers import layers
    from models import build

    case = build("resnet_basic")
    x = case.example_inputs
    names = {layer.name for layer in layers(graphopt.trace(case.model, x))}
    pipeline = "fuse,prune-channels:ratio=0.5,sparsify:sparsity=0.5,lower-sparse,fake-quant:ignore=[fc]"
    res = graphopt.optimize(case.model, pipeline, x, calib_data=[x])
    by_pass = {r.name: r.decisions for r in res.report.records}
    for name, decisions in by_pass.items():
        # keys are layer names, or the module of an op that is not a layer (fake-quant's residual adds)
        unknown = [k for k in decisions if k not in names and not any(n.startswith(k + ".") for n in names)]
        assert decisions and not unknown, (name, unknown)
        assert all(isinstance(v, str) and v for v in decisions.values())
    assert by_pass["fuse"]["stem.0"] == "BatchNorm folded in"
    assert by_pass["prune-channels"]["layers.0.conv1.0"].startswith("out ")
    assert by_pass["sparsify"]["layers.0.conv1.0"].endswith("zeros")
    assert by_pass["fake-quant"]["fc"] == "ignored (float)"
    assert res.report.to_dict()["passes"][0]["decisions"] == by_pass["fuse"]
    assert "| `stem.0` | BatchNorm folded in |" in res.report.decisions_markdown()
