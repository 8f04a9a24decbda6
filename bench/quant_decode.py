"""End to end: batch-1 greedy decoding of an HF Llama (hidden 1024, 8 layers) with int4 / int8 weights on
graphopt's kernels against the fp32 model in eager mode, and the same int4 model exported to onnxruntime.

    .venv/bin/python bench/quant_decode.py [--quick] [--threads 1] [--out bench/results/quant_decode.md]

Model: ``LlamaForCausalLM`` from a config in its defaults (``use_cache=True``, ``return_dict=True``) apart from the
sizes: hidden 1024, 8 layers, 16 query / 8 key-value heads, MLP 2816, vocab 32000 (the Llama tokenizer's size),
random weights (speed does not depend on them). Every Linear, the LM head included (``output_layers=true``, as
llama.cpp and onnxruntime's MatMulNBits quantizer do), is quantized by round-to-nearest (GPTQ costs calibration
time, not decode time); the embedding table stays float (decoding reads one row of it per token).
Timing: ``model.generate`` (KV cache on) from a 16-token prompt, 64 new tokens, every contender once per round,
rounds interleaved, the median tokens/s over rounds; torch threads fixed. The ONNX row exports the int4 result
(full-sequence forward, no KV cache) with ``graphopt.export_onnx`` and times one forward over the 16-token prompt
in onnxruntime against the torch int4 model on the same input.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import graphopt  # noqa: E402
from benchkit import provenance, publish  # noqa: E402
from graphopt.pipeline.metrics import model_bytes  # noqa: E402

FULL = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
            intermediate_size=2816, vocab_size=32000)
QUICK = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=704, vocab_size=4096)
PROMPT, NEW_TOKENS = 16, 64
CONTENDERS = (("int4 g128", "quantize-weights:bits=4,group_size=128,output_layers=true"),
              ("int4 g32", "quantize-weights:bits=4,group_size=32,output_layers=true"),
              ("int8 per-channel", "quantize-weights:bits=8,group_size=none,output_layers=true"))


def build(sizes: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**sizes)).eval()


def tokens_per_second(model, prompt: torch.Tensor, new_tokens: int) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return new_tokens / seconds


def quantized(model, spec: str, prompt: torch.Tensor):
    start = time.perf_counter()
    result = graphopt.optimize(model, spec, {"input_ids": prompt})
    return result, result.to_model(), time.perf_counter() - start


def onnx_row(result, torch_model, prompt: torch.Tensor, threads: int) -> str:
    """Export the int4 result, time onnxruntime against torch on one full-prompt forward."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/llama_int4.onnx"
        report = graphopt.export_onnx(result.module, {"input_ids": prompt}, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: prompt.numpy()}
        ort_ms, torch_ms = [], []
        for _ in range(7):
            start = time.perf_counter()
            session.run(None, feed)
            ort_ms.append(1e3 * (time.perf_counter() - start))
            with torch.no_grad():
                start = time.perf_counter()
                torch_model(input_ids=prompt)
                torch_ms.append(1e3 * (time.perf_counter() - start))
        del session
    counts = getattr(report, "integer_kernels", None)
    return (f"- onnxruntime: `graphopt.export_onnx(result.module, ...)` wrote {report.file_bytes / 1e6:.1f} MB "
            f"({getattr(report, 'quantized_matmuls', 'n/a')} weight-quantized MatMuls; onnxruntime runs {counts} "
            f"integer kernels), verified: SQNR {report.sqnr_db:.1f} dB vs torch; one forward over the {PROMPT}-token "
            f"prompt: onnxruntime {statistics.median(ort_ms):.1f} ms, graphopt int4 eager "
            f"{statistics.median(torch_ms):.1f} ms (medians of 7, interleaved)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model, 2 rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = args.out or ("bench/cache/quant_decode_quick.md" if args.quick else "bench/results/quant_decode.md")
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    rounds = 2 if args.quick else args.rounds
    model = build(sizes)
    prompt = torch.randint(0, sizes["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1))
    models = {"fp32 eager": (None, model, 0.0)}
    for label, spec in CONTENDERS:
        print(f"quantizing: {label} ({spec}) ...", flush=True)
        models[label] = quantized(model, spec, prompt)
    for _, m, _ in models.values():  # warm-up: first calls build kernels and caches
        tokens_per_second(m, prompt, 4)
    rates = {label: [] for label in models}
    for r in range(rounds):
        for label, (_, m, _) in models.items():
            rates[label].append(tokens_per_second(m, prompt, NEW_TOKENS))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in rates.items()), flush=True)
    base = statistics.median(rates["fp32 eager"])
    lines = ["| model | weights MB | tokens/s (median) | speedup vs fp32 | quantize s |", "|---|---:|---:|---:|---:|"]
    for label, (_, m, seconds) in models.items():
        tps = statistics.median(rates[label])
        lines.append(f"| {label} | {model_bytes(m) / 1e6:.0f} | {tps:.1f} | {tps / base:.2f}x | {seconds:.1f} |")
    speedup = statistics.median(rates["int4 g128"]) / base
    verdict = f"- target: int4 decode >= 3x fp32 eager: {'met' if speedup >= 3 else 'NOT met'} ({speedup:.2f}x)"
    print("exporting int4 g128 to onnxruntime ...", flush=True)
    try:
        ort_line = onnx_row(models["int4 g128"][0], models["int4 g128"][1], prompt, args.threads)
    except Exception as e:  # noqa: BLE001 -- a failed export is reported, not a crash
        ort_line = f"- onnxruntime export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    head = provenance(
        "Batch-1 decoding of an HF Llama with int4/int8 weights on graphopt's kernels",
        f"- torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
        f"{args.threads} thread(s); kernels: {graphopt.kernels.library().isa if graphopt.kernels.library() else 'reference'}",
        f"- model: LlamaForCausalLM, default config, {sizes}; {graphopt.count_params(model):,} parameters",
        f"- generate: prompt {PROMPT} tokens, {NEW_TOKENS} new tokens, greedy, KV cache; {rounds} interleaved rounds")
    publish(f"{head}\n\n" + "\n".join(lines) + f"\n\n{verdict}\n{ort_line}\n", out)


if __name__ == "__main__":
    main()
