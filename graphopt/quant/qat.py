"""Quantization-aware training of a fake-quantized graph, and the conversion back to an export-ready graph.

The fake-quant pass returns a GraphoptModule (``trainable``; its ``.train()``/``.eval()`` switch the graph's
BatchNorm and dropout nodes, see graph/module.py) whose BatchNorms, with ``qat=True``, are ``QatBatchNorm`` modules
following ``.train()``/``.eval()``, conv+BN pairs in the simulated-fold form (fold_bn.py), and quantizers that use
the straight-through estimator in training mode. So QAT is ordinary training::

    gm = graphopt.optimize(model, "fake-quant:qat=true", x, calib_data=batches).module
    prepare_qat(gm, learnable_scales=True)      # optional: LSQ scales
    gm.train(); ...optimizer steps...; gm.eval()
    deployable = convert(gm)                     # BN folded with the final statistics, ready for export_onnx
"""

from __future__ import annotations

import copy

import torch.fx as fx

from graphopt.graph.module import GraphoptModule
from graphopt.quant.fold_bn import fold_simulated
from graphopt.quant.quantizer import quantizers


def trainable(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphoptModule running a copy of the graph on the same submodules, whose ``.train()`` works."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(out[0])
    graph._codegen = gm.graph._codegen  # same pytree input/output handling: called exactly like the model
    new = GraphoptModule(gm, graph, class_name="QuantizedGraphModule")
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    new.meta.update(gm.meta)
    new.eval()
    return new


def prepare_qat(gm: fx.GraphModule, *, learnable_scales: bool = False) -> fx.GraphModule:
    """Make the calibrated graph's scales learnable (LSQ) if asked; returns ``gm`` (changed in place).

    Weight scales follow the weights while training (per-channel min-max of the current weight); activation
    scales stay as calibrated unless ``learnable_scales``.
    """
    qs = quantizers(gm)
    not_ready = [name for name, q in qs.items() if not q.calibrated]
    if not_ready:
        from graphopt.errors import InputError

        raise InputError(f"prepare_qat needs a calibrated graph; quantizer {not_ready[0]} has no scale yet")
    if learnable_scales:
        for q in qs.values():
            q.make_learnable()
    return gm


def convert(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the (trained) graph in its deployable form: eval mode, every simulated conv+BN fold replaced by
    the folded conv, learned scales copied to the constants the exporter reads."""
    out = copy.deepcopy(gm)
    out.eval()
    fold_simulated(out)
    for q in quantizers(out).values():
        q.learnable = False
        q.sync()
    out.graph.lint()
    out.recompile()
    return out


def is_converted(gm: fx.GraphModule) -> bool:
    """True if no simulated fold is left (the graph is ready to export)."""
    from graphopt.quant.fold_bn import unscale_output

    return not any(n.op == "call_function" and n.target is unscale_output for n in gm.graph.nodes)
