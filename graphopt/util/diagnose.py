"""Find the part of a user's model at fault, so errors can name it instead of a frame deep inside torch."""

from __future__ import annotations

import contextlib
import linecache
import os
import traceback
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

_TORCH_DIR = os.path.dirname(torch.__file__)
_GRAPHOPT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIB_MARKERS = (os.sep + "site-packages" + os.sep + "torch" + os.sep, os.sep + "contextlib.py", os.sep + "functools.py")


@dataclass(frozen=True)
class Culprit:
    """Where in the user's model an exception was raised."""

    module_name: str | None  # qualified name in the model ('' for the root), None if unknown
    module_type: str | None
    location: str | None  # "file.py:42: `source line`"

    def describe(self) -> str:
        """Human text: "module `block.gate` (Gate) at model.py:42: `if x.sum() > 0:`"."""
        parts = []
        if self.module_name is not None:
            label = self.module_name or "<root>"
            parts.append(f"module `{label}` ({self.module_type})")
        if self.location:
            parts.append(f"at {self.location}")
        return " ".join(parts) or "an unknown place"


def _is_user_frame(filename: str) -> bool:
    if filename.startswith(_TORCH_DIR) or any(m in filename for m in _LIB_MARKERS):
        return False
    return not filename.startswith(os.path.join(_GRAPHOPT_DIR, "graphopt"))


def locate(exc: BaseException, model: nn.Module) -> Culprit:
    """The innermost user frame of ``exc``'s traceback and the model module whose code it was."""
    names = {id(m): n for n, m in model.named_modules()}
    module_name = module_type = location = None
    tb = exc.__traceback__
    while tb is not None:
        frame, lineno = tb.tb_frame, tb.tb_lineno
        filename = frame.f_code.co_filename
        if _is_user_frame(filename):
            line = linecache.getline(filename, lineno).strip()
            location = f"{os.path.basename(filename)}:{lineno}: `{line}`"
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in names:
                module_name, module_type = names[id(owner)], type(owner).__name__
        tb = tb.tb_next
    return Culprit(module_name, module_type, location)


@contextlib.contextmanager
def module_stack(model: nn.Module) -> Iterator[list[str]]:
    """Track which modules are running; after an exception, the list ends with the innermost one that failed."""
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def pre(mod, _args):
        stack.append(names.get(mod, type(mod).__name__))

    def post(mod, _args, _out):
        if stack:
            stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in names] + [m.register_forward_hook(post) for m in names]
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def short_reason(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, cut to ``limit`` characters."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."
