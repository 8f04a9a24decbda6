"""``GraphoptModule``: graphopt's graph results as first-class modules (``.train()``/``.eval()``, pickling, copies).

torch.export bakes the model's mode into the graph: it is captured in eval mode, so every BatchNorm node carries
``training=False`` and every dropout ``train=False``, and its unlifted module refuses ``.train()``/``.eval()`` and
does not pickle. A GraphoptModule is an ``fx.GraphModule`` (same graph, same state, called exactly like the model)
whose ``train(mode)`` rewrites those flags the way the eager modules would compute them:

- ``batch_norm`` / ``instance_norm``: batch statistics (and running-statistic updates) in train mode, running
  statistics in eval mode; a norm without running statistics (``track_running_stats=False``) always uses batch
  statistics, as in eager mode. torch.export's ``_native_batch_norm_legit_no_training`` becomes
  ``_native_batch_norm_legit(training=True)`` and back;
- BatchNorm's ``num_batches_tracked`` counts train-mode calls (an ``add_`` node before the norm, train mode only);
- ``dropout`` (and its feature/alpha variants) and the ``train`` flag of RNN ops follow the mode.

Known limits: a ``BatchNorm(momentum=None)`` (cumulative average) was captured with a factor of 0, so its running
statistics stay fixed in train mode (a warning says so); a functional ``F.batch_norm(..., training=True)`` with
running statistics, called explicitly in eval mode, follows the module mode after capture.

Pickling (``torch.save(module)``, ``pickle``, ``copy.deepcopy``) is in graph/pickling.py.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.errors import GraphoptWarning

__all__ = ["GraphoptModule", "as_graphopt_module", "set_graph_mode", "sync_graph_mode", "modes_kept"]

aten = torch.ops.aten
# op -> (position, keyword) of its training flag. Norms read running statistics at position 3.
_FLAGS: dict[Any, tuple[int, str]] = {
    **{op: (5, "training") for op in (aten.batch_norm.default, torch.batch_norm, aten.native_batch_norm.default)},
    **{op: (5, "use_input_stats") for op in (aten.instance_norm.default, torch.instance_norm)},
    **{op: (2, "train") for op in (
        aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
        aten.feature_alpha_dropout.default, torch.dropout, torch.feature_dropout, torch.alpha_dropout,
        torch.feature_alpha_dropout)},
    **{op: (6, "train") for op in (aten.lstm.input, aten.gru.input, aten.rnn_tanh.input, aten.rnn_relu.input)},
}
_NORMS = {aten.batch_norm.default, torch.batch_norm, aten.native_batch_norm.default, aten.instance_norm.default,
          torch.instance_norm}
_BATCH_NORMS = {aten.batch_norm.default, torch.batch_norm, aten.native_batch_norm.default,
                aten._native_batch_norm_legit.default, aten._native_batch_norm_legit_no_training.default}
_NO_TRAINING, _LEGIT = aten._native_batch_norm_legit_no_training.default, aten._native_batch_norm_legit.default
_COUNTER = "num_batches_tracked"


class GraphoptModule(fx.GraphModule):
    """The GraphModule graphopt returns: called exactly like the original model, and, unlike torch.export's
    module, it switches modes (``train()``/``eval()`` rewrite BatchNorm and dropout nodes, see the module
    docstring), pickles (``torch.save(module)``) and copies (``copy.deepcopy``)."""

    def train(self, mode: bool = True) -> GraphoptModule:
        """Set this module and its submodules to train (``mode=True``) or eval mode, as ``nn.Module.train``
        does, and rewrite the graph's mode-dependent nodes to match."""
        super().train(mode)
        sync_graph_mode(self)
        return self

    def recompile(self):
        """Regenerate the forward, on this instance's own GraphModule class even when a wrapper subclassed it."""
        cls = type(self)
        own = next((c for c in cls.__mro__ if "_wrapped_call" in vars(c)), None)
        if own is None or own is cls:
            return super().recompile()
        # FSDP2's fully_shard swaps in a subclass of that class; recompiling on it would install a second call
        # wrapper that finds itself through the instance (infinite recursion on the next call)
        self.__class__ = own
        try:
            return super().recompile()
        finally:
            self.__class__ = cls

    def __reduce__(self):
        # fx.GraphModule's own __reduce__ re-traces the generated code on load, which pytree codegen, the export
        # guard module and HF output types do not survive: store the graph as data instead (graph/pickling.py)
        from graphopt.graph.pickling import rebuild, state_of

        return rebuild, (state_of(self, GraphoptModule),)

    def __copy__(self) -> GraphoptModule:
        # fx's __copy__ builds a plain GraphModule, which would lose train()/eval()
        copied = GraphoptModule(self, self.graph, class_name=type(self).__name__)
        copied.meta = self.meta
        return copied


def as_graphopt_module(gm: fx.GraphModule) -> GraphoptModule:
    """A just-captured graph ``gm`` (its parameters, buffers, submodules and attributes) as a GraphoptModule in
    eval mode, the mode it was captured in (``training`` is False on it and on every submodule).

    Everything is kept (unused buffers such as ``num_batches_tracked`` and torch.export's constants included);
    torch.export's per-call hooks, its ``train``/``eval`` overrides and input-constraint records are dropped:
    the ``_guards_fn`` call in the graph still checks input shapes. ``gm`` is consumed (its containers are reused).
    """
    if isinstance(gm, GraphoptModule):
        return gm
    new = GraphoptModule({}, fx.Graph(), class_name=type(gm).__name__)
    fresh = set(new.__dict__)
    for key, value in gm.__dict__.items():
        if "hook" in key and key in fresh or key in ("_graph", "train", "eval", "validate_inputs",
                                                      "range_constraints", "shape_env"):
            continue
        new.__dict__[key] = value  # _modules, _parameters, _buffers, training, meta, constants, ...
    new.graph = gm.graph  # installs the graph and generates forward on the new module's class
    for module in new.modules():  # only the flags: the nodes already compute eval mode
        module.training = False
    return new


def sync_graph_mode(gm: fx.GraphModule) -> None:
    """Rewrite ``gm``'s mode-dependent nodes to match ``gm.training`` (only its own flag; submodules keep theirs)."""
    if set_graph_mode(gm, gm.training):
        gm.recompile()


def set_graph_mode(gm: fx.GraphModule, training: bool) -> bool:
    """Rewrite the BatchNorm, InstanceNorm, dropout and RNN nodes of ``gm``'s graph to run as in train
    (``training=True``) or eval mode; returns whether anything changed (the caller recompiles)."""
    changed = False
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _FLAGS:
            want = training or (node.target in _NORMS and _arg(node, 3) is None)
            changed |= _set_flag(node, *_FLAGS[node.target], want)
        elif training and node.target is _NO_TRAINING:
            x, w, b, mean, var, momentum, eps = node.args[:7]
            node.target, node.args = _LEGIT, (x, w, b, mean, var, True, momentum, eps)
            changed = True
        elif not training and node.target is _LEGIT and node.args[5] is True:
            x, w, b, mean, var, _, momentum, eps = node.args[:8]
            node.target, node.args = _NO_TRAINING, (x, w, b, mean, var, momentum, eps)
            changed = True
        if node.target in _BATCH_NORMS:
            changed |= _count_batches(gm, node, training)
    if training:
        _warn_fixed_statistics(graph)
    return changed


def _arg(node: fx.Node, index: int, name: str | None = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name) if name else None


def _set_flag(node: fx.Node, index: int, name: str, value: bool) -> bool:
    if len(node.args) > index:
        if node.args[index] is value:
            return False
        node.update_arg(index, value)
    elif node.kwargs.get(name, not value) is not value:
        node.update_kwarg(name, value)
    else:
        return False
    return True


def _counter_of(gm: fx.GraphModule, norm: fx.Node) -> str | None:
    """``<bn>.num_batches_tracked`` when the norm reads ``<bn>.running_mean`` and that counter buffer exists."""
    mean = norm.args[3] if len(norm.args) > 3 else None
    if not (isinstance(mean, fx.Node) and mean.op == "get_attr" and mean.target.endswith("running_mean")):
        return None
    target = mean.target[: -len("running_mean")] + _COUNTER
    owner, _, leaf = target.rpartition(".")
    try:
        return target if isinstance(gm.get_submodule(owner)._buffers.get(leaf), torch.Tensor) else None
    except AttributeError:
        return None


def _is_count(node: fx.Node) -> bool:
    counter = node.args[0] if node.args else None
    return (node.op == "call_function" and node.target is aten.add_.Tensor and node.args[1:] == (1,)
            and isinstance(counter, fx.Node) and counter.op == "get_attr" and counter.target.endswith(_COUNTER))


def _count_batches(gm: fx.GraphModule, norm: fx.Node, training: bool) -> bool:
    """Eager BatchNorm adds 1 to ``num_batches_tracked`` on every train-mode call: an ``add_`` node right before
    the norm in train mode, none in eval mode. Returns whether the graph changed."""
    count = norm.prev if _is_count(norm.prev) else None
    target = _counter_of(gm, norm)
    if not training or target is None or not _arg(norm, 5, "training"):
        if count is None:
            return False
        counter = count.args[0]
        gm.graph.erase_node(count)
        if not counter.users and counter.next is norm:  # the get_attr train mode put there, not export's own
            gm.graph.erase_node(counter)
        return True
    if count is not None:
        return False
    with gm.graph.inserting_before(norm):
        counter = gm.graph.get_attr(target)
        gm.graph.call_function(aten.add_.Tensor, (counter, 1))
    return True


def _warn_fixed_statistics(graph: fx.Graph) -> None:
    """A momentum of 0 is what BatchNorm(momentum=None) was captured with: its statistics will not move."""
    fixed = [n.name for n in graph.nodes if n.op == "call_function" and n.target in _BATCH_NORMS
             and _arg(n, 3) is not None and _arg(n, 5, "training") is True and _arg(n, 6, "momentum") == 0.0]
    if fixed:
        warnings.warn(f"train mode: BatchNorm node(s) {fixed[:3]} have momentum 0, so their running statistics stay "
                      "as they are; eager BatchNorm(momentum=None) would update a cumulative average. Give the "
                      "model's BatchNorm a momentum before graphopt.optimize to train the statistics",
                      GraphoptWarning, stacklevel=4)


@contextlib.contextmanager
def modes_kept(module: nn.Module, training: bool | None = None) -> Iterator[nn.Module]:
    """Run the block with ``module`` switched to ``training`` (None: as it is), then put every submodule back
    in the mode it had (``module.train(previous)`` alone would overwrite submodules' own modes)."""
    before = {m: m.training for m in module.modules()}
    if training is not None:
        module.train(training)
    try:
        yield module
    finally:
        for m, mode in before.items():
            m.training = mode
        for m in before:
            if isinstance(m, GraphoptModule):
                sync_graph_mode(m)
