"""Where quantizers go: a table of op patterns (data, not code paths) and the planner that reads it.

Each row names ATen ops and says which of their arguments are activations to quantize (per tensor), which is a
weight to quantize (int8 symmetric, per output channel along ``weight_axis``), and under which condition the row
applies. Rows with ``action="float"`` document ops that stay in floating point (norms, softmax, attention): no row
quantizes their inputs, and the report counts them.

The ``residual-add`` row exists for onnxruntime's U8S8 kernels: its QDQ fusion turns ``DQ, DQ -> Add -> Q`` into an
int8 QLinearAdd and needs a Q right after every conv feeding an add, so both inputs of adds between conv feature
maps (rank-4 tensors) are quantized. Attention-mask adds and the residual adds of transformers (which feed
LayerNorm, a float op) are left alone.

onnxruntime also runs a conv in int8 only when a Q follows it (``DQ -> Conv -> Q``; a ReLU or ReLU6 in between is
folded into the Q). So conv rows have ``output=True``: a conv whose result reaches no quantizer through ReLUs (it
feeds a concat, a hardswish, a pooling) gets one on its output. A result that is a model output stays float.

An activation quantizer belongs to the *tensor*: every quantized reader of one tensor reads the same quantized
copy, other readers keep the float value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from graphopt.graph import layers
from graphopt.graph.nodes import is_op
from graphopt.graph.patterns import matches_any
from graphopt.graph.shapes import shape_of

aten = torch.ops.aten


@dataclass(frozen=True)
class Rule:
    """One row of the placement table."""

    name: str
    ops: tuple
    activations: tuple[int, ...] = ()  # argument positions quantized as activations
    weight: int | None = None  # argument position of the weight (per-channel int8)
    weight_axis: int | None = 0  # output-channel axis of the weight; None quantizes it per tensor
    condition: str | None = None  # name of a predicate in CONDITIONS
    action: str = "quantize"  # or "float"
    output: bool = False  # also quantize the result, unless a quantizer already reads it (through a ReLU)


PLACEMENT = (
    Rule("conv", (aten.conv1d, aten.conv2d, aten.conv3d), activations=(0,), weight=1, output=True),
    Rule("conv-transpose", (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d),
         activations=(0,), weight=1, weight_axis=None),  # output channels are split over groups on dim 1
    Rule("linear", (aten.linear,), activations=(0,), weight=1),
    # x @ W + b with W stored (in, out): Hugging Face GPT-2's Conv1D; output channels on axis 1
    Rule("addmm", (aten.addmm,), activations=(1,), weight=2, weight_axis=1),
    Rule("matmul", (aten.matmul, aten.bmm, aten.mm), activations=(0, 1)),
    Rule("residual-add", (aten.add,), activations=(0, 1), condition="feature_maps"),
    Rule("norm", (aten.layer_norm, aten.group_norm, aten.batch_norm, aten.instance_norm, aten.rms_norm),
         action="float"),
    Rule("softmax", (aten.softmax, aten._softmax, aten.log_softmax), action="float"),
    Rule("attention", (aten.scaled_dot_product_attention,), action="float"),
)


def _feature_maps(node: fx.Node) -> bool:
    """Both inputs are float rank-4 tensors (conv feature maps), not a mask, a bias or a scalar."""
    args = node.args[:2]
    return len(args) == 2 and all(isinstance(a, fx.Node) and _is_float(a) and len(shape_of(a) or ()) == 4
                                  for a in args)


CONDITIONS = {"feature_maps": _feature_maps}


def _is_float(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", None) is not None and meta.dtype.is_floating_point


@dataclass
class Site:
    """One layer the table matched: the node, its rule, the layer's name, what to quantize."""

    node: fx.Node
    rule: Rule
    layer: str
    activations: list[fx.Node] = field(default_factory=list)
    weight: fx.Node | None = None


@dataclass
class Placement:
    """The plan: quantized sites, layers skipped by name, and counts of ops kept in float."""

    sites: list[Site]
    skipped: list[str]
    kept_float: dict[str, int]


def layer_name(node: fx.Node, weight_pos: int | None) -> str:
    """Module path of a layer from its weight's name (``layer1.0.conv1``), else its module (graphopt/graph/layers.py)."""
    return layers.layer_name(node, weight_pos)


def match(node: fx.Node) -> Rule | None:
    """The first table row whose ops and condition fit ``node``."""
    for rule in PLACEMENT:
        if is_op(node, *rule.ops) and (rule.condition is None or CONDITIONS[rule.condition](node)):
            return rule
    return None


def plan(gm: fx.GraphModule, ignore: tuple[str, ...] = ()) -> Placement:
    """Read the table over ``gm``: which layers get quantizers on which arguments (``ignore``: name patterns,
    ``"last"`` for the layers that produce the model's outputs)."""
    last = _output_layers(gm) if "last" in ignore else set()
    patterns = [p for p in ignore if p != "last"]
    sites, skipped, kept = [], [], {}
    for node in gm.graph.nodes:
        rule = match(node) if node.op == "call_function" else None
        if rule is None:
            continue
        if rule.action == "float":
            kept[rule.name] = kept.get(rule.name, 0) + 1
            continue
        name = layer_name(node, rule.weight)
        if node in last or matches_any(name, patterns):
            skipped.append(name)
            continue
        acts = [node.args[i] for i in rule.activations if i < len(node.args) and isinstance(node.args[i], fx.Node)]
        weight = node.args[rule.weight] if rule.weight is not None else None
        sites.append(Site(node, rule, name, [a for a in acts if _is_float(a)],
                          weight if isinstance(weight, fx.Node) else None))
    return Placement(sites, skipped, kept)


def _output_layers(gm: fx.GraphModule) -> set[fx.Node]:
    """Quantizable layers whose result reaches an output through non-layer ops only (the classifier head)."""
    weighted = [n for n in gm.graph.nodes if n.op == "call_function" and (rule := match(n)) is not None
                and rule.action == "quantize" and rule.weight is not None]
    return layers.output_layers(gm, weighted)
