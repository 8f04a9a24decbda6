"""What ``make demo`` runs: train a small CNN on the digits, compress it step by step, export it, verify it.

Steps: train DigitsNet (graphopt/examples/digits.py) -> sweep the pruning ratio (accuracy with and without a short
fine-tune) -> fuse + prune 50% of channels -> fine-tune (distilling from the original) -> remove one residual
block -> fine-tune -> int8 fake quantization calibrated on training batches, then a short QAT -> ONNX export of
every stage, checked in onnxruntime. Prints a before/after table and writes plots and files to ``out``.
Needs scikit-learn (its bundled digits data) and matplotlib for the plots (both in graphopt's dev extra).
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import graphopt
import graphopt.quant
from graphopt.examples.digits import DigitsNet, accuracy, load_digits_tensors
from graphopt.pipeline.metrics import count_macs, count_params, fixed_threads, paired_latency
from graphopt.pipeline.report import _human
from graphopt.training.loop import unfreeze

FULL = dict(train=10, sweep=(0.25, 0.5, 0.75), sweep_ft=4, ft_prune=10, ft_block=4, qat=2, calib=8)
QUICK = dict(train=3, sweep=(0.5,), sweep_ft=1, ft_prune=5, ft_block=2, qat=1, calib=2)  # 2 epochs left the
# pruned net at 25% with fresh dependency versions, where int8 torch and onnxruntime disagree on many borderline digits


@dataclass
class Stage:
    """One row of the table: a model after some steps and what it measures."""

    name: str
    module: nn.Module
    accuracy: float
    params: int = 0
    macs: int = 0
    onnx_bytes: int = 0
    ort_accuracy: float | None = None
    torch_ms: float = 0.0
    ort_ms: float = 0.0
    quantized: bool = False


def run_demo(quick: bool = False, out: str | Path = "demo_out", repeats: int = 50, threads: int = 1) -> int:
    """Run the whole demo (``quick``: fewer epochs and sweep points); returns 0 if every check passed."""
    start, cfg, out = time.perf_counter(), QUICK if quick else FULL, Path(out)
    _START[0] = start
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch-internal deprecation
    out.mkdir(parents=True, exist_ok=True)
    with fixed_threads(threads):
        torch.manual_seed(0)
        data = load_digits_tensors()
        x_train, y_train, x_test, y_test = data
        example = (x_test[:2],)
        say(f"training DigitsNet on {len(x_train)} digits ({x_train.shape[-1]}x{x_train.shape[-1]}) for {cfg['train']} epochs")
        model = DigitsNet()
        graphopt.finetune(model, (x_train, y_train), epochs=cfg["train"], lr=1e-2)
        model.eval()
        stages = [Stage("original (fp32)", model, accuracy(model, x_test, y_test))]
        sweep = _sweep(model, data, cfg, example)
        stages += _compress(model, data, cfg, example)
        missing = [s for s in ("remove-layers", "fake-quant") if s not in graphopt.registered_passes()]
        ok = _measure(stages, out, example, x_test, y_test, repeats, threads)
        final = stages[-1]
        graphopt.save(graphopt.optimize(final.module, [], example), out / "digits_final.graphopt", model=None)
        _plots(out, stages, sweep)
    print()
    print(table(stages))
    print("torch ms: eager graphs after graphopt.export.streamline, batch 1; the int8 row runs the simulated (fake-quant) "
          "graph in torch, the real int8 kernels only in onnxruntime")
    print(f"\nplots: {out / 'accuracy_vs_ratio.png'}, {out / 'channels_per_layer.png'}; "
          f"ONNX files and the saved final model in {out}/")
    if missing:
        print(f"not run (pass not registered in this graphopt): {', '.join(missing)}")
    print(f"demo finished in {time.perf_counter() - start:.0f} s ({threads} thread{'s' * (threads > 1)})")
    return 0 if ok and not missing else 1


_START = [time.perf_counter()]


def say(text: str) -> None:
    """A progress line of the demo, with the seconds since it started."""
    print(f"[demo {time.perf_counter() - _START[0]:5.1f}s] {text}", flush=True)


def _sweep(model, data, cfg, example) -> dict:
    """Accuracy after pruning each ratio of channels, straight away and after a short fine-tune."""
    x_train, y_train, x_test, y_test = data
    say(f"sweeping the pruning ratio over {', '.join(map(str, cfg['sweep']))}")
    raw, tuned = [], []
    for ratio in cfg["sweep"]:
        gm = unfreeze(graphopt.optimize(model, f"fuse,prune-channels:ratio={ratio}", example).module)
        raw.append(accuracy(gm, x_test, y_test))
        graphopt.finetune(gm, (x_train, y_train), epochs=cfg["sweep_ft"], lr=3e-3, teacher=model, seed=1)
        tuned.append(accuracy(gm, x_test, y_test))
    return {"ratios": list(cfg["sweep"]), "no fine-tune": raw, f"fine-tuned {cfg['sweep_ft']} epochs": tuned}


def _compress(model, data, cfg, example) -> list[Stage]:
    """fuse + prune 50% -> fine-tune -> remove a block -> fine-tune -> int8 fake-quant + QAT."""
    x_train, y_train, x_test, y_test = data
    calib = [(x_train[i:i + 64],) for i in range(0, 64 * cfg["calib"], 64)]
    registered = graphopt.registered_passes()
    say("fuse + prune 50% of channels, then fine-tune with distillation from the original")
    gm = unfreeze(graphopt.optimize(model, "fuse,prune-channels:ratio=0.5", example).module)  # fuse leaves
    # its folded weights with requires_grad=False: the demo trains them all
    graphopt.finetune(gm, (x_train, y_train), epochs=cfg["ft_prune"], lr=3e-3, teacher=model, seed=2)
    stages = [Stage("fused + pruned 50%, fine-tuned", gm, accuracy(gm, x_test, y_test))]
    if "remove-layers" in registered:
        say("remove the least influential residual block, then fine-tune")
        res = graphopt.optimize(gm, "remove-layers:n=1", example, calib_data=calib)
        gm = unfreeze(res.module)
        graphopt.finetune(gm, (x_train, y_train), epochs=cfg["ft_block"], lr=3e-3, teacher=model, seed=3)
        removed = str(res.report.records[-1].stats.get("removed", "a block")).split(" ")[0]
        stages.append(Stage(f"block {removed} removed, fine-tuned", gm, accuracy(gm, x_test, y_test)))
    else:
        say("SKIPPED removing a block: the remove-layers pass is not registered in this graphopt")
    if "fake-quant" in registered:
        say(f"int8 fake quantization calibrated on {len(calib)} batches, then {cfg['qat']} epoch(s) of QAT")
        gm = unfreeze(graphopt.optimize(gm, "fake-quant", example, calib_data=calib).module)
        graphopt.finetune(gm, (x_train, y_train), epochs=cfg["qat"], lr=1e-4, teacher=model, seed=4)
        gm = graphopt.quant.convert(gm)  # the deployable form: eval mode, frozen scales
        stages.append(Stage("int8 (fake-quant + QAT)", gm, accuracy(gm, x_test, y_test), quantized=True))
    else:
        say("SKIPPED int8 quantization: the fake-quant pass is not registered in this graphopt")
    return stages


def _measure(stages: list[Stage], out: Path, example, x_test, y_test, repeats: int, threads: int) -> bool:
    """Sizes, ONNX export + onnxruntime accuracy and latency of every stage, torch latency interleaved."""
    from graphopt.export.onnx_verify import ort_session

    one = x_test[:1]
    ok = True
    for i, s in enumerate(stages):
        say(f"exporting '{s.name}' to ONNX and checking it in onnxruntime")
        s.params, s.macs = count_params(s.module), count_macs(s.module, example)
        report = graphopt.export_onnx(s.module, example, out / f"stage{i}.onnx")  # int8 stage: QDQ, int8 weights
        s.onnx_bytes = report.file_bytes
        session = ort_session(str(out / f"stage{i}.onnx"), threads=threads)  # one live session at a time
        name = session.get_inputs()[0].name
        logits = session.run(None, {name: x_test.numpy()})[0]
        s.ort_accuracy = float((torch.from_numpy(logits).argmax(1) == y_test).float().mean())
        ok &= abs(s.ort_accuracy - s.accuracy) <= 0.01
        s.ort_ms = _ort_latency(session, name, one.numpy(), repeats)
        del session
    say(f"timing torch eager (lowered graphs), batch 1, {repeats} interleaved rounds")
    lowered = {s.name: _lowered(s.module, example) for s in stages}
    lat = paired_latency({k: (lambda m=m: m(one)) for k, m in lowered.items()}, repeats=repeats, threads=threads)
    for s in stages:
        s.torch_ms = lat[s.name].median_ms
    return ok


def _lowered(module: nn.Module, example) -> nn.Module:
    try:
        return graphopt.streamline(module, example)
    except Exception:  # a module streamline() does not handle is timed as it is
        return module


def _ort_latency(session, name: str, x, repeats: int) -> float:
    for _ in range(3):
        session.run(None, {name: x})
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, {name: x})
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e3


def table(stages: list[Stage]) -> str:
    """The before/after table as markdown."""
    lines = ["| stage | accuracy (torch) | accuracy (onnxruntime) | params | MACs | ONNX file | torch ms | ORT ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in stages:
        ort = "-" if s.ort_accuracy is None else f"{100 * s.ort_accuracy:.2f}%"
        lines.append(f"| {s.name} | {100 * s.accuracy:.2f}% | {ort} | {_human(s.params)} | {_human(s.macs)} | "
                     f"{s.onnx_bytes / 1024:.1f} KiB | {s.torch_ms:.3f} | {s.ort_ms:.3f} |")
    return "\n".join(lines)


def _plots(out: Path, stages: list[Stage], sweep: dict) -> None:
    from graphopt.util import plots

    curves = {k: v for k, v in sweep.items() if k != "ratios"}
    plots.accuracy_vs_ratio(sweep["ratios"], curves, stages[0].accuracy, out / "accuracy_vs_ratio.png")
    plots.channels_per_layer(stages[0].module, stages[-1].module, out / "channels_per_layer.png")
    (out / "table.md").write_text(table(stages) + "\n")
