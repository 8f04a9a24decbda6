"""Channel elements: a union-find whose elements can also be factored into products of other elements.

Every index of every tensor dim the analysis sees is described by a *key*: a tuple of element ids. Ops couple
indices by *unifying* elements (a residual add makes channel i of both branches one element) or by *factoring* an
element into a product (a reshape that splits a 12-wide dim into 3 heads x 4 makes index 5 the pair (head 1, dim 1)).
Elements that are roots of their class and not factored are *primes*: the units pruning removes. An index of a dim
is removed exactly when one of the primes in its (normalized) key is removed, so products prune as rectangles:
whole heads, or the same head_dim index in every head.

A prime can be *frozen* with a reason (model inputs and outputs, ops without a rule): it is never removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Key = tuple[int, ...]


@dataclass
class Atom:
    """A block of elements allocated together: one dim of one tensor or parameter, e.g. a conv's output channels."""

    index: int
    start: int
    size: int
    label: str


@dataclass
class ElementSpace:
    """Union-find over element ids with per-root factorization, freezing, and atom bookkeeping."""

    parent: list[int] = field(default_factory=list)
    atom_of: list[int] = field(default_factory=list)
    atoms: list[Atom] = field(default_factory=list)
    factor: dict[int, Key] = field(default_factory=dict)
    frozen: dict[int, str] = field(default_factory=dict)
    links: list[tuple[int, int]] = field(default_factory=list)  # atom pairs coupled by a union (for grouping)
    outer_axes: list[int] = field(default_factory=list)  # atoms made for the outer axes of a split dim
    # reasons that yield to any other: an op the walk could not analyse freezes what it touches, but a channel that
    # something else (a model input or output, a kernel window) freezes too keeps that other reason, so the op is
    # only blamed for channels it alone keeps (registering a rule for it would free exactly those)
    weak: set[str] = field(default_factory=set)

    def new(self, size: int, label: str, frozen: str | None = None) -> np.ndarray:
        """Allocate ``size`` fresh elements as one atom; returns their keys as an (size, 1) array."""
        atom = Atom(len(self.atoms), len(self.parent), size, label)
        self.atoms.append(atom)
        ids = np.arange(atom.start, atom.start + size, dtype=np.int64)
        self.parent.extend(ids.tolist())
        self.atom_of.extend([atom.index] * size)
        if frozen:
            for i in ids.tolist():
                self.frozen[i] = frozen
        return ids.reshape(size, 1)

    def find(self, x: int) -> int:
        """The root of ``x``'s class (with path halving)."""
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def normalize(self, key) -> Key:
        """A key as a tuple of primes: roots, with factored roots expanded recursively."""
        out: list[int] = []
        for x in key:
            r = self.find(int(x))
            f = self.factor.get(r)
            out.extend(self.normalize(f) if f is not None else (r,))
        return tuple(out)

    def union(self, x: int, y: int) -> None:
        """Make two elements one (their factorizations unify too; a width mismatch freezes both)."""
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self._union_roots(rx, ry)

    def _union_roots(self, rx: int, ry: int) -> None:
        self.links.append((self.atom_of[rx], self.atom_of[ry]))
        fx, fy = self.factor.get(rx), self.factor.get(ry)
        if fx is None and fy is not None:  # keep the factored root on top
            rx, ry, fx, fy = ry, rx, fy, fx
        self.parent[ry] = rx
        reason = self.frozen.pop(ry, None)
        if fy is not None:
            del self.factor[ry]
            self.unify_keys(fx, fy, "conflicting reshapes of one dim")
        if reason:
            self.freeze((rx,), reason)

    def set_factor(self, x: int, parts: Key) -> None:
        """Declare element ``x`` (a prime) the product of ``parts``; its freezing moves to the parts."""
        r = self.find(x)
        self.factor[r] = tuple(parts)
        reason = self.frozen.pop(r, None)  # no atom links: the parts of a product prune independently
        if reason:
            self.freeze(parts, reason)

    def unify_keys(self, a, b, reason: str) -> None:
        """Make two index keys the same index: prime by prime, factoring a lone prime if widths differ."""
        if len(a) == 1 and len(b) == 1:  # the common case (a residual add of plain channels): skip normalizing
            ra, rb = self.find(int(a[0])), self.find(int(b[0]))
            if ra == rb:
                return
            if ra not in self.factor and rb not in self.factor:
                self._union_roots(ra, rb)
                return
        pa, pb = self.normalize(a), self.normalize(b)
        if len(pa) == len(pb):
            for x, y in zip(pa, pb):
                self.union(x, y)
        elif len(pa) == 1 and pa[0] not in pb:
            self.set_factor(pa[0], pb)
        elif len(pb) == 1 and pb[0] not in pa:
            self.set_factor(pb[0], pa)
        else:
            self.freeze(pa + pb, reason)

    def unify_many(self, a: list, b: list, reason: str) -> None:
        """``unify_keys`` pairwise over two equally long key lists; plain one-element keys take an inlined path
        (a ResNet-50 walk unifies ~16k channel pairs at residual adds, where call overhead dominated)."""
        parent, factor = self.parent, self.factor
        for x, y in zip(a, b):
            if x == y:
                continue
            if len(x) != 1 or len(y) != 1:
                self.unify_keys(x, y, reason)
                continue
            rx, ry = x[0], y[0]
            while parent[rx] != rx:
                parent[rx] = parent[parent[rx]]
                rx = parent[rx]
            while parent[ry] != ry:
                parent[ry] = parent[parent[ry]]
                ry = parent[ry]
            if rx == ry:
                continue
            if rx in factor or ry in factor:
                self.unify_keys(x, y, reason)
            else:
                self._union_roots(rx, ry)

    def freeze(self, key, reason: str) -> None:
        """No prime of ``key`` may ever be removed (the first reason stays, unless it is weak and this one not)."""
        frozen, weak = self.frozen, self.weak
        for p in self.normalize(key):
            old = frozen.get(p)
            if old is None or (old in weak and reason not in weak):
                frozen[p] = reason

    def is_prime(self, x: int) -> bool:
        """True for a root that is not factored."""
        return self.find(x) == x and x not in self.factor
