"""Lowering: the verified graph as a plain, fast eager module for deployment.

Passes leave physically smaller dense tensors (nothing is masked), so lowering changes no weights. It drops what
the eager module does not need: torch.export's per-call wrappers and its input-guard call, and the Python layer of
``torch.ops.aten.*`` dispatch (about 1.5 us per op, measured) by calling the direct torch bindings of the same
overloads. The result is checked bit for bit against the graph it came from; if it differs, the ATen targets stay.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.inputs import ExampleInputs, flat_outputs

aten = torch.ops.aten

# ATen overload -> the torch binding that dispatches to exactly that overload for the same arguments
DIRECT: dict[Any, Any] = {
    aten.conv1d.default: torch.conv1d, aten.conv2d.default: torch.conv2d, aten.conv3d.default: torch.conv3d,
    aten.conv_transpose1d.default: torch.conv_transpose1d, aten.conv_transpose2d.input: torch.conv_transpose2d,
    aten.conv_transpose3d.input: torch.conv_transpose3d, aten.linear.default: F.linear,
    aten.batch_norm.default: torch.batch_norm, aten.layer_norm.default: torch.layer_norm,
    aten.group_norm.default: torch.group_norm, aten.relu.default: torch.relu, aten.sigmoid.default: torch.sigmoid,
    aten.tanh.default: torch.tanh, aten.gelu.default: torch._C._nn.gelu, aten.silu.default: torch._C._nn.silu,
    aten.hardswish.default: torch._C._nn.hardswish, aten.hardsigmoid.default: torch._C._nn.hardsigmoid,
    aten.hardtanh.default: torch._C._nn.hardtanh, aten.add.Tensor: torch.add, aten.sub.Tensor: torch.sub,
    aten.mul.Tensor: torch.mul, aten.div.Tensor: torch.div, aten.mean.dim: torch.mean, aten.cat.default: torch.cat,
    aten.flatten.using_ints: torch.flatten, aten.adaptive_avg_pool2d.default: torch._C._nn.adaptive_avg_pool2d,
    aten.max_pool2d.default: torch.max_pool2d, aten.avg_pool2d.default: torch._C._nn.avg_pool2d,
    aten.view.default: torch.Tensor.view, aten.reshape.default: torch.reshape, aten.permute.default: torch.permute,
    aten.transpose.int: torch.transpose, aten.softmax.int: torch.softmax, aten.matmul.default: torch.matmul,
    aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention,
    aten.embedding.default: torch.embedding, aten.addmm.default: torch.addmm, aten.neg.default: torch.neg,
    aten.rsqrt.default: torch.rsqrt, aten.unsqueeze.default: torch.unsqueeze, aten.expand.default: torch.Tensor.expand,
    aten.contiguous.default: torch.Tensor.contiguous, aten.split_with_sizes.default: torch.split_with_sizes,
    aten.chunk.default: torch.chunk,
}


def lower(gm: fx.GraphModule, example_inputs: Any, *, rebind: bool = True) -> fx.GraphModule:
    """A plain ``fx.GraphModule`` computing exactly what ``gm`` computes, cheaper to call in eager mode.

    ``example_inputs`` are used to check the result bit for bit; ``rebind=False`` keeps the ATen targets.
    """
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, value_map, return_output_node=True)
    graph.output(out[0])
    graph._codegen = gm.graph._codegen  # keeps the pytree in/out handling: called exactly like the model
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    lowered = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(lowered, attr, getattr(gm, attr))
    lowered.meta.update(gm.meta)
    if rebind:
        _rebind(lowered, gm, ExampleInputs.of(example_inputs))
    return lowered


def _rebind(lowered: fx.GraphModule, reference: fx.GraphModule, inputs: ExampleInputs) -> None:
    originals = {n: n.target for n in lowered.graph.nodes if n.op == "call_function" and n.target in DIRECT}
    for node in originals:
        node.target = DIRECT[node.target]
    lowered.recompile()
    with torch.no_grad():
        want, got = flat_outputs(inputs.call(reference)), flat_outputs(inputs.call(lowered))
    if len(want) != len(got) or not all(torch.equal(a, b) for a, b in zip(want, got)):
        for node, target in originals.items():  # a binding chose another kernel: keep the ATen ops
            node.target = target
        lowered.recompile()
