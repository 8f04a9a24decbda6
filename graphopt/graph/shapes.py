"""Run a traced graph on example inputs, recording each node's shape and dtype in ``node.meta``.

We follow the fx ShapeProp convention (``node.meta["tensor_meta"]``, a ``TensorMetadata``), so fx tooling that
reads it keeps working. The same run returns the graph's outputs, which the pass manager compares between passes:
one forward gives shapes, numerics and (under a FLOP counter) MACs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from graphopt.graph.inputs import ExampleInputs, flat_outputs


class GraphRunError(RuntimeError):
    """A node raised while the graph ran; carries the node so callers can name it."""

    def __init__(self, node: fx.Node, cause: BaseException):
        super().__init__(f"node `{node.name}` ({node.format_node()}) raised {type(cause).__name__}: {cause}")
        self.node = node


class _Propagator(fx.Interpreter):
    """An Interpreter that stores tensor metadata on every node it runs."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except GraphRunError:
            raise
        except Exception as e:  # any torch error: re-raise naming the node at fault
            raise GraphRunError(n, e) from e
        tensors = [x for x in torch.utils._pytree.tree_leaves(result) if isinstance(x, torch.Tensor)]
        if tensors:
            n.meta["device"] = tensors[0].device
            n.meta["tensor_meta"] = torch.utils._pytree.tree_map(
                lambda x: _extract_tensor_metadata(x) if isinstance(x, torch.Tensor) else None, result
            )
        else:
            n.meta.pop("tensor_meta", None)
        return result


def flat_graph_inputs(gm: fx.GraphModule, inputs: ExampleInputs) -> list[Any]:
    """The values of the graph's placeholders, in order, for a call ``gm(*args, **kwargs)``."""
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is not None:  # torch.export graphs flatten (args, kwargs) with their recorded spec
        complete = getattr(gm.graph._codegen, "complete", None)  # optional HF inputs (capture/hugging_face.py)
        args, kwargs = complete(inputs.args, inputs.kwargs) if complete else (inputs.args, inputs.kwargs)
        return fx_pytree.tree_flatten_spec((list(args), kwargs), in_spec)
    import inspect

    bound = inspect.signature(gm.forward).bind(*inputs.args, **inputs.kwargs)
    bound.apply_defaults()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [bound.arguments[str(p.target).lstrip("*")] for p in placeholders]


@torch.no_grad()
def propagate(gm: fx.GraphModule, inputs: ExampleInputs, *, fake: bool = False) -> list[Any]:
    """Run ``gm`` node by node on ``inputs``, record shapes in ``node.meta``, return its output tensors, flat.

    ``fake=True`` runs on FakeTensors: shapes (and FLOP counts) without computing anything; outputs are fake.
    """
    flat = flat_graph_inputs(gm, inputs)
    if not fake:
        return flat_outputs(_Propagator(gm).run(*flat))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        flat = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in flat]
        return flat_outputs(_Propagator(gm).run(*flat))


def is_fake(tensors: list) -> bool:
    """True if these outputs came from a fake propagation."""
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(t, FakeTensor) for t in tensors)


def shape_of(node: fx.Node) -> torch.Size | None:
    """The recorded shape of a tensor-valued node, or None if unknown or not a tensor."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):
        return meta.shape
    val = node.meta.get("val")
    return val.shape if isinstance(val, torch.Tensor) else None
