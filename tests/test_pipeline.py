"""The pass manager's contract: schedule checks, string specs, verification after every pass, analysis caching."""

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import Context, Pass, PassManager, PassResult, register_pass
from graphopt.graph.nodes import is_op, set_parameter
from graphopt.pipeline.registry import get_pass_class, parse_pipeline

aten = torch.ops.aten


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


X = (torch.randn(2, 3, 8, 8),)


def _traced():
    return graphopt.trace(Tiny().eval(), X)


@dataclass(frozen=True)
class Named(Pass):
    """A do-nothing pass whose name and ordering constraints tests choose."""

    tag: str = ""

    def run(self, gm, ctx):
        return PassResult(gm, modified=False)


@dataclass(frozen=True)
class Early(Named):
    name: ClassVar[str] = "early"
    before: ClassVar = ("late",)


@dataclass(frozen=True)
class Late(Named):
    name: ClassVar[str] = "late"
    after: ClassVar = ("early",)


def test_order_constraints_accept_the_right_order():
    manager = PassManager([Early(), Named(), Late()])
    assert [p.name for p in manager.passes] == ["early", "", "late"]  # kept as given, never re-sorted


def test_misordered_after_names_both_passes_and_the_fix():
    with pytest.raises(graphopt.PipelineError) as info:
        PassManager([Late(), Early()])
    assert str(info.value) == ("pass 'late' must run after 'early', but 'early' comes later in the list; "
                               "move 'early' before 'late'")


def test_misordered_before_names_both_passes_and_the_fix():
    @dataclass(frozen=True)
    class PlainLate(Named):
        name: ClassVar[str] = "late"
    with pytest.raises(graphopt.PipelineError) as info:
        PassManager([PlainLate(), Early()])
    assert str(info.value) == ("pass 'early' must run before 'late', but 'late' comes earlier in the list; "
                               "move 'early' before 'late'")


def test_unknown_pass_name_fails_at_once_with_a_suggestion():
    with pytest.raises(graphopt.PipelineError) as info:
        graphopt.optimize(object(), ["fusee"], X)  # fails before the (bad) model is even looked at
    assert str(info.value).startswith("unknown pass 'fusee'; did you mean 'fuse'? Registered passes: ")
    listed = str(info.value).split("Registered passes: ")[1].split(". Register")[0].split(", ")
    assert {"dce", "fuse", "prune-channels"} <= set(listed) and listed == sorted(listed)  # tests may add more
    assert str(info.value).endswith("Register your own with @graphopt.register_pass.")


def test_unknown_option_lists_the_real_ones():
    with pytest.raises(graphopt.PipelineError) as info:
        PassManager(["fuse:ratio=0.5"])
    assert str(info.value) == "pass 'fuse' has no option 'ratio'; its options are: none (write them as name:option=value)"


@register_pass
@dataclass(frozen=True)
class WithOptions(Pass):
    """Exists to test option parsing."""

    name: ClassVar[str] = "test-options"
    ratio: float = 0.5
    round_to: int = 1
    ignore: tuple = ()
    flag: bool = False
    mode: str = "l1"

    def run(self, gm, ctx):
        return PassResult(gm, modified=False)


def test_string_pipeline_parses_typed_options():
    passes = parse_pipeline("dce,test-options:ratio=1,round_to=8,ignore=[fc,head.0],flag=true,mode=taylor,fuse")
    assert [p.name for p in passes] == ["dce", "test-options", "fuse"]
    assert passes[1] == WithOptions(ratio=1.0, round_to=8, ignore=("fc", "head.0"), flag=True, mode="taylor")
    assert isinstance(passes[1].ratio, float)


def test_option_before_any_pass_is_an_error():
    with pytest.raises(graphopt.PipelineError, match="option 'ratio=1' comes before any pass name"):
        parse_pipeline("ratio=1,fuse")


def test_register_pass_needs_a_name_and_a_unique_one():
    @dataclass(frozen=True)
    class NoName(Pass):
        pass
    with pytest.raises(graphopt.PipelineError, match="needs a class-level name"):
        register_pass(NoName)

    @dataclass(frozen=True)
    class Impostor(Pass):
        name: ClassVar[str] = "fuse"
    with pytest.raises(graphopt.PipelineError, match="pass name 'fuse' is taken by graphopt.passes.fuse.Fuse"):
        register_pass(Impostor)
    assert get_pass_class("fuse").__name__ == "Fuse"


@dataclass(frozen=True)
class BreakShapes(Pass):
    """Gives the conv a weight of the wrong shape: the graph no longer runs."""

    name: ClassVar[str] = "break-graph"

    def run(self, gm, ctx):
        set_parameter(gm, "conv.weight", torch.randn(4, 5, 3, 3))
        return PassResult(gm, modified=True)


def test_pass_that_breaks_the_graph_is_named():
    with pytest.raises(graphopt.VerifyError) as info:
        PassManager([BreakShapes()]).run(_traced(), Context(X))
    msg = str(info.value)
    assert msg.startswith("pass 'break-graph' produced a graph that fails on the example inputs: node `conv2d`")
    assert "expected input[2, 3, 8, 8] to have 5 channels, but got 3 channels" in msg


@dataclass(frozen=True)
class Scale(Pass):
    """Doubles the classifier bias but claims to preserve semantics."""

    name: ClassVar[str] = "liar"
    preserves_semantics: ClassVar[bool] = True

    def run(self, gm, ctx):
        set_parameter(gm, "fc.bias", gm.fc.bias * 2 + 1)
        return PassResult(gm, modified=True)


def test_semantics_promise_is_checked():
    with pytest.raises(graphopt.VerifyError, match=r"^pass 'liar' promised to preserve semantics but changed output 0: "
                                                   r"max abs error"):
        PassManager([Scale()]).run(_traced(), Context(X))


def test_unverified_run_skips_the_checks():
    gm, report = PassManager([Scale()], verify=False).run(_traced(), Context(X))
    assert report.records[0].modified and report.records[0].macs_after is None


@dataclass(frozen=True)
class Sneaky(Pass):
    """Changes the graph but reports modified=False."""

    name: ClassVar[str] = "sneaky"

    def run(self, gm, ctx):
        relu = next(n for n in gm.graph.nodes if is_op(n, aten.relu))
        with gm.graph.inserting_after(relu):
            twice = gm.graph.call_function(aten.relu.default, (relu,))
        relu.replace_all_uses_with(twice)
        twice.args = (relu,)
        return PassResult(gm, modified=False)


def test_modified_flag_must_be_honest():
    with pytest.raises(graphopt.VerifyError, match="pass 'sneaky' reported modified=False but changed the graph"):
        PassManager([Sneaky()]).run(_traced(), Context(X))


@dataclass(frozen=True)
class Boom(Pass):
    name: ClassVar[str] = "boom"

    def run(self, gm, ctx):
        raise ValueError("no luck")


def test_exception_in_a_pass_is_wrapped_with_its_name():
    with pytest.raises(graphopt.PassError, match=r"^pass 'boom' failed: ValueError: no luck$") as info:
        PassManager([Boom()]).run(_traced(), Context(X))
    assert isinstance(info.value.__cause__, ValueError)


@dataclass(frozen=True)
class DropClassifier(Pass):
    """Returns the pooled features instead of the logits: output shape changes."""

    name: ClassVar[str] = "drop-head"

    def run(self, gm, ctx):
        linear = next(n for n in gm.graph.nodes if is_op(n, aten.linear))
        linear.replace_all_uses_with(linear.args[0])
        gm.graph.erase_node(linear)
        return PassResult(gm, modified=True)


def test_output_shapes_are_invariant():
    with pytest.raises(graphopt.VerifyError, match=r"pass 'drop-head' changed the model's outputs from \[\(\(2, 2\), "
                                                   r"torch.float32\)\] to \[\(\(2, 4\), torch.float32\)\]"):
        PassManager([DropClassifier()]).run(_traced(), Context(X))


@dataclass(frozen=True)
class UseBeforeDef(Pass):
    name: ClassVar[str] = "bad-order"

    def run(self, gm, ctx):
        relu = next(n for n in gm.graph.nodes if is_op(n, aten.relu))
        with gm.graph.inserting_before(relu.args[0]):
            gm.graph.call_function(aten.neg.default, (relu,))
        return PassResult(gm, modified=True)


def test_lint_failure_names_the_pass():
    with pytest.raises(graphopt.VerifyError, match="pass 'bad-order' left an invalid graph"):
        PassManager([UseBeforeDef()]).run(_traced(), Context(X))


class CountingAnalysis:
    """Counts how often it is computed."""

    runs = 0

    def __init__(self, gm, ctx):
        type(self).runs += 1
        self.nodes = len(gm.graph.nodes)


@dataclass(frozen=True)
class Reads(Pass):
    name: ClassVar[str] = "reads"
    requires: ClassVar = (CountingAnalysis,)

    def run(self, gm, ctx):
        ctx.analysis(CountingAnalysis)
        return PassResult(gm, modified=False)


@dataclass(frozen=True)
class Touches(Pass):
    """Modifies the graph (a no-op rewrite), keeping or dropping CountingAnalysis as told."""

    name: ClassVar[str] = "touches"
    keep: bool = False

    @property
    def preserves(self):
        return (CountingAnalysis,) if self.keep else ()

    def run(self, gm, ctx):
        return PassResult(gm, modified=True)


def test_analyses_are_cached_and_invalidated_by_modifying_passes():
    CountingAnalysis.runs = 0
    PassManager([Reads(), Reads(), Touches(keep=True), Reads()]).run(_traced(), Context(X))
    assert CountingAnalysis.runs == 1
    PassManager([Reads(), Touches(keep=False), Reads()]).run(_traced(), Context(X))
    assert CountingAnalysis.runs == 3


def test_analysis_outside_a_run_needs_the_graph_named():
    with pytest.raises(graphopt.PipelineError, match=r"ctx.analysis\(\) needs a graph: call it inside a pass under "
                                                     r"a PassManager, or pass gm="):
        Context(X).analysis(CountingAnalysis)
    gm, ctx = _traced(), Context(X)
    before = CountingAnalysis.runs
    assert ctx.analysis(CountingAnalysis, gm) is ctx.analysis(CountingAnalysis, gm)  # cached for that graph
    ctx.analysis(CountingAnalysis, _traced())  # another graph: its own analysis
    assert CountingAnalysis.runs == before + 2


def test_report_is_a_table_and_json():
    res = graphopt.optimize(Tiny().eval(), "remove-identity,fuse,dce", X)
    text = str(res)
    assert text.splitlines()[0] == "captured with: export"
    assert text.splitlines()[1].split() == ["pass", "time", "modified", "params", "MACs", "max", "err", "stats"]
    assert [r.name for r in res.report.records] == ["remove-identity", "fuse", "dce"]
    fuse = res.report.records[1]
    assert fuse.modified and fuse.params_after == fuse.params_before - 8 and fuse.macs_after == fuse.macs_before
    assert fuse.max_abs_error is not None and fuse.max_abs_error < 1e-5
    data = json.loads(json.dumps(res.report.to_dict()))
    assert data["passes"][1]["stats"]["fused"] == 1
