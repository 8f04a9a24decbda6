"""DependencyGraph: the analysis that groups coupled channels of a canonical graph into ChannelGroups."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch.fx as fx

import graphopt.analysis.dependency.rules_elementwise  # noqa: F401  (registers rules)
import graphopt.analysis.dependency.rules_layers  # noqa: F401
import graphopt.analysis.dependency.rules_index  # noqa: F401
import graphopt.analysis.dependency.rules_moe  # noqa: F401
import graphopt.analysis.dependency.rules_shape  # noqa: F401
import graphopt.analysis.dependency.rules_windows  # noqa: F401
from graphopt.analysis.dependency.keys import TensorKeys
from graphopt.analysis.dependency.walk import Walk, param_keys, rule_for, value_keys
from graphopt.graph.nodes import resolve

_SKIP_MODULES = ("_guards_fn",)
RULE_HELP = "a dependency rule for the op would free them (README, 'Which channels move together')"


@dataclass
class Member:
    """Where a group's channels live in one parameter: rows ``rows`` of dim ``dim`` belong to channel ``channel``."""

    param: str
    dim: int
    rows: np.ndarray  # indices along ``dim``
    channel: np.ndarray  # for each entry of ``rows``, the index of its channel in the group


@dataclass(eq=False)  # identity semantics: groups are plan keys
class ChannelGroup:
    """Channels that must be pruned together: removing channel i removes every member row mapped to i."""

    index: int
    primes: list[int]
    members: list[Member]
    frozen: dict[int, str]  # channel index -> why it cannot be removed
    labels: list[str] = field(default_factory=list)  # the atoms (tensor dims) the group spans, for reports

    @property
    def size(self) -> int:
        """Number of channels in the group."""
        return len(self.primes)

    @property
    def prunable(self) -> np.ndarray:
        """Indices of channels that may be removed."""
        return np.array([i for i in range(self.size) if i not in self.frozen], dtype=np.int64)

    def params(self) -> list[str]:
        """Qualified names of the parameters and buffers the group touches."""
        return sorted({m.param for m in self.members})

    def __repr__(self) -> str:
        return (f"ChannelGroup({self.index}: {self.size} channels, {len(self.prunable)} prunable, "
                f"params={self.params()[:4]}{'...' if len(self.params()) > 4 else ''})")


class DependencyGraph:
    """Analysis of a canonical graph: ``groups`` of coupled channels, ``frozen_reasons`` for what cannot move."""

    def __init__(self, gm: fx.GraphModule, ctx=None):
        self.gm = gm
        self.walk = Walk(gm)
        self.params: dict[str, TensorKeys] = {}
        self.unknown_ops: dict[str, str] = {}
        self._kinds: dict[int, set[str]] | None = None
        self._by_tensor: dict[int, TensorKeys] = {}
        self._matrices: dict[int, tuple[list, np.ndarray | list]] = {}
        self._roots: tuple[np.ndarray, np.ndarray] | None = None
        self._run()
        self.groups = self._build_groups()

    def _run(self) -> None:
        w = self.walk
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                w.values[node] = value_keys(w, node, node.name, frozen=f"model input `{node.name}`")
            elif node.op == "get_attr":
                w.values[node] = self._param(node)
            elif node.op == "output":
                for arg in _flat_nodes(node.args):
                    w.freeze_value(w.keys(arg), "model output")
            elif node.op == "call_module" and node.target in _SKIP_MODULES:
                continue
            else:
                w.values[node] = self._apply(node)
        self._freeze_outer_axes()
        for name, tk in self.params.items():  # dims no rule bound: nothing says they may shrink
            for d, dim in enumerate(tk.dims if tk is not None else []):
                if dim is None:
                    w.freeze_keys(w.dk(tk, d), f"`{name}` dim {d} is not used by any op with a rule")

    def _param(self, node: fx.Node) -> TensorKeys | None:
        """Keys of a get_attr value; names aliasing one tensor (tied weights) share them."""
        if node.target not in self.params:
            value = resolve(self.gm, node.target)
            shared = self._by_tensor.get(id(value))
            self.params[node.target] = shared if shared is not None else param_keys(self.gm, node)
            if value is not None:
                self._by_tensor[id(value)] = self.params[node.target]
        return self.params[node.target]

    def _freeze_outer_axes(self) -> None:
        """Outer axes of split dims (the 2 halves of a channel shuffle, GroupNorm-style groups) stay whole:
        removing one drops a whole slice of every tensor the dim reaches. Attention heads are the exception, and so
        are the channels of ops that define their rows as (channel x position) blocks (col2im, pixel_shuffle),
        which rules tag "channels"."""
        space = self.walk.space
        heads = {p for keys, kind in self.walk.tags if kind in ("heads", "channels") for k in keys
                 for p in space.normalize(k)}
        for atom_index in space.outer_axes:
            atom = space.atoms[atom_index]
            for element in range(atom.start, atom.start + atom.size):
                primes = [p for p in space.normalize((element,)) if p not in heads]
                space.freeze(tuple(primes), f"outer axis of the reshape at {atom.label.split('/')[0]}")

    def _apply(self, node: fx.Node):
        w = self.walk
        rule = rule_for(node) if node.op == "call_function" else None
        if rule is not None:
            try:
                value = rule.propagate(w, node)
            except Exception as e:  # a rule that cannot handle this form of its op freezes, never crashes
                return self._freeze_op(node, f"the dependency rule for {node.target} failed at node `{node.name}` "
                                             f"({type(e).__name__}: {e}): {RULE_HELP}")
            if _sizes_match(value, node.meta.get("tensor_meta")):
                return value
            return self._freeze_op(node, f"the dependency rule for {node.target} at node `{node.name}` gave keys "
                                         f"that do not match the recorded shape: {RULE_HELP}")
        what = node.target if node.op == "call_function" else f"module `{node.target}`"
        return self._freeze_op(node, f"no dependency rule for {what} at node `{node.name}`: {RULE_HELP}")

    def _freeze_op(self, node: fx.Node, reason: str):
        """Freeze what an op the walk cannot analyse touches; the reason is weak (see ElementSpace.weak)."""
        w = self.walk
        self.unknown_ops[node.name] = reason
        w.space.weak.add(reason)
        for arg in _flat_nodes((node.args, node.kwargs)):
            w.freeze_value(w.keys(arg), reason)
        return value_keys(w, node, node.name, frozen=reason)

    def blocking_ops(self) -> dict[str, tuple[str, int]]:
        """The unanalysed ops (``unknown_ops``) that really keep channels whole: {node name: (reason, channels of
        groups frozen by it alone)}. An op on integer, mask or position tensors, or whose channels something else
        freezes anyway, is not listed: a rule for it would free nothing."""
        counts = self.frozen_reasons()
        return {name: (reason, counts[reason]) for name, reason in self.unknown_ops.items() if counts.get(reason)}

    def _build_groups(self) -> list[ChannelGroup]:
        """Groups = connected atoms; each parameter row joins the group of every prime in its key (vectorized)."""
        space = self.walk.space
        graph = nx.Graph()
        graph.add_nodes_from(range(len(space.atoms)))
        graph.add_edges_from(space.links)
        component = np.zeros(len(space.atoms), dtype=np.int64)
        for i, comp in enumerate(nx.connected_components(graph)):
            component[list(comp)] = i
        slots, rows, primes, owners = [], [], [], []
        seen: set[int] = set()
        for name, tk in self.params.items():
            if tk is None or id(tk) in seen:  # an alias of a tensor already listed
                continue
            seen.add(id(tk))
            for d, keys in enumerate(tk.dims):
                r, p = self._rows_and_primes(keys)
                slots.append((name, d))
                rows.append(r)
                primes.append(p)
                owners.append(np.full(len(r), len(slots) - 1, dtype=np.int64))
        if not slots:
            return []
        rows, primes, owners = np.concatenate(rows), np.concatenate(primes), np.concatenate(owners)
        comp = component[np.asarray(space.atom_of, dtype=np.int64)[primes]]
        order = np.argsort(comp, kind="stable")
        bounds = np.flatnonzero(np.diff(comp[order])) + 1
        return [self._group(i, slots, rows[idx], primes[idx], owners[idx])
                for i, idx in enumerate(np.split(order, bounds))]

    def _rows_and_primes(self, keys: list) -> tuple[np.ndarray, np.ndarray]:
        """For each (row, prime) pair of a dim: the row index and the prime, flattened."""
        matrix = self.key_matrix(keys)
        if isinstance(matrix, np.ndarray):
            return np.repeat(np.arange(matrix.shape[0]), matrix.shape[1]), matrix.ravel()
        pairs = [(r, p) for r, key in enumerate(matrix) for p in key]
        return np.array([r for r, _ in pairs], dtype=np.int64), np.array([p for _, p in pairs], dtype=np.int64)

    def _group(self, index: int, slots, rows: np.ndarray, primes: np.ndarray, owners: np.ndarray) -> ChannelGroup:
        space = self.walk.space
        unique, channel = np.unique(primes, return_inverse=True)
        members = []
        for owner in np.unique(owners):
            mask = owners == owner
            name, d = slots[owner]
            members.append(Member(name, d, rows[mask], channel[mask]))
        plist = unique.tolist()
        frozen = {i: space.frozen[p] for i, p in enumerate(plist) if p in space.frozen}
        labels = sorted({space.atoms[space.atom_of[p]].label for p in plist[:64]})
        return ChannelGroup(index, plist, members, frozen, labels)

    def group_kind(self, group: ChannelGroup) -> str:
        """'heads' or 'head_dim' for attention groups, 'channels' for everything else."""
        if self._kinds is None:
            space, self._kinds = self.walk.space, {}
            for keys, kind in self.walk.tags:
                for key in keys:
                    for p in space.normalize(key):
                        self._kinds.setdefault(p, set()).add(kind)
        kinds = set().union(*(self._kinds.get(p, set()) for p in group.primes))
        return "heads" if "heads" in kinds else "head_dim" if "head_dim" in kinds else "channels"

    def key_matrix(self, keys: list) -> np.ndarray | list:
        """A dim's keys normalized to primes: an (n, width) int array, or a list of tuples if widths differ.
        Cached per dim (normalization is final once the analysis is done)."""
        cached = self._matrices.get(id(keys))
        if cached is None or cached[0] is not keys:
            cached = self._matrices[id(keys)] = (keys, self._normalized(keys))
        return cached[1]

    def _normalized(self, keys: list) -> np.ndarray | list:
        roots, factored = self._root_table()
        if all(len(k) == 1 for k in keys):  # the common case: plain keys whose roots are primes
            ids = roots[np.fromiter((k[0] for k in keys), dtype=np.int64, count=len(keys))]
            if not factored.size or not np.isin(ids, factored).any():
                return ids.reshape(-1, 1)
        norm = [self.walk.space.normalize(k) for k in keys]
        widths = {len(k) for k in norm}
        return np.array(norm, dtype=np.int64).reshape(len(norm), -1) if len(widths) == 1 else norm

    def _root_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Every element's root (numpy pointer jumping) and the factored roots; computed once, after the walk."""
        if self._roots is None:
            parent = np.asarray(self.walk.space.parent, dtype=np.int64)
            while True:
                jumped = parent[parent]
                if np.array_equal(jumped, parent):
                    break
                parent = jumped
            self._roots = (parent, np.fromiter(self.walk.space.factor, dtype=np.int64))
        return self._roots

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        """Groups with at least one channel that may be removed."""
        return [g for g in self.groups if len(g.prunable)]

    def channel_params(self, group: ChannelGroup) -> np.ndarray:
        """For each channel of ``group``: how many parameter (and buffer) entries removing it would remove."""
        weight = np.zeros(group.size)
        for m in group.members:
            tk = self.params.get(m.param)
            if tk is not None:
                weight += np.bincount(m.channel, minlength=group.size) * (math.prod(tk.sizes) / tk.sizes[m.dim])
        return weight

    def frozen_reasons(self) -> dict[str, int]:
        """Why channels are frozen, with how many channels each reason froze."""
        counts: dict[str, int] = defaultdict(int)
        for g in self.groups:
            for reason in g.frozen.values():
                counts[reason] += 1
        return dict(counts)


def _sizes_match(value, meta) -> bool:
    """True if the keys a rule produced have the sizes the graph recorded (or there is nothing to compare)."""
    if meta is None or value is None:
        return True
    if isinstance(value, TensorKeys):
        # a parameter passed through unchanged (x.to(dtype) of a weight) may still have unbound (None) dims
        sizes = tuple(len(d) if d is not None else n for d, n in zip(value.dims, value.sizes))
        return hasattr(meta, "shape") and sizes == tuple(int(s) for s in meta.shape)
    if isinstance(value, (tuple, list)) and not hasattr(meta, "shape"):
        return len(value) == len(meta) and all(_sizes_match(v, m) for v, m in zip(value, meta))
    return False


def _flat_nodes(tree) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(tree, lambda n: found.append(n) or n)
    return found
