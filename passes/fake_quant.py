"""``fake-quant``: simulated int8 quantization, calibrated on user batches, trainable, exportable as ONNX QDQ.

Steps: fold BatchNorm into convs (PTQ), or rewrite conv+BN into the simulated fold (``qat=true``); read the
placement table (graphopt/quant/placement.py) to put quantizers on weights (int8 symmetric, per output channel)
and on activations (uint8 asymmetric per tensor by default: onnxruntime's U8S8 int8 kernels); run the graph over
``ctx.calib_data`` with observers on; freeze the scales; optionally rank layers by sensitivity and keep the most
sensitive ones in float (or bf16/fp16). The result is a GraphoptModule: ``.train()`` works, gradients
flow by the straight-through estimator, and ``graphopt.export_onnx`` writes it as QuantizeLinear /
DequantizeLinear ONNX with int8 weights.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from graphopt.errors import GraphoptWarning, PipelineError
from graphopt.pipeline.pass_base import Context, Pass, PassResult
from graphopt.graph.patterns import matches_any
from graphopt.quant import calibrate, fold_bn, placement, regions, sensitivity
from graphopt.quant.cpu_int8 import resolve_reduce_range
from graphopt.quant.insert import Scheme, check_dtypes, insert_quantizers
from graphopt.quant.observers import OBSERVERS
from graphopt.quant.qat import trainable
from graphopt.quant.quantizer import QuantSpec, quantizers
from graphopt.pipeline.registry import register_pass


@register_pass
@dataclass(frozen=True)
class FakeQuant(Pass):
    """Insert int8 quantize->dequantize simulation, calibrate it on ``calib_data``, freeze the scales."""

    name: ClassVar[str] = "fake-quant"
    activation_dtype: str = "uint8"  # "uint8" (onnxruntime U8S8) or "int8"
    activation_symmetric: bool = False
    per_channel: bool = True  # weights per output channel (else per tensor)
    observer: str = "minmax"  # activations: minmax, moving-average, percentile, mse
    weight_observer: str = "minmax"  # weights: minmax or mse
    percentile: float = 99.99
    ignore: tuple = ()  # layer name patterns kept in float; "last" = the layers producing the outputs
    skip: tuple = ()  # the old name of ignore (warns)
    qat: bool = False  # keep BatchNorm (simulated fold) so QAT updates its statistics
    keep_float: int = 0  # keep the k most sensitive layers in float
    min_layer_sqnr: float | None = None  # also keep layers whose one-layer SQNR (dB) is below this
    float_dtype: str = "float32"  # dtype of layers kept in float: float32, bfloat16, float16
    half: tuple = ()  # layer name patterns run in half_dtype instead of int8
    half_dtype: str = "bfloat16"
    sensitivity_batches: int = 4
    reduce_range: bool | str = "auto"  # 7-bit weights; auto: where this CPU's int8 kernels saturate (cpu_int8.py)

    def __post_init__(self):
        if self.activation_dtype not in ("uint8", "int8"):
            raise PipelineError(f"fake-quant: activation_dtype must be 'uint8' or 'int8', got '{self.activation_dtype}'")
        for opt in ("observer", "weight_observer"):
            if getattr(self, opt) not in OBSERVERS:
                raise PipelineError(f"fake-quant: {opt} must be one of {', '.join(OBSERVERS)}, got '{getattr(self, opt)}'")
        for opt in ("float_dtype", "half_dtype"):
            if getattr(self, opt) not in regions.HALF_DTYPES:
                raise PipelineError(f"fake-quant: {opt} must be one of {', '.join(regions.HALF_DTYPES)}, "
                                    f"got '{getattr(self, opt)}'")
        try:
            resolve_reduce_range(self.reduce_range)
        except ValueError as e:
            raise PipelineError(f"fake-quant: {e}") from None
        if not 50 < self.percentile <= 100 or self.keep_float < 0:
            raise PipelineError("fake-quant: percentile must be in (50, 100] and keep_float >= 0")
        for opt in ("ignore", "skip", "half"):
            value = getattr(self, opt)
            object.__setattr__(self, opt, (value,) if isinstance(value, str) else tuple(value))
        if self.skip:
            warnings.warn("fake-quant: the option `skip` is now called `ignore`, the name every pass uses for layers "
                          "it leaves alone; write fake-quant:ignore=[...]", GraphoptWarning, stacklevel=3)
            object.__setattr__(self, "ignore", self.ignore + self.skip)
            object.__setattr__(self, "skip", ())

    def scheme(self) -> Scheme:
        """The weight and activation specs these options describe."""
        act = QuantSpec(self.activation_dtype, self.activation_symmetric, None, self.observer, self.percentile)
        weight = QuantSpec("int8", True, 0, self.weight_observer, self.percentile,
                           reduce_range=resolve_reduce_range(self.reduce_range))
        return Scheme(weight, act, self.per_channel)

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        batches = calibrate.check_batches(ctx.calib_data, ctx.inputs)  # before anything changes
        check_dtypes(placement.plan(gm, self.ignore))
        if quantizers(gm):
            raise PipelineError("fake-quant: the graph is already fake-quantized; run the pass once")
        with warnings.catch_warnings():  # torch's own pytree spec warns while being deep-copied
            warnings.simplefilter("ignore", FutureWarning)
            gm = trainable(copy.deepcopy(gm))  # a fresh module: the graph before the pass stays as it was
        folded = [] if self.qat else fold_bn.fold_batch_norms(gm, ctx)
        plan = placement.plan(gm, self.ignore)
        owners = insert_quantizers(gm, plan, self.scheme())
        simulated = fold_bn.simulate_folding(gm) if self.qat else []
        trainable_bns = fold_bn.make_batch_norms_trainable(gm) if self.qat else 0
        gm.graph.lint()
        gm.recompile()
        calibrate.calibrate(gm, batches)
        stats = {"quantized_layers": len(owners), "weight_quantizers": sum(site.weight is not None for site in plan.sites),
                 "calib_batches": len(batches), "bn_folded": len(folded), "bn_simulated": len(simulated),
                 "qat_batch_norms": trainable_bns, "weight_bits": 7 if self.scheme().weight.reduce_range else 8,
                 "skipped": plan.skipped, "kept_float_ops": plan.kept_float}
        stats.update(self._mixed_precision(gm, plan, owners, batches))
        stats["activation_quantizers"] = sum(q.role == "activation" for q in quantizers(gm).values())
        gm.graph.lint()  # the manager does this too; a direct call of run() must also get a runnable module
        gm.recompile()
        return PassResult(gm, modified=True, stats=stats, decisions=self._decisions(plan, stats))

    def _decisions(self, plan, stats: dict) -> dict[str, str]:
        bits = stats["weight_bits"]
        out = {site.layer: f"int8 ({bits}-bit weights)" if site.weight is not None else "int8 inputs"
               for site in plan.sites}
        out.update({layer: "ignored (float)" for layer in plan.skipped})
        out.update({layer: f"{self.float_dtype} (sensitive)" for layer in stats["kept_float"]})
        out.update({layer: self.half_dtype for layer in stats["half_layers"]})
        return out

    def _mixed_precision(self, gm, plan, owners, batches) -> dict:
        ranking = []
        if self.keep_float or self.min_layer_sqnr is not None:
            ranking = sensitivity.rank_layers(gm, owners, batches[: self.sensitivity_batches])
        keep = sensitivity.choose_float(ranking, self.keep_float, self.min_layer_sqnr)
        half = [s.layer for s in plan.sites if matches_any(s.layer, self.half)]
        for site in plan.sites:
            if site.layer in keep or site.layer in half:
                regions.dequantize_layer(gm, site)
                dtype = self.half_dtype if site.layer in half else self.float_dtype
                if dtype != "float32":
                    regions.cast_layer(gm, site, regions.HALF_DTYPES[dtype])
        regions.remove_unused_quantizers(gm)
        out = {"kept_float": keep, "half_layers": half}
        if ranking:
            out["sensitivity"] = [(layer, round(s, 2)) for layer, s in ranking]
        return out


