"""The work behind ``graphopt optimize`` and ``graphopt inspect`` (argument parsing lives in cli/entry.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from graphopt.util import distributed
from graphopt.cli.distributed import per_rank, rank_path
from graphopt.cli.models import (
    calibration_batches, finetune_data, inputs_of_saved, load_model, parse_shapes,
)
from graphopt.errors import InputError
from graphopt.graph.inputs import ExampleInputs
from graphopt.pipeline.metrics import count_macs, count_params, model_bytes
from graphopt.pipeline.report import _human


def step(text: str) -> None:
    """One line of progress for a long step, on stderr (stdout stays the result); rank 0's only."""
    if distributed.rank() != 0:
        return
    print(f"graphopt: {text}", file=sys.stderr, flush=True)


def model_and_inputs(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, bool]:
    """The MODEL argument built or loaded, its example inputs, and whether it came from a saved file."""
    step(f"loading {args.model}")
    model, saved = load_model(args.model)
    if args.input_shape:
        inputs = parse_shapes(args.input_shape, args.input_dtype)
    elif saved:
        inputs = inputs_of_saved(model)
    else:
        inputs = parse_shapes(None, args.input_dtype)
    return model, inputs, saved


def cmd_optimize(args: argparse.Namespace) -> int:
    """Optimize MODEL with --passes; write model.graphopt, model.onnx, report.md and report.json into --out."""
    import graphopt
    from graphopt.training.loop import finetune, unfreeze

    model, inputs, saved = model_and_inputs(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ex = ExampleInputs.of(inputs)
    calib = calibration_batches(rank_path(args.calib), tuple(ex.args))
    if calib is not None and not per_rank(args.calib):
        calib = distributed.shard(calib)
    if distributed.active():
        step(f"{distributed.world_size()} ranks: statistics and fine-tuning gradients are combined over all")
    step(f"optimizing with passes: {args.passes or '(none)'}")
    result = graphopt.optimize(model, args.passes or [], inputs, calib_data=calib)
    if args.finetune:
        data = finetune_data(rank_path(args.finetune))
        data = data if per_rank(args.finetune) else tuple(distributed.shard(t) for t in data)
        step(f"fine-tuning for {args.epochs} epochs{' with distillation' if args.distill else ''}")
        unfreeze(result.module)  # rewritten weights (fuse) may come back with requires_grad=False
        losses = finetune(result.module, data, epochs=args.epochs, lr=args.lr,
                          teacher=model if args.distill else None)
        step("fine-tune loss per epoch: " + ", ".join(f"{v:.4f}" for v in losses))
    if distributed.rank() != 0:
        return 0  # every rank holds the same model now; rank 0 writes it
    summary = _summary(model, result.module, inputs)
    saved_path = graphopt.save(result, out / "model.graphopt", model=None if saved else model, example_inputs=inputs)
    step(f"wrote {saved_path}")
    onnx = None
    if not args.no_onnx:
        step("exporting ONNX and checking it with onnxruntime")
        onnx = _export(result.module, inputs, out / "model.onnx", args.opset)
    if not saved:
        _save_pretrained(result, model, out / HF_DIR)
    _write_reports(out, args, result, summary, onnx)
    print(result.report)
    print()
    print(_summary_table(summary))
    if onnx is not None:
        print()
        print(onnx)
    print(f"\nwrote {', '.join(str(out / n) for n in _written(onnx, out))}")
    return 0


def _export(module, inputs, path: Path, opset: int | None):
    """ONNX export (QDQ with int8 weight initializers for a fake-quant graph: export_onnx picks the format)."""
    import graphopt

    return graphopt.export_onnx(module, inputs, path, opset=opset)


def _summary(before: torch.nn.Module, after: torch.nn.Module, inputs: Any) -> dict:
    return {
        "params": [count_params(before), count_params(after)],
        "macs": [count_macs(before, inputs), count_macs(after, inputs)],
        "bytes": [model_bytes(before), model_bytes(after)],
    }


def _summary_table(summary: dict) -> str:
    lines = ["| | original | optimized | ratio |", "|---|---:|---:|---:|"]
    for key, label in (("params", "parameters"), ("macs", "MACs"), ("bytes", "weight bytes")):
        a, b = summary[key]
        lines.append(f"| {label} | {_human(a)} | {_human(b)} | {b / a:.2f}x |" if a else f"| {label} | 0 | {b} | - |")
    return "\n".join(lines)


HF_DIR = "hf_model"


def _save_pretrained(result, model, path: Path) -> None:
    """A Hugging Face model also comes back as its own class: written with save_pretrained, loadable by
    AutoModel*.from_pretrained without graphopt. Where it cannot be written back, say why and go on."""
    from graphopt.errors import WritebackError
    from graphopt.result.hf_config import is_hf_model

    if not is_hf_model(model):
        return
    try:
        result.to_model().save_pretrained(path)
    except WritebackError as e:
        step(f"no {HF_DIR}/ written: {e}")
        return
    step(f"wrote {path} (save_pretrained; reload with transformers' from_pretrained)")


def _written(onnx, out: Path | None = None) -> list[str]:
    hf = [HF_DIR] if out is not None and (out / HF_DIR).is_dir() else []
    return ["model.graphopt", *(["model.onnx"] if onnx is not None else []), *hf, "report.md", "report.json"]


def _write_reports(out: Path, args: argparse.Namespace, result, summary: dict, onnx) -> None:
    onnx_dict = None if onnx is None else {k: getattr(onnx, k) for k in onnx.__dataclass_fields__}
    data = {"model": args.model, "passes": args.passes, "summary": summary, "report": result.report.to_dict(),
            "onnx": onnx_dict, "written": _written(onnx, out), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "report.json").write_text(json.dumps(data, indent=2, default=repr))
    md = [f"# graphopt report: {args.model}", "", f"passes: `{args.passes or '(none)'}`", "",
          _summary_table(summary), "", "```", str(result.report), "```"]
    if onnx is not None:
        md += ["", "```", str(onnx), "```"]
    decisions = result.report.decisions_markdown()
    if decisions:
        md += ["", "## Per-layer decisions", "", decisions]
    (out / "report.md").write_text("\n".join(md) + "\n")


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print MODEL's channel groups (frozen channels with reasons), removable blocks and per-layer sizes."""
    from graphopt.analysis.dependency import DependencyGraph
    from graphopt.capture.tracing import trace

    model, inputs, _ = model_and_inputs(args)
    step("tracing and analysing channel dependencies")
    gm = trace(model, inputs)
    dep = DependencyGraph(gm)
    print(f"{type(model).__name__}: captured with {gm.meta.get('graphopt_capture')}, "
          f"{_human(count_params(gm))} parameters, {_human(count_macs(gm, inputs))} MACs")
    _print_groups(dep)
    _print_blocks(gm)
    _print_layers(gm)
    return 0


def _print_groups(dep) -> None:
    print(f"\nchannel groups: {len(dep.groups)} ({len(dep.prunable_groups)} prunable)")
    frozen_groups: dict[str, list] = defaultdict(list)
    for g in dep.groups:
        reasons: dict[str, int] = defaultdict(int)
        for reason in g.frozen.values():
            reasons[reason] += 1
        if not len(g.prunable):  # wholly frozen (kernel windows, model inputs, ...): summarized by reason below
            frozen_groups[max(reasons, key=reasons.get) if reasons else "no prunable channel"].append(g)
            continue
        print(f"  #{g.index:<3d} {dep.group_kind(g):8s} {g.size:5d} channels, {len(g.prunable):5d} prunable: "
              f"{_names(g.params())}")
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3]:
            print(f"         {n} frozen: {reason}")
    if frozen_groups:
        print("frozen groups, by reason:")
        for reason, groups in sorted(frozen_groups.items(), key=lambda kv: -len(kv[1])):
            params = sorted({p for g in groups for p in g.params()})
            print(f"  {len(groups):3d} x {reason}: {_names(params)}")


def _names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" (+{len(names) - shown} more)" if len(names) > shown else "")


def _print_blocks(gm) -> None:
    try:
        from graphopt.analysis.blocks import find_blocks
    except ImportError:
        print("\nremovable blocks: (block analysis not available in this graphopt)")
        return
    blocks = find_blocks(gm)
    print(f"\nremovable blocks: {len(blocks)}")
    for b in blocks:
        print(f"  {b.name:30s} {_human(b.numel):>8s} parameters")


def _print_layers(gm) -> None:
    per_module: dict[str, list] = defaultdict(list)
    for name, p in gm.named_parameters():
        per_module[name.rpartition(".")[0] or "<root>"].append((name.rpartition(".")[2], tuple(p.shape), p.numel()))
    print(f"\nlayers: {len(per_module)}")
    width = max((len(m) for m in per_module), default=10)
    for module, params in per_module.items():
        shapes = ", ".join(f"{n} {list(s)}" for n, s, _ in params)
        print(f"  {module:{width}s} {_human(sum(n for *_, n in params)):>8s}  {shapes}")


def check_out_dir(path: str) -> None:
    """--out must be a directory (or not exist yet)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise InputError(f"--out '{path}' is a file; hint: give a directory for the model, ONNX file and reports")
