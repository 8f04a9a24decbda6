"""Capturing Hugging Face ``transformers`` models as ``from_pretrained`` gives them (``use_cache=True``).

A decoder in its default configuration returns a ``DynamicCache``, which ``torch.export`` cannot return and which
has no place in a graph of one forward pass. So an HF model is captured with ``use_cache=False``, and the returned
module is called exactly like the model: same argument names in the same order, same ModelOutput class, the same
logits / hidden states; its output just carries no cache.

Optional inputs stay optional. ``attention_mask`` is always captured (an all-ones mask where the caller gave none:
that is what HF computes for ``None``) and a call without it gets the all-ones mask again. Capturing the mask also keeps the graph valid for every batch size: without one, HF's mask
code branches on ``batch_size != position_ids.shape[0]`` (position ids are ``[1, seq]``), and torch.export turns
that branch into a guard that pins the batch to the example's side of ``!= 1``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.graph import CodeGen, _PyTreeCodeGen

from graphopt.graph.inputs import ExampleInputs

__all__ = ["HFCapture", "is_hf_model", "plan_capture", "HFInputsCodeGen"]

# input name -> (filler, the input whose first two dims it has): HF's meaning of None for that input. Not
# token_type_ids: BERT reads None as zeros, but GPT-2 then adds no token-type embedding at all
_FILLS = {"attention_mask": ("ones", "input_ids")}
# arguments whose value is fixed for every call of the graph: a graph of one forward pass holds no KV cache
_FORCED = {"use_cache": False}


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


@dataclass(frozen=True)
class HFCapture:
    """How an HF model is captured: ``inputs`` go to torch.export (``use_cache=False``, masks filled in);
    ``reference`` is what the caller asked for, minus the cache, to check the graph against; ``fills`` and
    ``forced`` become defaults and a prologue in the graph's signature (``HFInputsCodeGen``)."""

    inputs: ExampleInputs
    reference: ExampleInputs
    fills: dict[str, tuple[str, str, torch.dtype]] = field(default_factory=dict)
    forced: dict[str, Any] = field(default_factory=dict)

    def install(self, gm: fx.GraphModule) -> fx.GraphModule:
        """Give ``gm`` the model's optional arguments: defaults in its signature, fills for missing masks."""
        codegen = gm.graph._codegen
        if isinstance(codegen, _PyTreeCodeGen) and (self.fills or self.forced):
            gm.graph._codegen = HFInputsCodeGen(codegen.pytree_info, self.fills, self.forced)
            gm.recompile()
        return gm


def plan_capture(model: nn.Module, inputs: ExampleInputs) -> HFCapture | None:
    """The capture plan for an HF model called on ``inputs``; None for any other model."""
    if not is_hf_model(model):
        return None
    params = inspect.signature(model.forward).parameters
    bound = dict(inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs).arguments)
    forced = {k: v for k, v in _FORCED.items() if k in params}
    reference = {**bound, **forced}
    fills = {}
    for name, (kind, like) in _FILLS.items():
        ref = bound.get(like)
        if name in params and like in bound and isinstance(ref, torch.Tensor) and ref.dim() == 2:
            given = bound.get(name)
            if given is None:
                bound[name] = (torch.ones_like if kind == "ones" else torch.zeros_like)(ref)
            if isinstance(bound[name], torch.Tensor) and bound[name].shape == ref.shape:
                fills[name] = (kind, like, bound[name].dtype)
    captured = {**bound, **forced}
    # keyword order = forward's order, so that the signature is valid Python with defaults; positional calls bind
    # as on the model up to the first argument not captured (GPT-2's past_key_values comes second)
    order = [p for p in params if p in captured]
    return HFCapture(ExampleInputs((), {k: captured[k] for k in order}),
                     ExampleInputs((), {k: reference[k] for k in order if k in reference}), fills, forced)


class HFInputsCodeGen(_PyTreeCodeGen):
    """torch.export's pytree codegen plus Python defaults for the model's optional arguments.

    The generated forward reads ``def forward(self, input_ids, attention_mask=None, use_cache=False)`` and starts
    with ``if attention_mask is None: attention_mask = torch.ones(...)``; forced arguments (``use_cache``) are set
    to their captured value whatever the caller passed, since the graph has no cache to return."""

    def __init__(self, pytree_info, fills: dict, forced: dict) -> None:
        super().__init__(pytree_info)
        self.fills, self.forced = dict(fills), dict(forced)

    def complete(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The call ``(args, kwargs)`` as the graph's pytree spec sees it: every argument by name, missing masks
        filled and forced values set, as the generated forward does (for code that flattens inputs itself)."""
        named = {**dict(zip(self.pytree_info.orig_args, args)), **kwargs}
        for name, (kind, like, dtype) in self.fills.items():
            if named.get(name) is None and isinstance(named.get(like), torch.Tensor):
                ref = named[like]
                named[name] = getattr(torch, kind)(ref.shape[:2], dtype=dtype, device=ref.device)
        named.update({k: v for k, v in self.forced.items() if k in self.pytree_info.orig_args})
        return (), named

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, *, expanded_def: bool = False) -> str:
        """The def line with defaults, the prologue, then torch.export's pytree flattening of the arguments."""
        args = list(self.pytree_info.orig_args)
        required = [a for a in args if a not in self.fills and a not in self.forced]
        signature = [f"{a}=None" if a in self.fills else f"{a}={self.forced[a]!r}" if a in self.forced else a
                     for a in args]
        if any(args.index(a) > args.index(b) for a in required for b in args if b not in required):
            signature = args  # an optional argument before a required one: keep all required (valid Python)
        definition = CodeGen.gen_fn_def(self, signature, maybe_return_annotation, expanded_def=expanded_def)
        for name, (kind, like, dtype) in self.fills.items():
            if name in args and like in args:
                definition += (f"\n    if {name} is None:\n        {name} = torch.{kind}({like}.shape[:2], "
                               f"dtype={dtype}, device={like}.device)")
        for name, value in self.forced.items():
            if name in args:
                definition += f"\n    {name} = {value!r}"
        if free_vars:
            definition += self.gen_var_bindings(args, free_vars, expanded_def)
        return definition
