"""Weight-quantized Hugging Face models through ``save_pretrained`` / ``from_pretrained``.

The checkpoint format: every quantized layer ``<path>`` (a ``QuantLinear`` / ``QuantPointwiseConv``) stores its
packed tensors ``<path>.qweight`` (uint8), ``<path>.scales`` (float32), ``<path>.zeros`` (uint8; empty when
symmetric) and ``<path>.bias`` (a packed embedding table, ``QuantEmbedding``, the same but no bias) (graphopt/kernels/quant_format.py has the layout), and ``config.json`` gets a
``quantization_config`` with ``quant_method: "graphopt"``, a format version, and per layer its bits, group size,
activation block, in/out features and module kind. Everything else is the model's own.

``from_pretrained`` reads it through a Hugging Face quantizer that graphopt registers (``register()``): before the
weights load, the listed layers of the freshly built model become QuantLinear shells of the right shapes, and the
checkpoint fills them. The registration happens when ``to_model()`` returns a quantized HF model, when
``graphopt`` is imported after ``transformers``, and in ``load_pretrained``; without it transformers would not
know the method and would fill the layers with random weights, so load such checkpoints with
``graphopt.load_pretrained(path)`` (or call ``graphopt.result.hf_quant.register()`` first).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

FORMAT_VERSION = 1
METHOD = "graphopt"

__all__ = ["FORMAT_VERSION", "describe", "load_pretrained", "mark_quantized", "register"]


def describe(model: nn.Module) -> dict[str, dict]:
    """{layer path: its settings} of every graphopt quantized module in ``model``."""
    from graphopt.kernels.modules import QuantLinear, QuantPointwiseConv
    from graphopt.kernels.quant_embedding import QuantEmbedding

    layers = {}
    for path, module in model.named_modules():
        if isinstance(module, QuantEmbedding):
            layers[path] = dict(kind="embedding", bits=module.bits, group_size=module.group_size,
                                in_features=module.embedding_dim, out_features=module.num_embeddings,
                                symmetric=module.zeros.numel() == 0)
        elif isinstance(module, QuantLinear):
            layers[path] = dict(kind="conv1x1" if isinstance(module, QuantPointwiseConv) else "linear",
                                bits=module.bits, group_size=module.group_size, act_group=module.act_group,
                                in_features=module.in_features, out_features=module.out_features,
                                symmetric=module.zeros.numel() == 0, bias=module.bias is not None,
                                threads=module.threads)
    return layers


def mark_quantized(model: nn.Module) -> bool:
    """Give an HF model holding quantized layers the ``quantization_config`` its checkpoint needs; False (nothing
    done) for other models."""
    layers = describe(model)
    config = getattr(model, "config", None)
    if not layers or config is None or not hasattr(config, "to_dict"):
        return False
    config_cls, _ = register()
    config.quantization_config = config_cls(layers=layers)
    return True


def _shell(settings: dict) -> nn.Module:
    """A QuantLinear of the right shapes and dtypes whose tensors the checkpoint then fills."""
    from graphopt.kernels.modules import QuantLinear, QuantPointwiseConv
    from graphopt.kernels.quant_format import TILE

    n, k, g = settings["out_features"], settings["in_features"], settings["group_size"]
    kp = -(-k // g) * g
    tiles = -(-n // TILE)
    per_chunk = 4 if settings["bits"] == 8 else 8
    qweight = torch.zeros(tiles, kp // per_chunk, 64, dtype=torch.uint8)
    scales = torch.zeros(tiles, kp // g, TILE)
    zeros = (torch.zeros(0, dtype=torch.uint8) if settings["symmetric"]
             else torch.zeros(tiles, kp // g, TILE, dtype=torch.uint8))
    if settings["kind"] == "embedding":
        from graphopt.kernels.quant_embedding import QuantEmbedding

        return QuantEmbedding(qweight, scales, zeros, settings["bits"], g, n, k)
    bias = torch.zeros(n) if settings["bias"] else None
    cls = QuantPointwiseConv if settings["kind"] == "conv1x1" else QuantLinear
    return cls(qweight, scales, zeros, bias, settings["bits"], g, settings["act_group"], k, n,
               settings.get("threads", 1))


@functools.lru_cache(maxsize=None)
def register() -> tuple[type, type]:
    """Register graphopt's quantization config and quantizer with transformers (once); returns both classes."""
    from transformers.quantizers.auto import register_quantization_config, register_quantizer
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    @register_quantization_config(METHOD)
    class GraphoptQuantConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of a graphopt weight-quantized checkpoint (see the module docstring)."""

        def __init__(self, layers: dict | None = None, format_version: int = FORMAT_VERSION, **kwargs: Any):
            self.quant_method = METHOD
            self.layers = dict(layers or {})
            self.format_version = format_version
            if format_version > FORMAT_VERSION:
                raise ValueError(f"this checkpoint uses graphopt quantization format {format_version}; this "
                                 f"graphopt reads up to {FORMAT_VERSION}: upgrade graphopt")

    @register_quantizer(METHOD)
    class GraphoptHfQuantizer(HfQuantizer):
        """Loads graphopt weight-quantized checkpoints: the listed layers become QuantLinear before loading."""

        requires_calibration = True  # only checkpoints graphopt wrote; it never quantizes while loading

        def validate_environment(self, *args, **kwargs) -> None:
            """Nothing to check: the kernels build on first use and fall back to torch."""

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            """Never: the checkpoint holds the codes already."""
            return False

        def _process_model_before_weight_loading(self, model, **kwargs):
            for path, settings in self.quantization_config.layers.items():
                parent, _, leaf = path.rpartition(".")
                owner = model.get_submodule(parent) if parent else model
                old = getattr(owner, leaf)
                device = next(iter(old.parameters()), torch.empty(0)).device
                setattr(owner, leaf, _shell(settings).to(device))
            return model

        def is_serializable(self, *args, **kwargs) -> bool:
            """The packed buffers save as ordinary tensors."""
            return True

        @property
        def is_trainable(self) -> bool:
            """The float layers and biases train; the codes are buffers."""
            return True

    return GraphoptQuantConfig, GraphoptHfQuantizer


def load_pretrained(path, model_class=None, **kwargs) -> nn.Module:
    """``from_pretrained`` of a graphopt weight-quantized checkpoint (the class from ``config.architectures`` when
    ``model_class`` is None); any other checkpoint loads as it would without graphopt."""
    import transformers

    register()
    if model_class is None:
        config = transformers.AutoConfig.from_pretrained(path)
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0]) if names else transformers.AutoModel
    return model_class.from_pretrained(path, **kwargs)
