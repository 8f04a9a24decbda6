"""Size attributes of the write-back: module attributes made to agree with the tensors the graph gave them.

Standard layers (Linear, Conv, ConvTranspose, norms, Embedding, MultiheadAttention, HF's Conv1D) read their sizes
off their new tensors, and conv groups / GroupNorm groups off the graph op that calls them. Any other module (an
attention block, a user's own layer) may keep sizes in attributes its forward uses (``self.num_heads``,
``self.head_dim``, ``self.scale``). For those, graphopt compares the constants baked into the ops of that
module's own forward at capture with the constants now: a constant that changed from ``old`` to ``new`` (a
view's head count 4 -> 2) updates an attribute of the module that holds ``old`` and is named like a size.
Attributes with other names are left alone and, if the model then disagrees with the graph, named in the error.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.graph.nodes import is_op

aten = torch.ops.aten
_SIZE_WORDS = ("head", "dim", "hidden", "embed", "channel", "feature", "width", "size", "group", "scal", "inner",
               "d_k", "d_v", "d_model", "n_embd", "split", "heads")
_NOT_SIZES = ("window", "patch", "kernel", "stride", "pad", "position", "vocab", "idx", "index", "layer", "max_",
              "dropout", "eps", "seed", "rank")


def op_constants(args: Any) -> list[list]:
    """The int/float constants of an op's arguments, one list per argument."""
    return [[x for x in torch.utils._pytree.tree_leaves(a) if isinstance(x, (int, float)) and not isinstance(x, bool)]
            for a in args]


@dataclass
class SizeChanges:
    """Per module path: the constants of its own ops that changed (old -> the new values seen) and kept."""

    changed: dict[str, dict[float, set]] = field(default_factory=dict)
    kept: dict[str, set] = field(default_factory=dict)

    @classmethod
    def of(cls, gm: fx.GraphModule, snap) -> "SizeChanges":
        """Compare every op's constants now with those recorded at capture (``snap.constants``)."""
        from graphopt.analysis.blocks import scope_of

        changed: dict[str, dict] = defaultdict(lambda: defaultdict(set))
        kept: dict[str, set] = defaultdict(set)
        for node in gm.graph.nodes:
            old = snap.constants.get(node.name) if node.op == "call_function" else None
            new = op_constants(node.args) if old is not None else None
            if old is None or len(old) != len(new):
                continue
            scope = scope_of(node)
            for a, b in _aligned(old, new):
                if a != b:
                    changed[scope][a].add(b)
                else:
                    kept[scope].add(a)
        return cls({k: dict(v) for k, v in changed.items()}, dict(kept))

    def new_value(self, path: str, value: float):
        """The one value ``value`` became in ``path``'s own ops, or None (unchanged or ambiguous)."""
        seen = self.changed.get(path, {}).get(value)
        return next(iter(seen)) if seen and len(seen) == 1 else None

    def stale_attributes(self, model: nn.Module) -> list[tuple[str, str, object, str]]:
        """(module, attribute, value, hint) for attributes that still hold a size the module's ops changed."""
        found = []
        for path, olds in self.changed.items():
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            for attr, value in _plain_attributes(module):
                values = value if isinstance(value, (tuple, list)) else (value,)
                hits = [v for v in values if v in olds]
                if hits:
                    found.append((path, attr, value, ", ".join(f"{h} is now {sorted(olds[h])}" for h in hits)))
        return found


def _aligned(old: list[list], new: list[list]):
    """Pairs of (constant at capture, constant now), argument by argument, where an argument kept its length."""
    for a, b in zip(old, new):
        if len(a) == len(b):
            yield from zip(a, b)


def _plain_attributes(module: nn.Module):
    for attr, value in vars(module).items():
        if attr.startswith("_") or attr == "training" or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) or (isinstance(value, (tuple, list)) and value
                                               and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            yield attr, value


def plain_size_attributes(module: nn.Module):
    """(name, value) of a module's int/float attributes named like sizes (``num_heads``, ``head_dim``)."""
    return [(attr, value) for attr, value in _plain_attributes(module)
            if isinstance(value, (int, float)) and _is_size_name(attr)]


def _is_size_name(attr: str) -> bool:
    low = attr.lower()
    return any(w in low for w in _SIZE_WORDS) and not any(w in low for w in _NOT_SIZES) or low in ("c", "d", "h")


def update_sizes(model: nn.Module, gm: fx.GraphModule, rename: dict[str, str], changes: SizeChanges) -> None:
    """Make every module's size attributes match its tensors (see the module docstring)."""
    calls = _calls_by_weight(gm, rename)
    for path, module in model.named_modules():
        if _standard(module):
            _standard_sizes(module, calls.get(f"{path}.weight" if path else "weight"))
        else:
            for attr, value in _plain_attributes(module):
                if isinstance(value, (int, float)) and _is_size_name(attr):
                    new = changes.new_value(path, value)
                    if new is not None and type(new) is type(value):
                        setattr(module, attr, new)


def _calls_by_weight(gm: fx.GraphModule, rename: dict[str, str]) -> dict[str, fx.Node]:
    """The op reading each weight (by the model's name for it): conv / group_norm nodes carry groups."""
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for arg in node.args[:3]:
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                found.setdefault(rename.get(arg.target, arg.target), node)
    return found


def _standard(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm,
                               nn.LayerNorm, nn.Embedding, nn.MultiheadAttention, getattr(nn, "RMSNorm", nn.LayerNorm))) \
        or type(module).__name__ == "Conv1D"


def _standard_sizes(m: nn.Module, call: fx.Node | None) -> None:
    w = getattr(m, "weight", None)
    if isinstance(m, nn.Linear) and w is not None:
        m.out_features, m.in_features = w.shape
    elif isinstance(m, nn.modules.conv._ConvNd) and w is not None:
        groups = _conv_groups(call, m.groups)
        m.groups = groups
        if m.transposed:
            m.in_channels, m.out_channels = w.shape[0], w.shape[1] * groups
        else:
            m.out_channels, m.in_channels = w.shape[0], w.shape[1] * groups
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        ref = w if w is not None else getattr(m, "running_mean", None)
        if ref is not None:
            m.num_features = ref.shape[0]
    elif isinstance(m, nn.GroupNorm) and w is not None:
        m.num_channels = w.shape[0]
        if call is not None and is_op(call, aten.group_norm):
            m.num_groups = int(call.args[1])
    elif isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) and w is not None:
        m.normalized_shape = tuple(w.shape)
    elif isinstance(m, nn.Embedding):
        m.num_embeddings, m.embedding_dim = m.weight.shape
    elif isinstance(m, nn.MultiheadAttention):
        _mha_sizes(m)
    elif type(m).__name__ == "Conv1D" and w is not None:  # HF GPT-2 style: weight stored (in, out)
        m.nf = w.shape[1]
        if hasattr(m, "nx"):
            m.nx = w.shape[0]


def _conv_groups(call: fx.Node | None, default: int) -> int:
    if call is None or not is_op(call, aten.conv1d, aten.conv2d, aten.conv3d, aten.conv_transpose1d,
                                 aten.conv_transpose2d, aten.conv_transpose3d, aten.convolution):
        return default
    index = 8 if is_op(call, aten.convolution) else 6  # conv*d and conv_transpose*d both carry groups at 6
    return int(call.args[index]) if len(call.args) > index else call.kwargs.get("groups", 1)


def _mha_sizes(m: nn.MultiheadAttention) -> None:
    out = m.out_proj.weight
    m.embed_dim = out.shape[0]
    m.head_dim = out.shape[1] // m.num_heads if out.shape[1] % m.num_heads == 0 else m.head_dim
    if m._qkv_same_embed_dim:
        m.kdim = m.vdim = m.in_proj_weight.shape[1]
    else:
        m.kdim, m.vdim = m.k_proj_weight.shape[1], m.v_proj_weight.shape[1]
