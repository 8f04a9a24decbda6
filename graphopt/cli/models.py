"""What the ``graphopt`` command reads: the MODEL argument, ``--input-shape`` strings and data files.

MODEL is either ``package.module:factory`` (the user's own code: imported and called with no arguments, by
design) or a file written by ``graphopt.save`` (read as data only, see result/saving.py). Data files (calibration,
fine-tuning) are ``torch.save`` files of tensors, read with ``weights_only=True``.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from graphopt.errors import InputError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


def load_model(spec: str) -> tuple[nn.Module, bool]:
    """The model MODEL names, and whether it came from a saved graphopt file."""
    if Path(spec).is_file():
        from graphopt.result.saving import load

        return load(spec).module, True
    module_name, colon, factory_name = spec.partition(":")
    if not colon or not module_name or not factory_name:
        raise InputError(f"MODEL '{spec}' is neither a saved graphopt file nor 'package.module:factory'; "
                         "hint: write e.g. mypkg.models:build_resnet (a function returning an nn.Module)")
    if os.getcwd() not in sys.path and "" not in sys.path:  # like `python -m`: the user's project is importable
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"cannot import '{module_name}' for MODEL '{spec}': {e}; hint: run graphopt from the "
                         "directory that holds the package, or install it") from e
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        raise InputError(f"'{module_name}' has no function '{factory_name}' for MODEL '{spec}'; hint: name a "
                         "function or class that builds the model with no arguments")
    model = factory()
    if isinstance(model, tuple) and model and isinstance(model[0], nn.Module):
        model = model[0]  # factories that also return example inputs
    if not isinstance(model, nn.Module):
        raise InputError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval(), False


def parse_shapes(texts: list[str] | None, dtype: str) -> tuple[torch.Tensor, ...]:
    """Example inputs from ``["1,3,32,32", ...]`` (one per positional input): seeded random tensors."""
    if not texts:
        raise InputError("--input-shape is required for a model built from code; hint: --input-shape 1,3,224,224 "
                         "(repeat the option for several inputs)")
    if dtype not in _DTYPES:
        raise InputError(f"unknown --input-dtype '{dtype}'; choose one of {', '.join(_DTYPES)}")
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for text in texts:
        try:
            shape = tuple(int(s) for s in text.replace("x", ",").split(","))
        except ValueError:
            shape = ()
        if not shape or any(s <= 0 for s in shape):
            raise InputError(f"bad --input-shape '{text}': expected positive integers separated by commas, "
                             "like 1,3,224,224")
        dt = _DTYPES[dtype]
        inputs.append(torch.randn(shape, generator=gen).to(dt) if dt.is_floating_point
                      else torch.randint(0, 2, shape, generator=gen).to(dt))
    return tuple(inputs)


def inputs_of_saved(model: nn.Module) -> Any:
    """The example inputs stored with a loaded graphopt file (None for other modules)."""
    meta = getattr(model, "meta", None)
    return meta.get("graphopt_example_inputs") if isinstance(meta, dict) else None


def read_tensors(path: str, what: str) -> Any:
    """A ``torch.save`` file of tensors (or dicts/lists of them), read as data only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{what} file '{path}' does not exist") from None
    except Exception as e:
        raise InputError(f"{what} file '{path}' is not a torch.save file of tensors: {type(e).__name__}; "
                         "hint: torch.save(tensor_or_dict_of_tensors, path)") from e


def calibration_batches(spec: str | None, example: tuple[torch.Tensor, ...], batch: int = 8) -> list | None:
    """``--calib random:N`` (N random batches shaped like the inputs) or ``--calib FILE`` (a tensor of inputs)."""
    if spec is None:
        return None
    if spec.startswith("random:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            n = 0
        if n <= 0:
            raise InputError(f"bad --calib '{spec}': expected random:N with N > 0, or a torch.save file of inputs")
        gen = torch.Generator().manual_seed(1)
        return [tuple(_random_like(t, gen) for t in example) for _ in range(n)]
    data = read_tensors(spec, "--calib")
    if not isinstance(data, torch.Tensor):
        raise InputError(f"--calib file '{spec}' must hold one tensor of inputs (N, ...), got {type(data).__name__}")
    if data.dim() == 0 or not len(data):  # no batches: the passes would say calib_data is empty
        raise InputError(f"--calib file '{spec}' holds no inputs: expected a tensor (N, ...) with N > 0")
    return [(data[i:i + batch],) for i in range(0, len(data), batch)]


def _random_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random values shaped like ``t``: normal floats; integers (token ids, masks) within ``t``'s own range, so
    an embedding never sees an index it does not have."""
    if t.is_floating_point():
        return torch.randn(t.shape, generator=gen).to(t.dtype)
    low, high = (int(t.min()), int(t.max())) if t.numel() else (0, 1)
    return torch.randint(low, high + 1, t.shape, generator=gen).to(t.dtype)


def finetune_data(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``--finetune FILE``: a torch.save file of ``{"inputs": tensor, "targets": tensor}``."""
    data = read_tensors(path, "--finetune")
    if not (isinstance(data, dict) and isinstance(data.get("inputs"), torch.Tensor)
            and isinstance(data.get("targets"), torch.Tensor)):
        raise InputError(f"--finetune file '{path}' must hold {{'inputs': tensor, 'targets': tensor}}")
    return data["inputs"], data["targets"]
