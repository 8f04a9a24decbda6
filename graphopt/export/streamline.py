"""Streamlining: the verified graph as a plain, fast eager module for deployment (``graphopt.streamline``).

"Lowering" in graphopt means one thing only: swapping layers for graphopt's kernels (the lower-sparse pass).
Streamlining changes no layer and no weight: passes leave physically smaller dense tensors (nothing is masked). It drops what
the eager module does not need: torch.export's per-call wrappers and its input-guard call, and the Python layer of
``torch.ops.aten.*`` dispatch (about 1.5 us per op, measured) by calling the direct torch bindings of the same
overloads. The result is checked bit for bit against the graph it came from; if it differs, the ATen targets stay.

``memory_format="channels_last"`` also stores conv weights and runs image tensors in NHWC order (inputs converted on
entry, 4-D outputs returned contiguous), which oneDNN runs faster for the narrow convs pruning leaves behind; conv
kernels then sum in another order, so that result is checked with a float tolerance instead of bit for bit.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.errors import GraphoptWarning
from graphopt.graph.module import GraphoptModule
from graphopt.graph.inputs import ExampleInputs, flat_outputs

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


MemoryFormat = Literal["preserve", "channels_last"]
CONVS_2D = (aten.conv2d.default, torch.conv2d, aten.conv_transpose2d.input, torch.conv_transpose2d)


def streamline(gm: fx.GraphModule, example_inputs: Any, *, rebind: bool = True,
          memory_format: MemoryFormat = "preserve") -> fx.GraphModule:
    """A plain ``fx.GraphModule`` computing exactly what ``gm`` computes, cheaper to call in eager mode.

    ``example_inputs`` are used to check the result bit for bit; ``rebind=False`` keeps the ATen targets.
    ``memory_format="channels_last"`` runs 2-D convs in NHWC order (see the module docstring); where a graph has
    no 2-D conv it changes nothing.
    """
    if memory_format not in ("preserve", "channels_last"):
        raise ValueError(f"memory_format must be 'preserve' or 'channels_last', not {memory_format!r}")
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, value_map, return_output_node=True)
    graph.output(out[0])
    graph._codegen = gm.graph._codegen  # keeps the pytree in/out handling: called exactly like the model
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    kind = GraphoptModule if isinstance(gm, GraphoptModule) else fx.GraphModule  # keeps train()/eval(), pickling
    streamlined = kind(gm, graph, class_name=type(gm).__name__)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(streamlined, attr, getattr(gm, attr))
    streamlined.meta.update(gm.meta)
    inputs = ExampleInputs.of(example_inputs)
    if rebind:
        _rebind(streamlined, gm, inputs)
    if memory_format == "channels_last" and not _channels_last(streamlined, gm, inputs):
        warnings.warn("streamline(memory_format='channels_last') changed the outputs beyond float tolerance; "
                      "streamlined without it", GraphoptWarning, stacklevel=2)
        return streamline(gm, example_inputs, rebind=rebind)
    return streamlined


def _is_4d_float(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return hasattr(meta, "shape") and len(meta.shape) == 4 and meta.dtype.is_floating_point


def _channels_last(streamlined: fx.GraphModule, reference: fx.GraphModule, inputs: ExampleInputs) -> bool:
    """NHWC weights and activations for 2-D convs; views become reshapes (a view of an NHWC tensor can fail).
    Weights are replaced on ``streamlined``'s own attribute containers (fx.GraphModule made fresh ones), never on
    ``reference``'s. Returns whether the outputs still match ``reference`` within float tolerance."""
    graph = streamlined.graph
    convs = [n for n in graph.nodes if n.op == "call_function" and n.target in CONVS_2D]
    if not convs:
        return True
    nhwc = torch.channels_last
    for conv in convs:
        weight = conv.args[1]
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            owner, _, leaf = weight.target.rpartition(".")
            module = streamlined.get_submodule(owner) if owner else streamlined
            value = getattr(module, leaf)
            if value.dim() == 4:
                new = value.detach().contiguous(memory_format=nhwc)
                setattr(module, leaf, torch.nn.Parameter(new, value.requires_grad)
                        if isinstance(value, torch.nn.Parameter) else new)
    for node in list(graph.nodes):
        if node.op == "placeholder" and _is_4d_float(node):
            with graph.inserting_after(node):
                converted = graph.call_function(torch.Tensor.contiguous, (node,), {"memory_format": nhwc})
            node.replace_all_uses_with(converted, delete_user_cb=lambda user: user is not converted)
        elif node.op == "call_function" and node.target in (torch.Tensor.view, aten.view.default):
            node.target = torch.reshape
        elif node.op == "output":
            def standard(arg):
                if isinstance(arg, fx.Node) and _is_4d_float(arg):
                    with graph.inserting_before(node):
                        return graph.call_function(torch.Tensor.contiguous, (arg,))
                return arg
            node.args = fx.node.map_aggregate(node.args, standard)
    streamlined.recompile()
    with torch.no_grad():
        want, got = flat_outputs(inputs.call(reference)), flat_outputs(inputs.call(streamlined))
    scale = max((w.abs().max().item() for w in want if w.is_floating_point() and w.numel()), default=1.0)
    return len(want) == len(got) and all(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
                                         for a, b in zip(want, got))


def _rebind(streamlined: fx.GraphModule, reference: fx.GraphModule, inputs: ExampleInputs) -> None:
    originals = {n: n.target for n in streamlined.graph.nodes if n.op == "call_function" and n.target in DIRECT}
    for node in originals:
        node.target = DIRECT[node.target]
    streamlined.recompile()
    with torch.no_grad():
        want, got = flat_outputs(inputs.call(reference)), flat_outputs(inputs.call(streamlined))
    if len(want) != len(got) or not all(torch.equal(a, b) for a, b in zip(want, got)):
        for node, target in originals.items():  # a binding chose another kernel: keep the ATen ops
            node.target = target
        streamlined.recompile()
