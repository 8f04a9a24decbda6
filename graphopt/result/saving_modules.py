"""Submodules a saved graph may call that graphopt rebuilds from data: a codec per class (config <-> module).

Passes sometimes leave ``call_module`` nodes: fake-quant's ``FakeQuantize`` quantizers and the ``QatBatchNorm`` of
QAT. Their code is graphopt's, so a saved file needs only their settings (a JSON config) and their tensors (from
the state dict) to rebuild them on load. Register a codec for your own module class with
``register_module_codec``; any other called submodule is opaque and comes from ``load(path, model=...)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch.nn as nn

ToConfig = Callable[[nn.Module], dict]
FromConfig = Callable[[dict], nn.Module]
_CODECS: dict[str, tuple[type, ToConfig, FromConfig]] = {}


def class_key(cls: type) -> str:
    """The qualified name a module class is saved under."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_module_codec(cls: type[nn.Module], to_config: ToConfig, from_config: FromConfig) -> None:
    """Let graphopt.save store ``cls`` instances as ``to_config(module)`` (JSON-ready) plus their state dict, and
    graphopt.load rebuild them with ``from_config(config)`` followed by ``load_state_dict``."""
    _CODECS[class_key(cls)] = (cls, to_config, from_config)


def encode_module(module: nn.Module) -> dict:
    """What the saved file records about a called submodule: its class, its config if it has a codec, its mode."""
    _register_builtin()
    key = class_key(type(module))
    codec = _CODECS.get(key)
    entry: dict[str, Any] = {"class": key, "training": module.training}
    if codec is not None and type(module) is codec[0]:
        entry["config"] = codec[1](module)
    return entry


def decode_module(entry: dict) -> nn.Module | None:
    """A fresh module from its saved entry (tensors not yet loaded), or None if its class has no codec."""
    _register_builtin()
    codec = _CODECS.get(entry["class"])
    if codec is None or "config" not in entry:
        return None
    return codec[2](entry["config"])


def finish(module: nn.Module, entry: dict) -> None:
    """After the state dict is loaded: restore the train/eval mode and any derived state."""
    module.train(entry["training"])
    if hasattr(module, "sync") and callable(module.sync):  # FakeQuantize keeps per-tensor qparams as numbers
        module.sync()


def _register_builtin() -> None:
    if _CODECS:
        return
    try:
        from graphopt.quant.fold_bn import QatBatchNorm
        from graphopt.quant.quantizer import FakeQuantize, QuantSpec
    except ImportError:  # a graphopt without quantization
        return

    def quantizer_config(m: FakeQuantize) -> dict:
        if m.state == "observe":
            raise ValueError(f"the {m.role} quantizer of `{m.layer}` is not calibrated yet")
        return {"spec": dataclasses.asdict(m.spec), "role": m.role, "layer": m.layer, "state": m.state,
                "learnable": m.learnable}

    def quantizer(config: dict) -> FakeQuantize:
        m = FakeQuantize(QuantSpec(**config["spec"]), config["role"], config["layer"])
        m.observer, m.state = None, config["state"]
        if config["learnable"]:
            m.make_learnable()
        return m

    register_module_codec(FakeQuantize, quantizer_config, quantizer)
    register_module_codec(QatBatchNorm, lambda m: {"momentum": m.momentum, "eps": m.eps},
                          lambda c: QatBatchNorm(c["momentum"], c["eps"]))
