"""The one pattern language for selecting layers (and blocks, and parameters) by qualified name.

A pattern is a shell-style wildcard (``fnmatch``, case-sensitive) matched against a dotted name, and it also
selects everything inside a module it names: ``head`` matches ``head`` and ``head.weight``; ``blocks.0`` matches
``blocks.0.conv1``; ``*.mlp.*`` matches every layer under any ``mlp``; ``layers.[0-3].*`` the first four layers.
Every pass option that selects layers reads patterns this way: ``ignore`` (prune-channels, low-rank, sparsify,
fake-quant: leave these layers alone), ``protect`` (remove-layers: blocks that stay), ``half`` (fake-quant: run
these in half precision), ``ratios`` (prune-channels: per-layer ratios). Some options add words of their own,
documented with the option (``last`` = the layers producing the model's outputs; ``first``).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable

__all__ = ["first_match", "matches", "matches_any", "unmatched"]


def matches(name: str, pattern: str) -> bool:
    """Whether ``pattern`` selects ``name``: the name itself, or a module the name is inside."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Whether any of ``patterns`` selects ``name``."""
    return any(matches(name, p) for p in patterns)


def first_match(name: str, pairs: Iterable[tuple[str, object]], default=None):
    """The value of the first ``(pattern, value)`` pair whose pattern selects ``name``, else ``default``."""
    return next((value for pattern, value in pairs if matches(name, pattern)), default)


def unmatched(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """The patterns that select none of ``names`` (a typo the option would otherwise ignore silently)."""
    names = list(names)
    return [p for p in patterns if not any(matches(n, p) for n in names)]
