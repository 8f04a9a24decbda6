"""One-shot compression (no fine-tuning) of a small byte-level Llama trained on real text: bits per byte on held-out
text after each of graphopt's one-shot methods, from the same dense model.

    .venv/bin/python bench/oneshot_lm.py [--quick] [--rows SUBSTR,...] [--retrain] [--out bench/results/oneshot_lm.md]

The committed bench/results/oneshot_lm.md comes from ``.venv/bin/python bench/oneshot_lm.py`` (full settings).

Model: ``transformers.LlamaForCausalLM`` in its default config (``use_cache=True``, ``return_dict=True``) apart from
the sizes: 256 byte tokens, hidden 256, 4 layers, 8 query / 4 key-value heads, MLP 688 (3.03M parameters). Text: the
bytes of the installed numpy package's ``*.py`` files in sorted path order; every 10th file is held out. Training:
AdamW, 600 steps of 32 random 128-byte windows, 2 threads (about 6 minutes on a quiet machine); the weights are
cached as float16 in bench/cache/ under a hash of (config, training settings, file list) and loaded back as float32,
so every row starts from the same dense model (``--retrain`` forces training).

Metric: bits per byte = mean next-byte cross-entropy / ln 2 over 128 evenly spaced held-out windows of 128 bytes (the
training length: positions past it, never trained, cost the dense model about 1 bit per byte more), computed
with ``result.to_model()`` (a LlamaForCausalLM; ``result.module`` is checked to give the same logits). Calibration:
64 training windows of 128 bytes (seed 1) in 8 batches. Every row is ``graphopt.optimize`` on one shared capture;
its seconds exclude the capture. "gap closed" is (bpb_magnitude - bpb) / (bpb_magnitude - bpb_dense) within one
sparsity pattern.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
import traceback
from pathlib import Path

import numpy
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import graphopt  # noqa: E402
from benchkit import provenance, publish  # noqa: E402
from graphopt.pipeline.metrics import model_bytes  # noqa: E402

FULL = dict(model=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                       intermediate_size=688, max_position_embeddings=256),
            train=dict(steps=600, batch=32, seq=128, lr=2e-3, warmup=50, weight_decay=0.1, seed=0))
QUICK = dict(model=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=176, max_position_embeddings=256),
             train=dict(steps=300, batch=16, seq=128, lr=3e-3, warmup=20, weight_decay=0.1, seed=0))
EVAL_WINDOWS, EVAL_LEN, CALIB_SEQS, CALIB_LEN, CALIB_BATCH = 128, 128, 64, 128, 8
PRUNE = "prune-channels:ratio=0.25,importance={imp},reconstruct={rec}"
SPARSE = "sparsify:{what},method={method}"


def rows(layers: int) -> list[tuple[str, str, str, bool]]:
    """(group, method, pass string, in --quick); pass string "" = dense, "by-hand" = drop the last 2 by hand."""
    out = [("dense", "dense", "", True)]
    for group, what in (("50% unstructured", "sparsity=0.5"), ("2:4", "pattern=2:4")):
        out += [(group, f"{group} {m}", SPARSE.format(what=what, method=m), m != "wanda")
                for m in ("magnitude", "wanda", "sparsegpt")]
    out += [("prune 0.25", f"channels {imp}{' + reconstruct' if rec == 'true' else ''}",
             PRUNE.format(imp=imp, rec=rec), imp == "l2") for imp in ("l2", "activation") for rec in ("false", "true")]
    for crit in ("block-influence", "angular", "output-error"):  # scored once, then (not angular) greedy
        for mode, greedy in (("", ",greedy=false"), (" greedy", ",greedy=true")):
            if crit == "angular" and greedy.endswith("true"):
                continue
            out += [("remove 2", f"layers {crit}{mode}{note}", f"remove-layers:n=2,criterion={crit}{greedy}{opt}",
                     crit != "angular" and not mode)
                    for note, opt in ((", first+last protected", ",protect=[first,last]"),
                                      (", first protected", ",protect=[first]"), (", unprotected", ",protect=[]"))]
    last = ",".join(f"model.layers.{i}" for i in (layers - 2, layers - 1))
    out += [("remove 2", "drop the last 2 (remove-layers blocks=)", f"remove-layers:blocks=[{last}]", True),
            ("remove 2", "drop the last 2 (by hand, no graphopt)", "by-hand", False)]
    return out + repair_rows(last) + quant_rows()


def quant_rows() -> list[tuple[str, str, str, bool]]:
    """Weight-only int8/int4 and dynamic int8, RTN against GPTQ; every layer on the kernels (min_speedup=0)."""
    out = []
    for label, grid in (("int8 per-channel", "bits=8,group_size=none"), ("int4 g128", "bits=4,group_size=128"),
                        ("int4 g32", "bits=4,group_size=32")):
        for method in ("rtn", "gptq", "gptq act-order"):
            opts = f"method={method.split()[0]}" + (",act_order=true" if "act-order" in method else "")
            out.append(("weight quant", f"{label} {method}", f"quantize-weights:{grid},{opts},min_speedup=0",
                        method == "rtn" and label == "int4 g128"))
    out.append(("weight quant", "dynamic int8", "dynamic-quant:min_speedup=0", False))
    return out


def repair_rows(last: str) -> list[tuple[str, str, str, bool]]:
    """Repair after removal and data-aware low rank: each next to the same compression without it."""
    out = []
    for label, spec in (("layers greedy, first protected", "remove-layers:n=2,protect=[first]"),
                        ("layers scored once, first+last protected",
                         "remove-layers:n=2,greedy=false,protect=[first,last]"),
                        ("drop the last 2", f"remove-layers:blocks=[{last}]")):
        out += [("repair", f"{label}{' + repair' if rep else ''}", spec + (",repair=true" if rep else ""), False)
                for rep in (False, True)]
    for ratio in ("0.375", "0.25"):
        out += [("low-rank", f"low-rank {ratio}{' whitened' if w else ''}",
                 f"low-rank:rank_ratio={ratio}" + (",whiten=true" if w else ""), False) for w in (False, True)]
    return out


def numpy_text() -> tuple[bytes, bytes, list[str]]:
    """(train bytes, held-out bytes, relative file list): every 10th file of numpy's sorted *.py is held out."""
    base = Path(numpy.__file__).parent
    files = sorted(base.rglob("*.py"), key=lambda p: p.relative_to(base).as_posix())
    names = [p.relative_to(base).as_posix() for p in files]
    train = b"\n".join(p.read_bytes() for i, p in enumerate(files) if i % 10 != 9)
    held = b"\n".join(p.read_bytes() for i, p in enumerate(files) if i % 10 == 9)
    return train, held, names


def as_ids(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def random_windows(ids: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - length, (n,), generator=gen)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


def build(sizes: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=256, **sizes)).eval()


def train(model, ids: torch.Tensor, t: dict) -> float:
    """AdamW with linear warm-up and cosine decay to 10%; returns the final training loss (mean of the last 20)."""
    torch.manual_seed(t["seed"])
    gen = torch.Generator().manual_seed(t["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], betas=(0.9, 0.95), weight_decay=t["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / t["warmup"]) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / t["steps"])))))
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(t["steps"]):
        batch = random_windows(ids, t["batch"], t["seq"] + 1, gen)
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == t["steps"] - 1:
            el = time.perf_counter() - start
            print(f"\r  train step {step + 1}/{t['steps']}  loss {loss.item() / math.log(2):.3f} bits/byte  "
                  f"{el:.0f}s (eta {el / (step + 1) * (t['steps'] - step - 1):.0f}s)", end="", flush=True)
    print()
    return sum(losses[-20:]) / len(losses[-20:])


def dense_model(settings: dict, train_ids: torch.Tensor, names: list[str], quick: bool, retrain: bool):
    """The cached dense model (trained first when the cache is missing, stale or --retrain) and its metadata."""
    cache = ROOT / "bench" / "cache"
    stem = cache / ("oneshot_lm_llama_quick" if quick else "oneshot_lm_llama")
    weights, meta_path = stem.with_suffix(".pt"), stem.with_suffix(".json")
    key = hashlib.sha256(json.dumps([settings, names], sort_keys=True).encode()).hexdigest()[:16]
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if retrain or meta.get("key") != key or not weights.exists():
        print(f"training the dense model ({'forced' if retrain else 'no cache for key ' + key}) ...")
        model = build(settings["model"])
        start = time.perf_counter()
        loss = train(model, train_ids, settings["train"])
        meta = dict(key=key, train_seconds=round(time.perf_counter() - start, 1), final_train_loss=round(loss, 4),
                    settings=settings, files=len(names), train_bytes=len(train_ids))
        cache.mkdir(parents=True, exist_ok=True)
        (cache / ".gitignore").write_text("*quick*\n")  # the full model is committed (reruns score the same weights)
        torch.save({k: v.half() for k, v in model.state_dict().items()}, weights)
        meta_path.write_text(json.dumps(meta, indent=1))
        meta = dict(meta, fresh=True)
    model = build(settings["model"])
    model.load_state_dict({k: v.float() for k, v in torch.load(weights).items()})
    return model.eval(), meta


@torch.no_grad()
def bits_per_byte(model, windows: torch.Tensor, batch: int = 16) -> float:
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i:i + batch]
        logits = model(input_ids=ids).logits[:, :-1]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return total / count / math.log(2)


def nonzero(model) -> int:
    """Nonzero parameters as the model computes with them (masked weights through their parametrizations)."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, parametrize.ParametrizationList):
            continue
        for name, p in mod.named_parameters(recurse=False):
            total += int(torch.count_nonzero(p))
        if parametrize.is_parametrized(mod):
            total += sum(int(torch.count_nonzero(getattr(mod, name))) for name in mod.parametrizations)
    return total


def drop_last_by_hand(model, n: int = 2):
    import copy

    m = copy.deepcopy(model)
    m.model.layers = m.model.layers[:-n]
    m.config.num_hidden_layers -= n
    if getattr(m.config, "layer_types", None):
        m.config.layer_types = m.config.layer_types[:-n]
    return m


def run_row(model, spec: str, example, calib, graph, windows) -> dict:
    if spec == "by-hand":
        m, seconds, notes = drop_last_by_hand(model), 0.0, []
    else:
        start = time.perf_counter()
        res = graphopt.optimize(model, spec, example, calib_data=calib, graph=graph)
        seconds, notes = time.perf_counter() - start, []
        for rec in res.report.records:  # which layers remove-layers chose
            if rec.stats.get("removed_blocks"):
                names = [b["block"].removeprefix("model.") for b in rec.stats["removed_blocks"]]
                notes.append("removed " + ", ".join(names))
        with torch.no_grad():
            probe = windows[:4]
            graph_logits = res.module(input_ids=probe).logits
            try:
                m = res.to_model()
            except Exception as e:  # noqa: BLE001 -- recorded: the graph result is still measured
                m, notes = res.module, [f"to_model failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                                        "measured result.module"]
            else:
                diff = float((m(input_ids=probe).logits - graph_logits).abs().max())
                if type(m).__name__ != "LlamaForCausalLM" or diff > 1e-3:
                    notes.append(f"to_model() is {type(m).__name__}, max |logit diff| vs result.module {diff:.2g}")
    return dict(bpb=bits_per_byte(m, windows), params=graphopt.count_params(m), nonzero=nonzero(m),
                seconds=seconds, notes=notes, mb=model_bytes(m) / 1e6)


def fmt_params(r: dict) -> str:
    text = f"{r['params'] / 1e6:.3f}M"
    return text + (f" ({r['nonzero'] / 1e6:.3f}M nonzero)" if r["nonzero"] < 0.99 * r["params"] else "")


def table(results: list, dense: float) -> str:
    mag = {g: r["bpb"] for g, label, _, r in results if "bpb" in r and label.endswith("magnitude")}
    lines = ["| method | pass string | bpb | gap vs dense | magnitude gap closed | params | MB | optimize s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for group, label, spec, r in results:
        code = f"`{spec}`" if spec and spec != "by-hand" else ("(hand-built copy)" if spec else "")
        if "bpb" not in r:
            lines.append(f"| {label} | {code} | {r['error']} | | | | | |")
            continue
        closed = f"{(mag[group] - r['bpb']) / (mag[group] - dense):.0%}" if group in mag and mag[group] > dense \
            and not label.endswith("magnitude") else ""
        note = "".join(f" ({n})" for n in r["notes"])
        lines.append(f"| {label}{note} | {code} | {r['bpb']:.3f} | {r['bpb'] - dense:+.3f} | {closed} | "
                     f"{fmt_params(r)} | {r['mb']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def summary(results: list, dense: float) -> list[str]:
    get = {label: r.get("bpb") for _, label, _, r in results}
    out = []

    def check(text, *labels, ok):
        vals = [get.get(lab) for lab in labels]
        verdict = "not measured" if None in vals else ("met" if ok(*vals) else "NOT met")
        out.append(f"- {text}: {verdict} ({', '.join('n/a' if v is None else f'{v:.3f}' for v in vals)})")

    mag, sgpt = "50% unstructured magnitude", "50% unstructured sparsegpt"
    check("SparseGPT closes >= 3/4 of the dense-magnitude gap at 50% unstructured (magnitude, sparsegpt)", mag, sgpt,
          ok=lambda m, s: m - s >= 0.75 * (m - dense))
    check("SparseGPT beats magnitude at 2:4 (magnitude, sparsegpt)", "2:4 magnitude", "2:4 sparsegpt",
          ok=lambda m, s: s < m)
    check("reconstruction lowers channel pruning's bpb (l2, l2 + reconstruct)", "channels l2",
          "channels l2 + reconstruct", ok=lambda a, b: b < a)
    for label in ("layers greedy, first protected", "layers scored once, first+last protected", "drop the last 2"):
        check(f"repair lowers remove-layers' bpb, {label} (without, with)", label, f"{label} + repair",
              ok=lambda a, b: b < a)
    for ratio in ("0.375", "0.25"):
        check(f"whitening lowers low-rank's bpb at rank ratio {ratio} (plain, whitened)", f"low-rank {ratio}",
              f"low-rank {ratio} whitened", ok=lambda a, b: b < a)
    for grid in ("int4 g128", "int4 g32"):
        check(f"GPTQ lowers the bpb of RTN at {grid} (rtn, gptq)", f"{grid} rtn", f"{grid} gptq", ok=lambda a, b: b < a)
    check("int8 per-channel weights stay within 0.01 bpb of dense (dense, rtn)", "dense", "int8 per-channel rtn",
          ok=lambda d, q: abs(q - d) <= 0.01)
    return out


def plot(results: list, dense: float, out: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ""
    done = [(label, r["bpb"]) for _, label, _, r in results if "bpb" in r and label != "dense"]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(done) + 1.2))
    ax.barh(range(len(done)), [b for _, b in done], color="tab:blue")
    ax.axvline(dense, color="black", linestyle="--", label=f"dense {dense:.3f}")
    ax.set_yticks(range(len(done)), [lab for lab, _ in done], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("held-out bits per byte (lower is better)")
    ax.set_title("One-shot compression of a byte-level Llama (no fine-tuning)")
    ax.legend()
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"\n![bits per byte per method]({path.name})\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, ~30 s of training, a few rows")
    parser.add_argument("--rows", default="", help="comma-separated substrings of row groups, method names or pass strings")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--out", default=None,
                        help="default bench/results/oneshot_lm.md (--quick: bench/cache/oneshot_lm_quick.md)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out or ("bench/cache/oneshot_lm_quick.md" if args.quick else "bench/results/oneshot_lm.md"))
    torch.set_num_threads(2)
    wall = time.perf_counter()
    settings = QUICK if args.quick else FULL
    train_bytes, held_bytes, names = numpy_text()
    train_ids, held_ids = as_ids(train_bytes), as_ids(held_bytes)
    model, meta = dense_model(settings, train_ids, names, args.quick, args.retrain)
    step = (len(held_ids) - EVAL_LEN) // EVAL_WINDOWS
    windows = torch.stack([held_ids[i * step:i * step + EVAL_LEN] for i in range(EVAL_WINDOWS)])
    calib_all = random_windows(train_ids, CALIB_SEQS, CALIB_LEN, torch.Generator().manual_seed(1))
    calib = [{"input_ids": calib_all[i:i + CALIB_BATCH]} for i in range(0, CALIB_SEQS, CALIB_BATCH)]
    example = {"input_ids": calib_all[:2]}
    start = time.perf_counter()
    graph = graphopt.trace(model, example)
    capture_s = time.perf_counter() - start
    wanted = [w for w in args.rows.split(",") if w]
    chosen = [r for r in rows(model.config.num_hidden_layers) if (r[3] or not args.quick)
              and (not wanted or r[0] == "dense" or any(w in r[0] or w in r[1] or w in r[2] for w in wanted))]
    results, failures = [], []
    for i, (group, label, spec, _) in enumerate(chosen):
        print(f"[{i + 1}/{len(chosen)}] {label}: {spec or '(dense)'} ...", flush=True)
        try:
            r = run_row(model, spec, example, calib, graph, windows) if spec else \
                dict(bpb=bits_per_byte(model, windows), params=graphopt.count_params(model), nonzero=nonzero(model),
                     seconds=0.0, notes=[], mb=model_bytes(model) / 1e6)
        except Exception as e:  # noqa: BLE001 -- every failure is a table cell, not a crash
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            unavailable = isinstance(e, graphopt.PipelineError) and (
                ("reconstruct" in first and "has no option" in first) or "unknown importance 'activation'" in first)
            r = dict(error="not available" if unavailable else f"error: {type(e).__name__}: {first}"[:300])
            if not unavailable:
                failures.append((spec, traceback.format_exc()))
        results.append((group, label, spec, r))
        print("    -> " + (r["error"] if "error" in r else
                            f"{r['bpb']:.3f} bpb, {fmt_params(r)}, {r['seconds']:.1f} s"), flush=True)
    dense = next(r["bpb"] for g, _, _, r in results if g == "dense")
    total_s = time.perf_counter() - wall
    head = provenance(
        "One-shot compression of a byte-level Llama on numpy's source, no fine-tuning",
        f"- torch {torch.__version__}, transformers {__import__('transformers').__version__}, numpy {numpy.__version__}"
        f" (its {len(names)} .py files; every 10th held out: {len(train_ids):,} train / {len(held_ids):,} held-out "
        "bytes)",
        f"- model: LlamaForCausalLM, default config, vocab 256, {json.dumps(settings['model'])}; "
        f"{graphopt.count_params(model):,} parameters",
        f"- training: {json.dumps(settings['train'])}, AdamW, 2 threads; cache key {meta['key']}, trained in "
        f"{meta['train_seconds']:.0f} s, final train loss {meta['final_train_loss'] / math.log(2):.3f} bits/byte",
        f"- bpb over {EVAL_WINDOWS} held-out windows of {EVAL_LEN} bytes; calibration {CALIB_SEQS} train windows of "
        f"{CALIB_LEN} bytes in batches of {CALIB_BATCH}; shared capture {capture_s:.1f} s (not in the optimize "
        f"seconds); whole run {total_s:.0f} s"
        f"{'' if meta.get('fresh') else ' (weights from the cache)'}",
        "- sparsify rows keep every parameter (masked); channel-pruning rows report the pruned model's parameters; "
        "MB counts parameters and buffers (the int4/int8 codes and scales of quantized layers are buffers, so their "
        "params column shows only what still trains: biases, norms, embeddings, the LM head)")
    report = f"{head}\n\n{table(results, dense)}\n\nTargets:\n\n" + "\n".join(summary(results, dense)) + "\n"
    report += plot(results, dense, out) if not wanted else ""
    publish(report, str(out))
    for spec, tb in failures:
        print(f"\n--- graphopt error for `{spec}`:\n{tb}", file=sys.stderr)


if __name__ == "__main__":
    main()
