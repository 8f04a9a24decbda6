"""onnxruntime CPU latency of fp32 vs int8 QDQ models from the fake-quant pass, file sizes, kernels, and accuracy.

For every zoo CNN and the small Hugging Face Bert: calibrate ``fake-quant`` on 4 random batches, export the float
model and the int8 model (both ``graphopt.export_onnx``), count the int8 kernels
onnxruntime actually runs (its optimized graph), and time both files at batch 1 and 8 with 2 threads: two sessions
with thread spinning off (an idle session then costs nothing), runs interleaved round by round, median per round,
median of the per-round ratios. On the digits CNN: float, PTQ and QAT (2 epochs) test accuracy.

    .venv/bin/python bench/quant.py [--rounds 15] [--models resnet_basic,hf_bert]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

import big_models  # noqa: E402
import graphopt  # noqa: E402
from benchkit import geomean, provenance, publish  # noqa: E402
from graphopt.export.onnx_verify import ort_session  # noqa: E402
from graphopt.export.onnx_verify import ort_kernel_counts  # noqa: E402
from graphopt.quant import sqnr_db  # noqa: E402
from models import CNN_NAMES, build  # noqa: E402
from util import outputs, rebatch  # noqa: E402

THREADS = 2


def session(path: str):
    """An onnxruntime session with THREADS threads and spinning off (an idle session then costs nothing)."""
    return ort_session(path, threads=THREADS)


def feeds(sess, inputs) -> dict:
    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, dict):
        return {n: inputs[n].numpy() for n in names}
    return {n: t.numpy() for n, t in zip(names, inputs)}


def paired_ms(paths: list[str], inputs, rounds: int, reps: int = 5) -> list[list[float]]:
    """Per file, the median ms of ``reps`` runs in each round; files alternate within every round."""
    sessions = [session(p) for p in paths]
    data = [feeds(s, inputs) for s in sessions]
    for s, d in zip(sessions, data):  # warm-up
        for _ in range(3):
            s.run(None, d)
    times = [[] for _ in paths]
    for r in range(rounds):
        order = range(len(paths)) if r % 2 == 0 else reversed(range(len(paths)))
        for i in order:
            runs = []
            for _ in range(reps):
                t = time.perf_counter()
                sessions[i].run(None, data[i])
                runs.append((time.perf_counter() - t) * 1e3)
            times[i].append(statistics.median(runs))
    del sessions
    return times


def bench_model(name: str, rounds: int, folder: Path, image_size: int | None = None) -> dict:
    if name in big_models.BUILDERS:  # ResNet-50 / MobileNetV2 at 224x224: real serving sizes
        model, example = big_models.build(name)
    else:
        case = build(name)
        model, example = case.model, case.example_inputs
        if image_size and isinstance(example, tuple):  # larger images: compute-bound like real CNN serving
            example = (torch.randn(2, 3, image_size, image_size),)
    calib = [rebatch(example, 8, seed=i) for i in range(4)]
    res = graphopt.optimize(model, "fake-quant", example, calib_data=calib)
    x = rebatch(example, 8, seed=99)
    row = {"model": name, "sqnr": sqnr_db(outputs(model, x), outputs(res.module, x))}
    fp32, int8 = str(folder / f"{name}.fp32.onnx"), str(folder / f"{name}.int8.onnx")
    f = graphopt.export_onnx(model, example, fp32, verify=False)
    q = graphopt.export_onnx(res.module, example, int8, min_sqnr=None)  # QDQ int8; SQNR reported, not gated
    row.update(fp32_bytes=f.file_bytes, int8_bytes=q.file_bytes, ort_sqnr=q.sqnr_db)
    kernels = ort_kernel_counts(int8, str(folder / f"{name}.int8.opt.onnx"), THREADS)
    row["qlinear"] = sum(v for k, v in kernels.items() if k.startswith("QLinear") or k.endswith("Integer")
                         or k == "MatMulIntegerToFloat")
    row["float_convs"] = sum(v for k, v in kernels.items() if k in ("Conv", "FusedConv", "NchwcConv", "MatMul",
                                                                    "Gemm", "FusedMatMul"))
    row["kernels"] = ", ".join(f"{k} {v}" for k, v in sorted(kernels.items()) if "QLinear" in k or "Integer" in k)
    for batch in (1, 8):
        inputs = rebatch(example, batch, seed=3)
        t_fp32, t_int8 = paired_ms([fp32, int8], inputs, rounds)
        ratios = [a / b for a, b in zip(t_fp32, t_int8)]
        row[f"b{batch}"] = (statistics.median(t_fp32), statistics.median(t_int8), statistics.median(ratios))
    return row


def digits_accuracy() -> dict:
    from digits import accuracy, train, trained_digits_cnn
    from graphopt.quant import convert, prepare_qat

    model, (x_train, y_train, x_test, y_test) = trained_digits_cnn()
    calib = [x_train[i:i + 128] for i in range(0, 512, 128)]
    ptq = graphopt.optimize(model, "fake-quant", x_test[:2], calib_data=calib).module
    qat = graphopt.optimize(model, "fake-quant:qat=true", x_test[:2], calib_data=calib).module
    prepare_qat(qat)
    qat.train()
    train(qat, x_train, y_train, epochs=2, lr=1e-3)
    qat.eval()
    return {"float": accuracy(model, x_test, y_test), "ptq": accuracy(ptq, x_test, y_test),
            "qat": accuracy(convert(qat), x_test, y_test)}


def report(rows: list[dict], digits: dict | None, rounds: int, image_size: int | None = None,
           note: str = "") -> str:
    size = f"{image_size}x{image_size}" if image_size else "32x32"
    if rows and all(r["model"] in big_models.BUILDERS for r in rows):
        size = "224x224 (bench/big_models.py)"
    lines = [provenance(
        f"int8 QDQ vs fp32 in onnxruntime (fake-quant pass), images {size}",
        f"- onnxruntime CPU, {THREADS} threads, spinning off; {rounds} interleaved rounds x 5 runs, median per round, "
        f"median of per-round ratios; models on {size} images (Bert: seq 8)",
        *([f"- note: {note}"] if note else []),
        "- SQNR: torch int8 simulation vs float on random inputs; ORT SQNR: onnxruntime int8 vs torch simulation",
        "- int8 kernels: ops onnxruntime runs in int8 after its QDQ fusions (its optimized graph); float: "
        "convs/matmuls it left in fp32",
    ), "", "| model | SQNR dB | ORT SQNR dB | fp32 KB | int8 KB | size ratio | int8 kernels | float convs/matmuls | "
       "b1 fp32 ms | b1 int8 ms | b1 speedup | b8 fp32 ms | b8 int8 ms | b8 speedup |",
       "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} |" + " |" * 12)
            continue
        b1, b8 = r["b1"], r["b8"]
        lines.append(
            f"| {r['model']} | {r['sqnr']:.1f} | {r['ort_sqnr']:.1f} | {r['fp32_bytes'] / 1e3:.0f} | "
            f"{r['int8_bytes'] / 1e3:.0f} | {r['fp32_bytes'] / r['int8_bytes']:.2f}x | {r['qlinear']} | "
            f"{r['float_convs']} | {b1[0]:.3f} | {b1[1]:.3f} | {b1[2]:.2f}x | {b8[0]:.3f} | {b8[1]:.3f} | "
            f"{b8[2]:.2f}x |")
    cnn = [r for r in rows if "error" not in r and r["model"] != "hf_bert"]
    if cnn:
        lines += ["", f"Geometric mean over {len(cnn)} conv nets: speedup b1 "
                  f"{geomean([r['b1'][2] for r in cnn]):.2f}x, b8 {geomean([r['b8'][2] for r in cnn]):.2f}x; "
                  f"file size {geomean([r['fp32_bytes'] / r['int8_bytes'] for r in cnn]):.2f}x smaller."]
    lines += ["", "Which kernels ran, per model:", ""]
    lines += [f"- {r['model']}: {r.get('kernels') or 'none'}" for r in rows if "error" not in r]
    if digits is None:
        return "\n".join(lines) + "\n"
    lines += ["", "## digits CNN (sklearn digits, test split)", "", "| model | accuracy | delta vs float |",
              "|---|---|---|"]
    for k in ("float", "ptq", "qat"):
        lines.append(f"| {k} | {digits[k] * 100:.2f}% | {(digits[k] - digits['float']) * 100:+.2f} points |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--models", default=",".join([*CNN_NAMES, "hf_bert"]))
    parser.add_argument("--out", default=str(ROOT / "bench/results/quant.md"))
    parser.add_argument("--image-size", type=int, default=None, help="image side for the CNNs (default: zoo's 32)")
    parser.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--note", default="", help="a line for the report, e.g. how loaded the machine was")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    warnings.simplefilter("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            try:
                rows.append(bench_model(name, args.rounds, Path(tmp), args.image_size))
            except Exception as e:  # a failing model is a result too
                rows.append({"model": name, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            print(rows[-1], file=sys.stderr, flush=True)
    text = report(rows, None if args.skip_digits else digits_accuracy(), args.rounds, args.image_size, args.note)
    if args.append and Path(args.out).exists():
        text = Path(args.out).read_text() + "\n" + text.replace("# int8 QDQ", "## int8 QDQ", 1)
    publish(text, args.out)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
