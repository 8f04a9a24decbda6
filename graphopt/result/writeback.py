"""``result.to_model()``: the user's own model back, with every change of the pipeline applied to its modules.

The optimized graph reads parameters under the qualified names of the original model, so most changes can be
carried back by name: sliced tensors replace the module's own, size attributes follow the new tensors
(graphopt.result.writeback_sizes), and structural changes (removed blocks, low-rank factors, folded norms, sparsity masks,
lowered sparse layers) become module edits (graphopt.result.writeback_structure). Hugging Face models also get their
``config`` updated (graphopt.result.hf_config).

The graph is the oracle: the written-back model is run on the example inputs and on a second batch size and must
match ``result.module``. Where it cannot (a Python int in the user's forward encodes a size that was pruned), a
WritebackError names the module and the attribute; ``result.module`` stays usable. The caller's model is never
changed: the write-back works on a deep copy.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.util.diagnose import module_stack, short_reason
from graphopt.errors import GraphoptWarning, WritebackError
from graphopt.graph.module import GraphoptModule
from graphopt.graph.nodes import owner_and_leaf, resolve
from graphopt.graph.inputs import ExampleInputs
from graphopt.result.writeback_sizes import SizeChanges, op_constants, update_sizes
from graphopt.result.writeback_structure import apply_structure, delete_removed, graph_tensors, model_name

__all__ = ["Snapshot", "snapshot", "to_model"]


@dataclass
class Snapshot:
    """What the captured graph looked like before any pass: tensor shapes read and constants baked into ops."""

    attrs: dict[str, tuple[int, ...]]
    constants: dict[str, list] = field(default_factory=dict)  # node name -> int/float constants, per argument
    tied: list[list[str]] = field(default_factory=list)  # parameter names that share one tensor in the model


def snapshot(gm: fx.GraphModule, model: nn.Module) -> Snapshot:
    """Record the captured graph's tensor shapes and op constants (the write-back compares against them later)."""
    attrs = {name: tuple(t.shape) for name, t in graph_tensors(gm).items()}
    constants = {n.name: op_constants(n.args) for n in gm.graph.nodes if n.op == "call_function"}
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return Snapshot(attrs, constants, [names for names in by_id.values() if len(names) > 1])


def to_model(gm: fx.GraphModule, original: nn.Module, snap: Snapshot, inputs: ExampleInputs,
             *, verify: bool = True) -> nn.Module:
    """A deep copy of ``original`` (the same class) computing what ``gm`` computes; see the module docstring."""
    _check_class(original)
    model = copy.deepcopy(original)
    was_training = original.training
    model.eval()
    changes = SizeChanges.of(gm, snap)  # graph vs capture only: the model edits below do not change it
    rename = apply_structure(model, gm, snap, inputs, changes)
    _assign_tensors(model, gm, snap, rename)
    update_sizes(model, gm, rename, changes)
    deleted = delete_removed(model, gm)
    _update_config(model, deleted)
    if verify:
        check_against_graph(model, gm, inputs, changes)
    model.train(was_training)
    return model


def _check_class(original: nn.Module) -> None:
    cls = type(original)
    if isinstance(original, (fx.GraphModule, torch.jit.ScriptModule)) or "<locals>" in cls.__qualname__:
        raise WritebackError(
            f"to_model() rebuilds the model as its own class, but {cls.__qualname__} is not an nn.Module class "
            "you can import (a traced/scripted module or a class defined inside a function); use result.module, "
            "graphopt.save or graphopt.export_onnx, or define the class at module level")


def _assign_tensors(model: nn.Module, gm: fx.GraphModule, snap: Snapshot, rename: dict[str, str]) -> None:
    """Every tensor the graph reads goes to the model under its (renamed) qualified name, parameters staying
    parameters; tied parameters stay tied."""
    targets = {}
    for graph_name, tensor in graph_tensors(gm).items():
        name = model_name(graph_name, rename)
        if _EXPORT_CONSTANT.fullmatch(name.rpartition(".")[2]) and not _has(model, name):
            continue  # a tensor the forward creates (torch.tensor(size) in DeBERTa's scale): not model state
        targets[name] = tensor
        _set_tensor(model, name, tensor)
    for names in snap.tied:
        source = next((n for n in names if n in targets), None)
        if source is not None:
            shared = resolve(model, source)
            for other in names:
                if other != source and _has(model, other):
                    owner, leaf = owner_and_leaf(model, other)
                    owner._parameters[leaf] = shared


_EXPORT_CONSTANT = re.compile(r"(lifted_tensor_|_tensor_constant)\d+")  # torch.export's names for such constants


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, leaf = _owner(model, name, create=True)
    value = tensor.detach().clone()
    if _is_masked(owner, leaf):  # the graph read original * mask; the mask is registered by apply_structure
        return
    if isinstance(tensor, nn.Parameter) or leaf in owner._parameters:
        requires = tensor.requires_grad if isinstance(tensor, nn.Parameter) else True
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)
        if leaf in owner.__dict__:
            delattr(owner, leaf)
        owner.register_parameter(leaf, nn.Parameter(value, requires_grad=requires and value.is_floating_point()))
    else:
        persistent = leaf not in owner._non_persistent_buffers_set
        owner._buffers.pop(leaf, None)
        owner.register_buffer(leaf, value, persistent=persistent)


def _is_masked(owner: nn.Module, leaf: str) -> bool:
    return torch.nn.utils.parametrize.is_parametrized(owner, leaf)


def _owner(model: nn.Module, name: str, create: bool = False) -> tuple[nn.Module, str]:
    *path, leaf = name.split(".")
    module = model
    for part in path:
        if not hasattr(module, part) and create:
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    return module, leaf


def _has(model: nn.Module, name: str) -> bool:
    try:
        resolve(model, name)
        return True
    except AttributeError:
        return False


def _update_config(model: nn.Module, deleted: list[tuple[str, int]]) -> None:
    from graphopt.result.hf_config import is_hf_model, sync_sizes_with_config, update_config
    from graphopt.result.hf_quant import mark_quantized

    if is_hf_model(model):
        mark_quantized(model)  # weight-quantized layers: the quantization_config from_pretrained reads back
        messages = update_config(model, deleted)
        for message in messages:
            warnings.warn(f"to_model: {message}", GraphoptWarning, stacklevel=4)
        if not messages:  # a config that describes the model also says what its attention's sizes are
            sync_sizes_with_config(model)


def check_against_graph(model: nn.Module, gm: fx.GraphModule, inputs: ExampleInputs,
                        changes: SizeChanges) -> None:
    """The written-back model must compute what the graph computes, at the example batch and at another one, both
    in eval mode (the graph is switched for the check, when the user left it training, and switched back)."""
    with _in_eval(gm):
        _compare_outputs(model, gm, inputs, changes)


@contextlib.contextmanager
def _in_eval(gm: fx.GraphModule):
    training = gm.training
    switchable = isinstance(gm, GraphoptModule)  # a plain torch.export module's graph fixes its mode
    if training and switchable:
        gm.eval()
    try:
        yield
    finally:
        if training and switchable:
            gm.train()


def _compare_outputs(model: nn.Module, gm: fx.GraphModule, inputs: ExampleInputs, changes: SizeChanges) -> None:
    for batch in _check_batches(gm, inputs):
        with torch.no_grad():
            want = _comparable(batch.call(gm))
            with module_stack(model) as stack:
                try:
                    got = _comparable(batch.call(model))
                except Exception as e:
                    where = stack[-1] if stack else ""
                    raise WritebackError(_failure(model, where, changes, f"raised {short_reason(e)}")) from e
        for key, a in want.items():
            b = got.get(key)
            if b is None or b.shape != a.shape:
                raise WritebackError(_failure(model, "", changes, f"output {key!r} has shape "
                                              f"{None if b is None else tuple(b.shape)}, the graph's {tuple(a.shape)}"))
            try:
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * max(1.0, float(a.abs().max()) if a.numel() else 1.0))
            except AssertionError as e:
                raise WritebackError(_failure(model, "", changes, f"output {key!r} differs from the graph's: "
                                              f"{short_reason(e)}")) from e


def _comparable(out: Any) -> dict[str, torch.Tensor]:
    """Output tensors by a stable key; HF ModelOutputs by field (the graph has no KV cache, the model may)."""
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    leaves = torch.utils._pytree.tree_leaves(out)
    return {str(i): x for i, x in enumerate(t for t in leaves if isinstance(t, torch.Tensor))}


def _check_batches(gm: fx.GraphModule, inputs: ExampleInputs) -> list[ExampleInputs]:
    """The example inputs, and the same inputs with one more row where the graph accepts it (dynamic batch)."""
    grown = torch.utils._pytree.tree_map(
        lambda x: torch.cat([x, x[:1]]) if isinstance(x, torch.Tensor) and x.dim() else x, (inputs.args, inputs.kwargs))
    second = ExampleInputs(tuple(grown[0]), dict(grown[1]))
    try:
        with torch.no_grad():
            second.call(gm)
    except Exception:  # a graph captured for one batch size only: check at that one
        return [inputs]
    return [inputs, second]


def _failure(model: nn.Module, where: str, changes: SizeChanges, what: str) -> str:
    suspects = changes.stale_attributes(model)
    module = where or (suspects[0][0] if suspects else "")
    lines = [f"to_model(): the written-back {type(model).__name__} does not reproduce the optimized graph: "
             f"{'module `' + module + '` ' if module else ''}{what}."]
    if suspects:
        lines.append("Attributes that still hold sizes the pipeline changed: " + ", ".join(
            f"`{m}.{a}` = {v!r} ({hint})" for m, a, v, hint in suspects[:6]) + ".")
    lines.append("Its forward computes a size graphopt cannot update (a Python int, or a size read from its input, "
                 "that encodes a pruned dimension): write it as -1 or derive it from the weights, or keep that "
                 "module unpruned (ignore=[...]). result.module, graphopt.save and graphopt.export_onnx still work.")
    return " ".join(lines)
