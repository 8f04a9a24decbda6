"""``remove-identity``: drop nodes that return their input unchanged in eval mode.

Rules are data (``IDENTITY_RULES``): the ops a rule matches and the condition under which the node equals its
first argument. ``aten.detach`` is kept on purpose: it changes gradients, which QAT needs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.fx as fx

from graphopt.graph.nodes import arg, is_op, replace_with
from graphopt.pipeline.pass_base import Context, Pass, PassResult
from graphopt.pipeline.registry import register_pass

aten = torch.ops.aten


def _eval_dropout(n: fx.Node) -> bool:
    return arg(n, "train", True) is False


def _converts_nothing(n: fx.Node) -> bool:
    """``x.to(...)`` whose input already has the result's dtype, strides and device returns ``x`` itself."""
    src, out = n.args[0].meta.get("tensor_meta"), n.meta.get("tensor_meta")
    if src is None or out is None or n.kwargs.get("copy", False) is True or True in n.args[1:]:  # copy=True
        return False
    same_device = n.args[0].meta.get("device") == n.meta.get("device")
    return same_device and (src.dtype, src.stride) == (out.dtype, out.stride)


IDENTITY_RULES: dict[str, tuple[tuple, Callable[[fx.Node], bool]]] = {
    "dropout": ((aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.feature_alpha_dropout), _eval_dropout),
    "alias": ((aten.alias,), lambda n: True),                            # alias(x) == x
    "to": ((aten.to, aten.type_as), _converts_nothing),                 # x.to(x.dtype) == x
}


@register_pass
@dataclass(frozen=True)
class RemoveIdentity(Pass):
    """Remove eval-mode dropout, aliases and dtype/device conversions that convert nothing."""

    name: ClassVar[str] = "remove-identity"
    preserves_semantics: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        removed: Counter = Counter()
        for node in list(gm.graph.nodes):
            for kind, (ops, applies) in IDENTITY_RULES.items():
                if is_op(node, *ops) and isinstance(node.args[0], fx.Node) and applies(node):
                    replace_with(node, node.args[0])
                    removed[kind] += 1
                    break
        return PassResult(gm, modified=bool(removed), stats={"removed": sum(removed.values()), **removed})
