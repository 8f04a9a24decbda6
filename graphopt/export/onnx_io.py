"""What ONNX sees of a module: flat named tensor inputs and outputs, plus small edits of the exported ModelProto.

ONNX graphs take and return flat lists of tensors. ``FlatIO`` wraps a module called with any args/kwargs (HF models
take ``input_ids=..., attention_mask=..., use_cache=False``) and returning any nesting (tensor, tuple, dict, HF
``ModelOutput``) so that the exporter sees ``forward(*tensors) -> tuple[Tensor, ...]``; non-tensor inputs are baked
in. Names come from where each tensor sits: ``input_ids``, ``x``, ``logits``, ``past_key_values.0.1``.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils._pytree import (
    GetAttrKey, MappingKey, SequenceKey, tree_flatten, tree_flatten_with_path, tree_unflatten,
)

from graphopt.errors import InputError
from graphopt.graph.inputs import ExampleInputs

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class FlatIO(nn.Module):
    """``module`` seen as ``forward(*tensors) -> tuple of tensors``, with a name for every input and output."""

    PREFIX = "model."  # the wrapped module's attribute name, stripped again from initializer names

    def __init__(self, module: nn.Module, inputs: ExampleInputs):
        super().__init__()
        self.model = module
        self.training = False  # set directly: .eval() would recurse, and torch.export's modules refuse .train()
        leaves_with_paths, self._spec = tree_flatten_with_path((inputs.args, inputs.kwargs))
        self._leaves = [leaf for _, leaf in leaves_with_paths]
        self.tensors = [leaf for leaf in self._leaves if isinstance(leaf, torch.Tensor)]
        if not self.tensors:
            raise InputError(f"export_onnx needs at least one tensor among example_inputs, got {inputs.describe()}")
        arg_names = _arg_names(module, inputs)
        self.input_names = _unique([
            _input_name(path, arg_names) for path, leaf in leaves_with_paths if isinstance(leaf, torch.Tensor)
        ])
        try:
            with torch.no_grad():
                named = named_tensors(inputs.call(module))
        except Exception as e:  # any failure here means the inputs do not fit the module
            raise InputError(f"example_inputs {inputs.describe()} do not fit {type(module).__name__}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; pass the inputs the "
                             "module is called with (a tuple of positional inputs or a dict of keyword inputs)") from e
        if not named:
            raise InputError(f"{type(module).__name__} returns no tensor on {inputs.describe()}: nothing to export")
        # unique across inputs too: ONNX names one value per name, and an output may be called like an input
        self.output_names = _unique(self.input_names + [name for name, _ in named])[len(self.input_names):]
        self.reference = [t for _, t in named]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rebuild the original call from flat tensors; return the output tensors flat."""
        it = iter(tensors)
        leaves = [next(it) if isinstance(leaf, torch.Tensor) else leaf for leaf in self._leaves]
        args, kwargs = tree_unflatten(leaves, self._spec)
        return tuple(t for _, t in named_tensors(self.model(*args, **kwargs)))

    def call(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The module's flat outputs on ``tensors`` (no grad)."""
        with torch.no_grad():
            return list(self(*tensors))

    def batched_inputs(self) -> list[bool]:
        """Which inputs carry the batch: dim 0 of every tensor whose dim 0 equals the first input's."""
        first = next((t.shape[0] for t in self.tensors if t.dim()), None)
        return [t.dim() > 0 and t.shape[0] == first for t in self.tensors]


def named_tensors(out: Any) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a model output with a name each, in ``graphopt.graph.inputs.flat_outputs`` order."""
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):  # HF ModelOutput: its set fields, in order
        out = {k: out[k] for k in out.keys()}
    if isinstance(out, torch.Tensor):
        return [("output", out)]
    pairs = tree_flatten_with_path(out)[0]
    return [(_path_text(path, "output_"), leaf) for path, leaf in pairs if isinstance(leaf, torch.Tensor)]


def _arg_names(module: nn.Module, inputs: ExampleInputs) -> list[str]:
    """Names of the positional inputs from the forward signature; ``input_<i>`` where it has none."""
    names = [f"input_{i}" for i in range(len(inputs.args))]
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return names
    for i, p in enumerate(params[: len(names)]):
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names[i] = p.name
        else:
            break
    return names


def _input_name(path: tuple, arg_names: list[str]) -> str:
    group, first, rest = path[0], path[1], path[2:]
    head = arg_names[first.idx] if group.idx == 0 else str(first.key)
    return _clean(".".join([head] + [_key_text(k) for k in rest]))


def _path_text(path: tuple, index_prefix: str) -> str:
    parts = [_key_text(k) for k in path]
    text = ".".join(parts)
    return _clean(index_prefix + text if path and isinstance(path[0], SequenceKey) else text)


def _key_text(key) -> str:
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, MappingKey):
        return str(key.key)
    if isinstance(key, GetAttrKey):
        return key.name
    return str(key)


def _clean(name: str) -> str:
    return re.sub(r"[^\w.]", "_", name) or "output"


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n] - 1}")
    return out


def count_qdq(proto) -> int:
    """QuantizeLinear and DequantizeLinear nodes in the main graph."""
    return sum(node.op_type in QDQ_OPS for node in proto.graph.node)


def strip_initializer_prefix(proto, prefix: str) -> None:
    """Rename initializers ``model.layer.weight`` to ``layer.weight`` (the wrapper's attribute is no part of them)."""
    graph = proto.graph
    taken = {i.name for i in graph.initializer} | {v.name for v in graph.input} | {v.name for v in graph.output}
    taken |= {o for n in graph.node for o in n.output}
    renames = {}
    for init in graph.initializer:
        new = init.name[len(prefix):] if init.name.startswith(prefix) else None
        if new and new not in taken:
            renames[init.name] = new
            taken.add(new)
    if not renames:
        return
    for init in graph.initializer:
        init.name = renames.get(init.name, init.name)
    for info in list(graph.value_info) + list(graph.output):
        info.name = renames.get(info.name, info.name)
    _rename_inputs(graph, renames)


def _rename_inputs(graph, renames: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for attr in node.attribute:  # If/Loop/Scan bodies may read outer initializers by name
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _rename_inputs(sub, renames)


def set_batch_dim_name(proto, batched: Sequence[bool], name: str) -> None:
    """Call the batch dim ``name`` everywhere: the exporter may give each input its own symbol for the same size."""
    graph = proto.graph
    symbols = {
        v.type.tensor_type.shape.dim[0].dim_param
        for v, b in zip(graph.input, batched)
        if b and v.type.tensor_type.shape.dim and v.type.tensor_type.shape.dim[0].dim_param
    }
    if not symbols:
        return
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param in symbols:
                dim.dim_param = name


_FAKE_QUANT_OPS = (
    "fake_quantize_per_tensor_affine_cachemask",
    "_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
    "fake_quantize_per_channel_affine_cachemask",
)
_meta_library = None


def ensure_fake_quant_meta_kernels() -> None:
    """Give torch's fake-quant kernels a Meta (shape-only) implementation where torch has none.

    Without one, torch.export can trace ``torch.fake_quantize_per_{tensor,channel}_affine`` only with static shapes
    (FakeTensor falls back to running the real kernel, which needs concrete sizes); a dynamic batch then fails with
    ``UnsupportedOperatorException``. Each op returns its input's shape and a bool mask of the same shape.
    """
    global _meta_library
    missing = [op for op in _FAKE_QUANT_OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "Meta")]
    if not missing:
        return
    if _meta_library is None:
        _meta_library = torch.library.Library("aten", "IMPL")  # kept alive: dropping it unregisters the kernels
    for op in missing:
        _meta_library.impl(op, _fake_quant_meta, "Meta")


def _fake_quant_meta(x: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)
