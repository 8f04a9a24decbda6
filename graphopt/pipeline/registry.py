"""Pass registry: names to pass classes, and the string form ``"fuse,prune-channels:ratio=0.5,round_to=8"``."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import typing
from typing import Any

from graphopt.errors import PipelineError
from graphopt.pipeline.pass_base import Pass

_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a Pass subclass available by its ``name`` (in strings, the CLI and ``optimize``)."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise PipelineError(f"@register_pass expects a subclass of graphopt.Pass, got {cls!r}")
    if not cls.name:
        raise PipelineError(f"pass class {cls.__name__} needs a class-level name, e.g. name: ClassVar[str] = 'my-pass'")
    known = _REGISTRY.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise PipelineError(f"pass name '{cls.name}' is taken by {known.__module__}.{known.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name, sorted."""
    return dict(sorted(_REGISTRY.items()))


def pass_options(cls: type[Pass]) -> dict[str, Any]:
    """A pass's options (its dataclass fields) with their defaults."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = dataclasses.MISSING
    return out


def get_pass_class(name: str) -> type[Pass]:
    """The pass class registered under ``name``; PipelineError with suggestions if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise PipelineError(
            f"unknown pass '{name}'{hint} Registered passes: {', '.join(sorted(_REGISTRY))}. "
            "Register your own with @graphopt.register_pass."
        ) from None


def resolve_pass(spec: Pass | str) -> Pass:
    """A Pass object from an object (returned as is) or a string ``"name:opt=value,opt=value"``."""
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, type) and issubclass(spec, Pass):
        return spec()
    if not isinstance(spec, str):
        raise PipelineError(f"a pass must be a Pass object or a string like 'fuse', got {type(spec).__name__}")
    name, _, opts = spec.partition(":")
    return _instantiate(get_pass_class(name.strip()), _split_top(opts) if opts.strip() else [])


def parse_pipeline(text: str) -> list[Pass]:
    """Passes from ``"fuse,prune-channels:ratio=0.5,round_to=8,dce"``: a ``key=value`` item belongs to the pass
    before it; brackets group lists (``ignore=[fc,head]``)."""
    specs: list[str] = []
    for item in _split_top(text):
        if "=" in item and ":" not in item.split("=", 1)[0]:
            if not specs:
                raise PipelineError(f"option '{item}' comes before any pass name in '{text}'")
            specs[-1] += ("," if ":" in specs[-1] else ":") + item
        else:
            specs.append(item)
    return [resolve_pass(s) for s in specs]


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        items.append(cur.strip())
    return [i for i in items if i]


def _instantiate(cls: type[Pass], items: list[str]) -> Pass:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in fields:
            raise PipelineError(
                f"pass '{cls.name}' has no option '{key}'; its options are: "
                f"{', '.join(sorted(fields)) or 'none'} (write them as name:option=value)"
            )
        kwargs[key] = _coerce(raw.strip(), hints.get(key))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"bad options for pass '{cls.name}': {e}") from e


def _coerce(raw: str, hint: Any) -> Any:
    """Turn option text into a Python value guided by the field's type: numbers, bools, lists, or the string."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if raw.startswith("[") and raw.endswith("]"):
        return tuple(_coerce(x, None) for x in _split_top(raw[1:-1]))
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw
    if hint is float and isinstance(value, int):
        return float(value)
    if hint is str:
        return raw
    return value
