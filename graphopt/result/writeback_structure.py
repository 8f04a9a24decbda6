"""Structural edits of the write-back: what the graph changed beyond tensor sizes, done to the user's modules.

- removed residual blocks (recorded by graphopt.analysis.blocks.remove_blocks): a block whose module returns ``x + f(x)``
  itself is deleted from its ModuleList/Sequential (``nn.Identity`` elsewhere); otherwise the modules that
  computed only the branch (an HF MLP and its norm, a ViT attention, a ResNet block's convs before a post-add
  ReLU) become ``ZeroBranch``; a plain layer becomes ``nn.Identity``;
- low-rank factors (``<layer>.low_rank.{0,1}.weight``): the layer becomes ``nn.Sequential`` of two layers;
- BatchNorm folded into the layer before it (none of its tensors read any more): ``nn.Identity``;
- sparsity masks: the same ``WeightMask`` parametrization on the model's weight;
- lowered sparse layers (``graphopt::sparse_linear``): ``graphopt.kernels.modules.SparseLinear``;
- weight-quantized layers (``graphopt::quant_linear``): ``graphopt.kernels.modules.QuantLinear`` (a Linear or
  HF Conv1D) or ``QuantPointwiseConv`` (a 1x1 Conv2d), holding the packed codes as buffers; packed embedding
  tables (``graphopt::quant_embedding``): ``QuantEmbedding``.

Names: the graph reads tensors by the original qualified names; ``rename`` maps the few that move (a low-rank
bias, packed sparse buffers) to their place in the edited model. Deletions from lists come last, after the
tensors are in place, since they renumber what follows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

from graphopt.errors import WritebackError
from graphopt.graph.nodes import resolve
from graphopt.graph.inputs import ExampleInputs
from graphopt.result.pruned_mha import narrow_multihead_attention
from graphopt.result.writeback_sizes import SizeChanges

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)


class ZeroBranch(nn.Module):
    """Stands in for a removed residual branch: returns zeros shaped like its first tensor input (the branch's
    contribution to ``x + f(x)``), in the output structure the branch had (``tuple_len`` > 0: a tuple whose other
    entries are None, as an HF attention's ``(output, weights)``)."""

    def __init__(self, tuple_len: int = 0):
        super().__init__()
        self.tuple_len = tuple_len

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Zeros like the first tensor argument."""
        first = next(x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor))
        zeros = torch.zeros_like(first)
        return (zeros, *([None] * (self.tuple_len - 1))) if self.tuple_len else zeros


def graph_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor the graph reads with get_attr, by qualified name."""
    found = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        value = resolve(gm, node.target)
        if isinstance(value, torch.Tensor):
            found[node.target] = value
    return found


def model_name(graph_name: str, rename: dict[str, str]) -> str:
    """Where a tensor the graph reads lives in the written-back model."""
    return rename.get(graph_name, graph_name)


def apply_structure(model: nn.Module, gm: fx.GraphModule, snap, inputs: ExampleInputs,
                    changes: SizeChanges) -> dict[str, str]:
    """Edit ``model``'s modules to the graph's structure (deletions excepted: see ``delete_removed``); the rename.
    ``changes``: the op constants the pipeline changed (heads of a narrowed nn.MultiheadAttention)."""
    _refuse_quantized(gm)
    rename: dict[str, str] = {}
    rename.update(_low_rank(model, gm))
    rename.update(_sparse_kernels(model, gm))
    rename.update(_quant_kernels(model, gm))
    rename.update(_quant_tables(model, gm))
    _masks(model, gm)
    _removed_branches(model, gm, inputs)
    _folded_norms(model, gm, snap)
    narrow_multihead_attention(model, graph_tensors(gm), changes.new_value)
    return rename


def _refuse_quantized(gm: fx.GraphModule) -> None:
    for node in gm.graph.find_nodes(op="call_module"):
        module = gm.get_submodule(node.target)
        if type(module).__module__.startswith("graphopt.quant"):
            raise WritebackError(
                f"to_model(): the graph holds fake-quant modules (`{node.target}`, {type(module).__name__}); "
                "quantized graphs are not written back into the model class yet. Deploy them with "
                "graphopt.export_onnx (real int8 kernels), train them (QAT) as result.module, or save them with "
                "graphopt.save; call to_model() on a result without fake-quant")


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as e:
        raise WritebackError(f"to_model(): the graph reads `{path}`, which {type(model).__name__} has no module "
                             "for; was the model changed after optimize()?") from e


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _low_rank(model: nn.Module, gm: fx.GraphModule) -> dict[str, str]:
    """``X`` factorized into ``X.low_rank.0/1``: ``X`` becomes Sequential(first, second); the bias goes last."""
    rename = {}
    tensors = graph_tensors(gm)
    for name in [n for n in tensors if n.endswith(".low_rank.0.weight")]:
        path = name[: -len(".low_rank.0.weight")]
        old = _module(model, path)
        first, second = tensors[name], tensors[f"{path}.low_rank.1.weight"]
        bias = tensors.get(f"{path}.bias")
        if isinstance(old, nn.Linear) or type(old).__name__ == "Conv1D":  # the graph's factors are (out, in)
            a = nn.Linear(first.shape[1], first.shape[0], bias=False)
            b = nn.Linear(second.shape[1], second.shape[0], bias=bias is not None)
        elif isinstance(old, nn.modules.conv._ConvNd) and not old.transposed and old.padding_mode == "zeros":
            conv = type(old)
            a = conv(first.shape[1], first.shape[0], first.shape[2:], old.stride, old.padding, old.dilation, bias=False)
            b = conv(second.shape[1], second.shape[0], 1, bias=bias is not None)
        else:
            raise WritebackError(f"to_model(): `{path}` ({type(old).__name__}) was factorized by low-rank, but only "
                                 "nn.Linear and zero-padded nn.ConvNd layers can be written back as two layers")
        _replace(model, path, nn.Sequential(a, b).to(first.device, first.dtype))
        rename[f"{path}.low_rank.0.weight"], rename[f"{path}.low_rank.1.weight"] = f"{path}.0.weight", f"{path}.1.weight"
        if bias is not None:
            rename[f"{path}.bias"] = f"{path}.1.bias"
    return rename


def _sparse_kernels(model: nn.Module, gm: fx.GraphModule) -> dict[str, str]:
    """Layers lowered to ``graphopt::sparse_linear`` become SparseLinear modules holding the packed weight."""
    from graphopt.kernels.formats import PackedWeight
    from graphopt.kernels.modules import SparseLinear

    rename = {}
    gpu_ops = [n for n in gm.graph.nodes if n.op == "call_function" and "graphopt.bsr_linear" in str(n.target)]
    if gpu_ops:
        raise WritebackError(f"to_model(): `{gpu_ops[0].name}` runs a GPU sparse kernel that has no module form; "
                             "lower with target='cpu' or use result.module")
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.graphopt.sparse_linear.default:
            continue
        x, values, cols, ptr, bias, fmt, n_in, n_out, threads = node.args
        path = values.target.rpartition(".")[0]
        old = _module(model, path) if path else None
        if not isinstance(old, (nn.Linear, nn.Conv2d)):
            raise WritebackError(f"to_model(): the sparse kernel `{node.name}` has no Linear/1x1-conv module of the "
                                 "model to stand in for; use result.module")
        packed = PackedWeight(fmt, n_out, n_in, *(resolve(gm, a.target) for a in (values, cols, ptr)))
        bias_value = resolve(gm, bias.target) if isinstance(bias, fx.Node) else None
        cls = SparseLinear if isinstance(old, nn.Linear) else _pointwise_conv_class()
        _replace(model, path, cls(packed, bias_value, threads))
        rename.update(_moved_buffers(path, {"values": values, "cols": cols, "ptr": ptr, "bias": bias}))
    return rename


def _moved_buffers(path: str, reads: dict) -> dict[str, str]:
    """{graph name: ``<path>.<part>``} for the tensors a kernel node reads (part -> its get_attr node or None)."""
    return {node.target: f"{path}.{part}" for part, node in reads.items() if isinstance(node, fx.Node)}


def _quant_kernels(model: nn.Module, gm: fx.GraphModule) -> dict[str, str]:
    """Layers running ``graphopt::quant_linear`` become QuantLinear / QuantPointwiseConv modules."""
    from graphopt.kernels.modules import QuantLinear, QuantPointwiseConv

    rename = {}
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.graphopt.quant_linear.default):
        x, qweight, scales, zeros, bias, *settings = node.args
        path = qweight.target.rpartition(".")[0]
        old = _module(model, path) if path else None
        linear = isinstance(old, nn.Linear) or type(old).__name__ == "Conv1D"
        if not (linear or isinstance(old, nn.Conv2d)):
            raise WritebackError(f"to_model(): the quantized kernel `{node.name}` has no Linear/1x1-conv module of "
                                 "the model to stand in for; use result.module")
        tensors = [resolve(gm, a.target) for a in (qweight, scales, zeros)]
        bias_value = resolve(gm, bias.target) if isinstance(bias, fx.Node) else None
        cls = QuantLinear if linear else QuantPointwiseConv
        _replace(model, path, cls(*tensors, bias_value, *settings))
        rename.update(_moved_buffers(path, {"qweight": qweight, "scales": scales, "zeros": zeros, "bias": bias}))
    return rename


def _quant_tables(model: nn.Module, gm: fx.GraphModule) -> dict[str, str]:
    """Embedding tables packed by quantize-weights (``graphopt::quant_embedding``) become QuantEmbedding modules."""
    from graphopt.kernels.quant_embedding import QuantEmbedding

    rename = {}
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.graphopt.quant_embedding.default):
        _, qweight, scales, zeros, *settings = node.args
        path = qweight.target.rpartition(".")[0]
        if not isinstance(_module(model, path) if path else None, nn.Embedding):
            raise WritebackError(f"to_model(): the packed table `{node.name}` has no nn.Embedding of the model to "
                                 "stand in for; use result.module")
        _replace(model, path, QuantEmbedding(*(resolve(gm, a.target) for a in (qweight, scales, zeros)), *settings))
        rename.update(_moved_buffers(path, {"qweight": qweight, "scales": scales, "zeros": zeros}))
    return rename


def _pointwise_conv_class():
    from graphopt.kernels.modules import SparsePointwiseConv

    return SparsePointwiseConv


def _masks(model: nn.Module, gm: fx.GraphModule) -> None:
    """The graph's WeightMask parametrizations, registered on the model's weights with the same masks."""
    from graphopt.analysis.sparsity import WeightMask, register_mask, weight_masks

    for name, mask in weight_masks(gm).items():
        owner_path, _, leaf = name.rpartition(".")
        graph_owner = gm.get_submodule(owner_path) if owner_path else gm
        original = graph_owner.parametrizations[leaf].original
        owner = _module(model, owner_path) if owner_path else model
        if parametrize.is_parametrized(owner, leaf):
            parametrize.remove_parametrizations(owner, leaf, leave_parametrized=False)
        owner._parameters[leaf] = nn.Parameter(original.detach().clone(), requires_grad=original.requires_grad)
        register_mask(model, name, mask.mask.clone(), mask.pattern)
        assert isinstance(owner.parametrizations[leaf][0], WeightMask)


def _removed_branches(model: nn.Module, gm: fx.GraphModule, inputs: ExampleInputs) -> None:
    """Plain layers become Identity; modules that computed only a removed branch become ZeroBranch."""
    zeros: list[str] = []
    for record in gm.meta.get("graphopt_removed_blocks", []):
        if record["plain"]:
            _replace(model, record["name"], nn.Identity())
        elif not record["own_output"]:
            zeros.extend(record["zero"])
    kinds = _output_kinds(model, zeros, inputs)
    for path in zeros:
        _replace(model, path, ZeroBranch(kinds.get(path, 0)))


def _output_kinds(model: nn.Module, paths: list[str], inputs: ExampleInputs) -> dict[str, int]:
    """Per module path: 0 if it returned a tensor, else the length of the tuple it returned (one eager run)."""
    if not paths:
        return {}
    kinds: dict[str, int] = {}

    def record(path: str):
        def hook(_module, _args, out) -> None:  # returns None: the output stays as it was
            kinds.setdefault(path, len(out) if isinstance(out, tuple) else 0)
        return hook

    hooks = [model.get_submodule(p).register_forward_hook(record(p)) for p in paths]
    try:
        with torch.no_grad():
            inputs.call(model)
    finally:
        for h in hooks:
            h.remove()
    return kinds


def _folded_norms(model: nn.Module, gm: fx.GraphModule, snap) -> None:
    """A BatchNorm the graph read at capture and reads nothing of now was folded into its layer: Identity."""
    read_now = set(graph_tensors(gm))
    removed = [r["name"] for r in gm.meta.get("graphopt_removed_blocks", [])]
    for path, module in list(model.named_modules()):
        if not isinstance(module, _BATCH_NORMS) or any(path == r or path.startswith(r + ".") for r in removed):
            continue
        names = [f"{path}.{k}" for k, _ in module.named_parameters()] + [f"{path}.{k}" for k, _ in module.named_buffers()]
        read_then = [n for n in names if n in snap.attrs]
        if read_then and not any(n in read_now for n in read_then):
            _replace(model, path, nn.Identity())


def delete_removed(model: nn.Module, gm: fx.GraphModule) -> list[tuple[str, int]]:
    """Blocks whose module returned ``x + f(x)`` itself: deleted from their ModuleList/Sequential (Identity
    elsewhere). Returns the (list path, index) pairs deleted."""
    deleted: list[tuple[str, int]] = []
    for record in gm.meta.get("graphopt_removed_blocks", []):
        if not record["own_output"]:
            continue
        name = record["name"]
        parent, _, leaf = name.rpartition(".")
        container = model.get_submodule(parent) if parent else model
        if leaf.isdigit() and isinstance(container, (nn.ModuleList, nn.Sequential)):
            deleted.append((parent, int(leaf)))
        else:
            _replace(model, name, nn.Identity())
    for parent, index in sorted(deleted, key=lambda d: (d[0], -d[1])):  # highest index first: no renumbering
        del model.get_submodule(parent)[index]
    return deleted
