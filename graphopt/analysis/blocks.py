"""Find removable residual blocks in a canonical (ATen) graph and remove them.

A *branch* is one residual add ``y = x + f(x)``: ``f``'s nodes (its *body*) are used only inside the branch, so
replacing ``y`` by ``x`` (``f`` replaced by zero) and erasing the body leaves a valid graph. The add may be
written in place (``out += identity``: ``aten.add_``), and ``f`` may end in any scale (layer scale ``gamma * f``,
drop-path's keep-prob ``mul``/``div`` by a scalar): those nodes are read only by the branch, so they are its body. A *projection branch*
is ``y = f(x) + p(x)`` with a small projection ``p`` (a ResNet downsample): removing it keeps ``y = p(x)``, which
changes what the block computes more than an identity skip, so it is opt-in.

A *block* is the unit users name and passes remove: one branch (a ResNet block, ``layers.1``), or all branches of
one module (a transformer layer ``model.layers.3`` = attention + MLP branches). Each branch also has its own name
(``model.layers.3.self_attn``, ``model.layers.3.mlp``: the child module holding most of its parameters), used when
blocks are listed per branch (``unit="branch"``).

Names come from the qualified names of the parameters each body reads (``get_attr`` targets), which torch.export
keeps as the module paths of the original model.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt.graph.nodes import is_op, remove_dead_nodes, remove_unused_attrs, resolve
from graphopt.graph.shapes import shape_of

aten = torch.ops.aten
_PROJECTION_OPS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.linear)
# ``out += identity`` (torchvision's ResNet, ConvNeXt, MobileNetV3, EfficientNet) exports as ``add_``: the same sum,
# written into one operand. Either operand may be the one written: removing the branch replaces the add's value by
# the kept operand, and a kept operand that was written simply stays unwritten (its later readers read the add).
_ADDS = (aten.add, aten.add_)


@dataclass(frozen=True)
class Branch:
    """One residual add: ``add`` computes ``kept + body``; removing the branch makes ``add`` equal ``kept``.

    (For a plain shape-preserving layer, ``add`` is the layer's output node and ``kept`` its input.)"""

    add: fx.Node
    kept: fx.Node  # the value that replaces the add: x (identity skip) or the projection's output
    body: tuple[fx.Node, ...]  # nodes erased with the branch, in graph order
    params: tuple[str, ...]  # qualified names of the parameters only the body reads
    owner: str  # common module path of those parameters ("" at the root)
    projection: bool = False


@dataclass(frozen=True)
class Block:
    """A unit of removal: one or more consecutive branches of the same module."""

    name: str
    branches: tuple[Branch, ...]
    numel: int  # parameter elements removed with the block

    @property
    def input(self) -> fx.Node:
        """The value the block's output is replaced by (its input for an identity residual)."""
        return self.branches[0].kept

    @property
    def output(self) -> fx.Node:
        """The add that produces the block's output."""
        return self.branches[-1].add

    @property
    def projection(self) -> bool:
        """True if removing the block keeps a projection shortcut instead of the identity."""
        return any(b.projection for b in self.branches)


def _is_assert(node: fx.Node) -> bool:
    """Metadata asserts torch.export inserts (impure, no users): they die with the tensor they check."""
    return node.op == "call_function" and not node.users and "assert" in getattr(node.target, "__name__", "")


def _written(node: fx.Node) -> list:
    """The arguments an op writes to (in-place ``relu_``, ``out=``); empty for functional ops."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return []
    written = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            written.append(node.args[i] if i < len(node.args) else node.kwargs.get(arg.name))
    return written


def _body_of(value: fx.Node, add: fx.Node, order: dict[fx.Node, int]) -> set[fx.Node]:
    """Nodes that become dead once ``add`` stops reading ``value``: ``value`` and every ancestor used only by them.

    An in-place op (``relu_`` of ``nn.ReLU(inplace=True)``) belongs to the body only if what it writes does too;
    otherwise erasing it would change a value outside (such ops are excluded and the body recomputed)."""
    blocked: set[fx.Node] = set()
    while True:
        body = _dead_after(value, add, order, blocked)
        outside = {n for n in body if any(w not in body for w in _written(n))}
        if not outside:
            return body
        blocked |= outside


def _dead_after(value: fx.Node, add: fx.Node, order: dict, blocked: set) -> set[fx.Node]:
    body: set[fx.Node] = set()
    frontier = [value]
    while frontier:  # visit candidates from the latest back, so users are decided before the nodes they read
        frontier.sort(key=order.__getitem__)
        node = frontier.pop()
        if node in body or node in blocked or node.op in ("placeholder", "output", "call_module"):
            continue
        users = [u for u in node.users if not _is_assert(u)]
        if node is value:
            ok = all(u is add for u in users)
        else:
            ok = bool(users) and all(u in body for u in users)
        if ok:
            body.add(node)
            frontier.extend(n for n in node.all_input_nodes if n not in body)
    return body


def _inputs_of(body: set[fx.Node]) -> set[fx.Node]:
    """Non-parameter nodes outside ``body`` that ``body`` reads."""
    return {i for n in body for i in n.all_input_nodes if i not in body and i.op != "get_attr"}


def _params_of(gm: fx.GraphModule, body: set[fx.Node]) -> tuple[str, ...]:
    names = []
    for n in body:
        if n.op == "get_attr" and isinstance(resolve(gm, n.target), torch.Tensor):
            names.append(n.target)
    return tuple(sorted(set(names)))


def _common_module(params: tuple[str, ...]) -> str:
    parts = [p.split(".")[:-1] for p in params]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = shape_of(a), shape_of(b)
    return sa is not None and sa == sb


def _projection_only(gm: fx.GraphModule, body: set[fx.Node]) -> bool:
    """A shortcut body with exactly one 1x1 conv or linear (plus norms): what a downsample projection is."""
    layers = [n for n in body if is_op(n, *_PROJECTION_OPS)]
    if len(layers) != 1 or not isinstance(layers[0].args[1], fx.Node) or layers[0].args[1].op != "get_attr":
        return False
    weight = resolve(gm, layers[0].args[1].target)
    return weight.dim() == 2 or all(k == 1 for k in weight.shape[2:])


def _branch_at(gm: fx.GraphModule, add: fx.Node, order: dict, allow_projection: bool) -> Branch | None:
    """The residual branch ending at ``add``, or None if ``add`` is no removable residual add."""
    if not is_op(add, *_ADDS) or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    a, b = add.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b:
        return None
    for kept, value in ((a, b), (b, a)):
        body = _body_of(value, add, order)
        params = _params_of(gm, body)
        if params and _copied_from(kept) & _inputs_of(body) and _same_shape(kept, add):
            return _make_branch(gm, add, kept, body, params, projection=False)
    if not allow_projection:
        return None
    for kept, value in ((a, b), (b, a)):  # y = f(z) + p(z): keep the projection p(z)
        body, shortcut = _body_of(value, add, order), _body_of(kept, add, order)
        shared = _inputs_of(body) & _inputs_of(shortcut)
        if shared and _params_of(gm, body) and _projection_only(gm, shortcut) and _same_shape(kept, add):
            main_params = _params_of(gm, body)
            if sum(resolve(gm, p).numel() for p in main_params) > sum(
                    resolve(gm, p).numel() for p in _params_of(gm, shortcut)):
                return _make_branch(gm, add, kept, body, main_params, projection=True)
    return None


def _copied_from(node: fx.Node) -> set[fx.Node]:
    """``node`` and the values it is an unchanged copy of: ``x.clone(); x += f(x)`` keeps the copy, the branch reads
    the original, and it is the same residual."""
    chain = {node}
    while _passes_through(node) or (is_op(node, aten.clone) and isinstance(node.args[0], fx.Node)):
        node = node.args[0]
        chain.add(node)
    return chain


def _make_branch(gm, add, kept, body, params, projection) -> Branch:
    nodes = tuple(n for n in gm.graph.nodes if n in body)
    return Branch(add, kept, nodes, params, _common_module(params), projection)


def find_branches(gm: fx.GraphModule, allow_projection: bool = False) -> list[Branch]:
    """Every residual branch of ``gm`` in graph order (shapes must be recorded in ``node.meta``)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found = [_branch_at(gm, n, order, allow_projection) for n in gm.graph.nodes if is_op(n, *_ADDS)]
    branches = [b for b in found if b is not None]
    # a branch nested inside another's body (an add inside an attention block) is part of that block, not a block
    outer_bodies = set().union(*(set(b.body) for b in branches)) if branches else set()
    return [b for b in branches if b.add not in outer_bodies]


def _numel(gm: fx.GraphModule, params) -> int:
    """Parameter elements among ``params`` (buffers such as BN statistics are not counted, as in count_params)."""
    return sum(t.numel() for t in (resolve(gm, p) for p in set(params)) if isinstance(t, torch.nn.Parameter))


def layer_of(owner: str) -> str:
    """The repeated layer a module belongs to: its longest prefix ending in a list index (``model.layers.3``)."""
    parts = owner.split(".") if owner else []
    for k in range(len(parts), 0, -1):
        if parts[k - 1].isdigit():
            return ".".join(parts[:k])
    return owner


def _child_with_most_params(gm: fx.GraphModule, branch: Branch) -> str:
    """The child of the branch's owner holding most of its parameters (``...layers.3.mlp``)."""
    depth = len(branch.owner.split(".")) if branch.owner else 0
    per_child: Counter = Counter()
    for p in branch.params:
        parts = p.split(".")
        if len(parts) > depth + 1:
            per_child[".".join(parts[: depth + 1])] += resolve(gm, p).numel()
    if not per_child:
        return branch.owner or branch.add.name
    if branch.owner:
        return max(per_child, key=lambda c: (per_child[c], -branch.params.index(next(
            p for p in branch.params if p.startswith(c + ".")))))
    return "+".join(sorted(per_child, key=lambda c: min(i for i, p in enumerate(branch.params) if p.startswith(c))))


def find_blocks(gm: fx.GraphModule, unit: str = "layer", allow_projection: bool = False,
                plain: bool = False) -> list[Block]:
    """Removable blocks of ``gm`` in graph order: whole layers (``unit="layer"``) or single branches.

    A layer is every branch under one list entry (``model.layers.3``: attention and MLP). Branches outside any
    list are blocks of their own, named by their module. ``plain`` adds shape-preserving modules without a skip.
    """
    blocks = _residual_blocks(gm, unit, allow_projection)
    if not plain:
        return blocks
    taken = {n for b in blocks for br in b.branches for n in (*br.body, br.add)}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(blocks + find_plain_layers(gm, taken), key=lambda b: order[b.output])


def _residual_blocks(gm: fx.GraphModule, unit: str, allow_projection: bool) -> list[Block]:
    branches = find_branches(gm, allow_projection)
    per_layer: dict[str, list[Branch]] = defaultdict(list)
    for b in branches:
        per_layer[layer_of(b.owner)].append(b)
    if unit == "layer":
        blocks, seen = [], set()
        for b in branches:
            key = layer_of(b.owner)
            if key and key not in seen:
                seen.add(key)
                group = per_layer[key]
                blocks.append(Block(key, tuple(group), _numel(gm, [p for g in group for p in g.params])))
            elif not key:
                blocks.append(Block(_child_with_most_params(gm, b), (b,), _numel(gm, b.params)))
        return blocks
    owners = Counter(b.owner for b in branches)
    blocks = []
    for b in branches:
        shared = owners[b.owner] > 1 or (b.owner == layer_of(b.owner) and len(per_layer[b.owner]) > 1)
        name = b.owner if b.owner and not shared else _child_with_most_params(gm, b)
        blocks.append(Block(name, (b,), _numel(gm, b.params)))
    return blocks


def _module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values() if path]


def find_plain_layers(gm: fx.GraphModule, taken: set[fx.Node] = frozenset()) -> list[Block]:
    """Shape-preserving modules without a skip (``features.3`` = conv-BN-ReLU 32->32): one tensor in, one out, the
    same shape, a conv or linear with parameters, and nodes used only inside. Removing one replaces its output by its input. Only the
    outermost such module counts, and none whose nodes are in ``taken`` (residual blocks)."""
    members: dict[str, set[fx.Node]] = defaultdict(set)
    for n in gm.graph.nodes:
        if n.op == "call_function":
            for path in _module_paths(n):
                members[path].add(n)
    found: dict[str, Block] = {}
    for path in sorted(members, key=lambda p: p.count(".")):  # outer modules first
        if any(path.startswith(outer + ".") for outer in found):
            continue
        block = _plain_block(gm, path, members[path], taken)
        if block is not None:
            found[path] = block
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(found.values(), key=lambda b: order[b.output])


def _plain_block(gm: fx.GraphModule, path: str, nodes: set[fx.Node], taken) -> Block | None:
    if nodes & taken:
        return None
    attrs = {i for n in nodes for i in n.all_input_nodes if i.op == "get_attr" and len(i.users) == 1}
    body = nodes | attrs
    inputs = {i for i in _inputs_of(body) if shape_of(i) is not None}  # tensors; sizes (sym ints) aside
    exits = [n for n in nodes if any(u not in body and not _is_assert(u) for u in n.users)]
    params = _params_of(gm, body)
    computes = any(is_op(n, *_PROJECTION_OPS) for n in nodes)  # a conv or linear, not a lone norm
    if len(inputs) != 1 or len(exits) != 1 or not params or not computes or any(_written(n) for n in nodes):
        return None
    (x,), (y,) = inputs, exits
    if not _same_shape(x, y):
        return None
    ordered = tuple(n for n in gm.graph.nodes if n in body and n is not y)
    branch = Branch(y, x, ordered, params, path)
    return Block(path, (branch,), _numel(gm, params))


def scope_of(node: fx.Node) -> str:
    """The innermost module path whose forward produced ``node`` ("" at the root or when unknown)."""
    paths = _module_paths(node)
    return paths[-1] if paths else ""


def removal_record(gm: fx.GraphModule, block: Block) -> dict:
    """What the write-back (``to_model``) needs to know of a removed block.

    ``own_output``: the block's module returns ``x + f(x)`` itself (a ResNet block without a post-add op, an HF
    decoder layer), so the whole module can go. Otherwise ``zero`` lists the outermost modules all of whose nodes
    are in the removed bodies (they compute only the branch; their output becomes zeros), and ``plain`` says the
    block was a plain layer (replaced by its input)."""
    name = block.name
    within = lambda path: path == name or path.startswith(name + ".")  # noqa: E731
    plain = any(not is_op(br.add, *_ADDS) for br in block.branches)
    last = block.branches[-1].add
    own = (not plain and not block.projection and all(within(scope_of(br.add)) for br in block.branches)
           and not any(within(scope_of(u)) for u in last.users if not _is_assert(u)))
    body = {n for br in block.branches for n in br.body}
    return {"name": name, "own_output": own, "plain": plain, "zero": [] if own or plain else _modules_inside(gm, body)}


def _passes_through(node: fx.Node) -> bool:
    """A conversion that converts nothing (an RMSNorm's ``x.to(float32)`` of a float32 x, also read by the
    residual): it belongs to no branch, so it does not keep its module out of the removed ones."""
    name = getattr(node.target, "__name__", "")
    x = node.args[0] if node.args else None
    if name.split(".")[0] not in ("to", "_to_copy", "alias", "contiguous", "detach") or not isinstance(x, fx.Node):
        return False
    a, b = x.meta.get("tensor_meta"), node.meta.get("tensor_meta")
    return hasattr(a, "dtype") and hasattr(b, "dtype") and a.dtype == b.dtype and a.shape == b.shape


def _modules_inside(gm: fx.GraphModule, body: set[fx.Node]) -> list[str]:
    """The outermost module paths whose every node lies in ``body``."""
    outside: set[str] = set()
    inside: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and not _is_assert(node) and not (node not in body and _passes_through(node)):
            (inside if node in body else outside).update(_module_paths(node))
    full = sorted(inside - outside, key=lambda p: p.count("."))
    outer: list[str] = []
    for path in full:
        if not any(path.startswith(o + ".") for o in outer):
            outer.append(path)
    return outer


def remove_blocks(gm: fx.GraphModule, blocks: list[Block]) -> None:
    """Replace each block's output by its kept input, erase the bodies, then drop dead nodes and parameters.

    Each removal is recorded in ``gm.meta["graphopt_removed_blocks"]`` (see ``removal_record``)."""
    gm.meta.setdefault("graphopt_removed_blocks", []).extend(removal_record(gm, b) for b in blocks)
    erase: set[fx.Node] = set()
    for block in blocks:
        for br in block.branches:
            erase.update(br.body)
            erase.add(br.add)
    for block in blocks:
        for br in reversed(block.branches):
            kept = br.kept
            while kept in erase:  # the kept value was itself removed (nested windows): follow the chain
                kept = _kept_of(kept, blocks)
            kept = _unwritten(gm, kept, br.add, erase)
            for user in list(br.add.users):
                if user not in erase and not _is_assert(user):
                    user.replace_input_with(br.add, kept)
    doomed = erase | {u for n in erase for u in n.users if _is_assert(u)}
    for node in reversed(list(gm.graph.nodes)):
        if node in doomed:
            for user in list(node.users):  # only doomed users remain; erase them first (reverse order does)
                assert user in doomed, f"{user} still reads {node}"
            gm.graph.erase_node(node)
    remove_dead_nodes(gm)
    remove_unused_attrs(gm)
    gm.recompile()


def writes_into(node: fx.Node) -> bool:
    """True if a user of ``node`` writes into it in place (``relu_`` of ``nn.ReLU(inplace=True)`` after an add)."""
    return any(node in _written(u) for u in node.users)


def _unwritten(gm: fx.GraphModule, kept: fx.Node, add: fx.Node, erase: set[fx.Node]) -> fx.Node:
    """``kept``, or a copy of it where the add's users write into it in place while something else still reads
    ``kept`` (a DenseNet-style concat of the block's input, or a graph input): the copy keeps those readers'
    value, which the add's fresh tensor used to."""
    readers = [u for u in kept.users if u not in erase and u is not add and not _is_assert(u)]
    if not writes_into(add) or not (readers or kept.op == "placeholder"):
        return kept
    with gm.graph.inserting_before(add):
        copy = gm.graph.call_function(aten.clone.default, (kept,))
    copy.meta.update({k: v for k, v in kept.meta.items() if k in ("val", "tensor_meta")})
    return copy


def _kept_of(add: fx.Node, blocks: list[Block]) -> fx.Node:
    for block in blocks:
        for br in block.branches:
            if br.add is add:
                return br.kept
    raise AssertionError(f"{add} is erased but belongs to no removed branch")
