"""Structural channel pruning, graphopt vs Torch-Pruning (tp), on the test zoo, the breadth zoo and two 224x224 models.

The breadth zoo (tests/models_breadth.py) holds the patterns that once made graphopt refuse or freeze: torch's
nn.MultiheadAttention (heads folded into the batch dim), unfold/fold patch reshapes, per-head bias tables, pooled
sequences, multi-query attention with a parallel block, dynamic convolution and TF-"SAME" padding.

Both tools get the same model, the same ratio and the same criterion: L2 weight magnitude ranked per layer/group
(local, no global ranking). graphopt runs ``optimize(model, [PruneChannels(ratio, importance="l2")], inputs)``,
which traces with torch.export, analyses channel dependencies, prunes and verifies the graph: its
"analysis+prune" time is that whole call. tp runs ``BasePruner(...)`` (builds its DependencyGraph with an
autograd forward) plus ``pruner.step()``; its time is those two (the deepcopy it prunes is made outside the
timer). Each time is the median of 3 runs. The final classifier / lm_head (the last Linear or Conv of the model)
is passed to tp as ignored, so the model output keeps its width; graphopt never prunes graph outputs.

Every (tool, model) attempt runs in its own subprocess with a timeout, so a hang or crash is recorded in the
table ("hang", "error: ...") rather than ending the bench. An attempt counts as a success only when the pruned
model runs on the example inputs and on the batch-1 inputs, returns outputs of the original's shapes, and they
are finite; otherwise it is "broken: ...". Latency is then measured in one more subprocess that prunes again with
each successful tool and times the original, graphopt-pruned and tp-pruned models interleaved round by round
(``graphopt.paired_latency``, batch 1, ``--threads`` threads), so the three medians are comparable.

Run from the repository root (needs the ``bench`` extra: ``pip install --no-deps torch-pruning``)::

    .venv/bin/python bench/prune_zoo.py                                  # whole zoo + resnet50 + mobilenet_v2
    .venv/bin/python bench/prune_zoo.py --models resnet_basic,resnet50 --repeats 5 --skip-tp
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

import big_models  # noqa: E402
import graphopt  # noqa: E402
from benchkit import geomean, provenance, publish  # noqa: E402
from graphopt.graph.inputs import ExampleInputs, flat_outputs  # noqa: E402
from graphopt.passes.channel_prune import PruneChannels  # noqa: E402
from models import BREADTH_NAMES, NAMES, build  # noqa: E402

ZOO = (*NAMES, *BREADTH_NAMES, *big_models.BUILDERS)  # the test zoo, the breadth zoo, the 224x224 models
PRUNE_RUNS = 3
WARMUP = 5
TAG = "@@prune_zoo@@"
TOOLS = ("graphopt", "tp")
DEPTHWISE = ("mobilenet", "shufflenet")
COLUMNS = ("model", "graphopt", "tp", "go total s", "go prune s", "tp prune s", "go params", "tp params", "go MACs", "tp MACs",
           "orig ms", "go speedup", "tp speedup", "go real", "tp real")
TP_CALL = ("`tp.pruner.BasePruner(model, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=2), "
           "pruning_ratio=RATIO, global_pruning=False, round_to=None, ignored_layers=[<last Linear/Conv>])` then "
           "`pruner.step()`; for models with attention modules, as in tp's HF/timm/LLM examples, also "
           "`num_heads={q/k/v or fused qkv Linear: heads}, prune_num_heads=True, prune_head_dims=False, "
           "head_pruning_ratio=RATIO`, and afterwards the modules' head-count attributes are updated from "
           "`pruner.num_heads` (num_heads/head_dim, BERT's num_attention_heads/attention_head_size/all_head_size, "
           "HF decoders' num_key_value_groups). tp's `MetaPruner` is a deprecated alias of `BasePruner` in 1.6.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(ZOO),
                   help="comma-separated zoo / big_models names (default: all)")
    p.add_argument("--ratio", type=float, default=0.5, help="channel pruning ratio for both tools (default 0.5)")
    p.add_argument("--repeats", type=int, default=40, help="interleaved latency rounds (default 40)")
    p.add_argument("--timeout", type=int, default=120, help="seconds per pruning attempt (latency: twice that)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--out", default="bench/results/prune_zoo.md", help="markdown file to write")
    p.add_argument("--skip-tp", action="store_true", help="run graphopt only")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: a JSON job run in a subprocess
    args = p.parse_args(argv)
    unknown = set(args.models.split(",")) - set(ZOO)
    if unknown and not args.worker:
        p.error(f"unknown models {sorted(unknown)}; choose from {', '.join(ZOO)}")
    return args


# --------------------------------------------------------------------------------------------- models and tools


def load(name: str) -> tuple[nn.Module, tuple | dict]:
    """Model ``name`` (zoo or big_models) in eval mode and its example inputs."""
    if name in big_models.BUILDERS:
        return big_models.build(name)
    case = build(name)
    return case.model, case.example_inputs


def batch1(inputs: tuple | dict) -> tuple | dict:
    """The inputs with every tensor sliced to batch 1 along dim 0."""
    one = lambda v: v[:1].contiguous() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return {k: one(v) for k, v in inputs.items()} if isinstance(inputs, dict) else tuple(map(one, inputs))


def final_layer(model: nn.Module) -> nn.Module:
    """The last Linear / Conv / transformers Conv1D registered: the classifier, lm_head, output conv or pooler."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) or type(m).__name__ == "Conv1D"]
    return layers[-1]


def head_attr(m: nn.Module) -> str | None:
    """The attribute that holds a hand-written attention module's head count (timm: num_heads; others: heads)."""
    return next((a for a in ("num_heads", "heads") if isinstance(getattr(m, a, None), int)), None)


def tp_heads(model: nn.Module) -> list[tuple[nn.Module, dict]]:
    """Attention modules with the ``{projection Linear: head count}`` that tp's examples pass as ``num_heads``:
    HF's q/k/v_proj and query/key/value, and hand-written modules with separate q/k/v or a fused qkv Linear and a
    ``num_heads``/``heads`` attribute. Fused layouts tp cannot describe (MQA's q+k+v rows in one Linear, per-head
    interleaved q/k/v) get no spec: tp then prunes them as plain channels."""
    specs = []
    for m in model.modules():
        lin = lambda a: type(getattr(m, a, None)) is nn.Linear  # noqa: E731
        heads = head_attr(m)
        if all(map(lin, ("q_proj", "k_proj", "v_proj"))) and hasattr(m, "config"):
            kv = getattr(m.config, "num_key_value_heads", None) or m.config.num_attention_heads
            specs.append((m, {m.q_proj: m.config.num_attention_heads, m.k_proj: kv, m.v_proj: kv}))
        elif all(map(lin, ("query", "key", "value"))) and hasattr(m, "num_attention_heads"):
            specs.append((m, dict.fromkeys((m.query, m.key, m.value), m.num_attention_heads)))
        elif all(map(lin, ("q", "k", "v"))) and heads:
            specs.append((m, dict.fromkeys((m.q, m.k, m.v), getattr(m, heads))))
        elif (lin("qkv") or lin("qkv_proj")) and heads:
            specs.append((m, {getattr(m, "qkv", None) or m.qkv_proj: getattr(m, heads)}))
    return specs


def tp_fix_heads(specs: list[tuple[nn.Module, dict]], pruner) -> None:
    """After ``step()``: copy tp's pruned head counts into the attention modules' attributes (tp's recipe)."""
    for m, heads in specs:
        first = next(iter(heads))
        n = pruner.num_heads[first]
        if hasattr(m, "num_key_value_groups"):
            m.num_key_value_groups = n // pruner.num_heads[m.k_proj]
        elif hasattr(m, "attention_head_size"):
            m.num_attention_heads, m.all_head_size = n, first.out_features
            m.attention_head_size = first.out_features // n
        else:
            setattr(m, head_attr(m), n)
            if hasattr(m, "head_dim"):  # a fused qkv Linear holds three heads' worth of rows per head
                m.head_dim = first.out_features // ((3 if len(heads) == 1 else 1) * n)


def prune_graphopt(model: nn.Module, inputs, ratio: float) -> tuple[nn.Module, float, float]:
    """graphopt's deployable (lowered) pruned model, the seconds of the whole ``optimize`` call (trace + analysis +
    prune + verify), and the seconds of the prune-channels pass alone (analysis + plan + apply)."""
    start = time.perf_counter()
    res = graphopt.optimize(model, [PruneChannels(ratio=ratio, importance="l2")], inputs)
    seconds = time.perf_counter() - start
    return graphopt.streamline(res.module, inputs), seconds, res.report.records[0].seconds


def prune_tp(model: nn.Module, inputs, ratio: float) -> tuple[nn.Module, float, float]:
    """tp-pruned deepcopy of ``model`` and the seconds of ``BasePruner(...)`` + ``step()`` (see TP_CALL)."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    specs = tp_heads(model)
    heads = {lin: n for _, d in specs for lin, n in d.items()}
    extra = (dict(num_heads=heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio)
             if heads else {})
    start = time.perf_counter()
    pruner = tp.pruner.BasePruner(model, inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, global_pruning=False, round_to=None,
                                  ignored_layers=[final_layer(model)], **extra)
    pruner.step()
    seconds = time.perf_counter() - start
    tp_fix_heads(specs, pruner)
    return model.eval(), seconds, seconds  # tp's trace is part of its analysis: no separate capture step


PRUNERS = {"graphopt": prune_graphopt, "tp": prune_tp}


# --------------------------------------------------------------------------------------------- subprocess workers


@torch.no_grad()
def defect(model: nn.Module, pruned: nn.Module, inputs) -> str | None:
    """Why ``pruned`` is not a usable replacement of ``model`` on ``inputs`` (None when it is)."""
    call = ExampleInputs.of(inputs).call
    want = [tuple(t.shape) for t in flat_outputs(call(model))]
    try:
        got = flat_outputs(call(pruned))
    except Exception as e:  # noqa: BLE001 - any failure of the pruned model is the finding
        return f"broken: runs no more ({type(e).__name__}: {e})"
    if [tuple(t.shape) for t in got] != want:
        return f"broken: output shapes {[tuple(t.shape) for t in got]} != {want}"
    if not all(torch.isfinite(t).all() for t in got if t.is_floating_point()):
        return "broken: non-finite outputs"
    return None


def prune_job(job: dict) -> dict:
    """One (tool, model) attempt: prune PRUNE_RUNS times (median time), check, count params and MACs."""
    model, inputs = load(job["name"])
    pruned, times, pass_times = None, [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", graphopt.GraphoptWarning)
        try:
            for _ in range(PRUNE_RUNS):
                pruned, seconds, pass_seconds = PRUNERS[job["tool"]](model, inputs, job["ratio"])
                times.append(seconds)
                pass_times.append(pass_seconds)
        except Exception as e:  # noqa: BLE001
            return {"status": f"error: {type(e).__name__}: {e}"}
    notes = sorted({str(w.message).split(";")[0] for w in caught if issubclass(w.category, graphopt.GraphoptWarning)})
    one = batch1(inputs)
    problem = defect(model, pruned, inputs) or defect(model, pruned, one)
    if problem:
        return {"status": problem, "notes": notes}
    params = [graphopt.count_params(model), graphopt.count_params(pruned)]
    return {"status": "ok" if params[1] < params[0] else "no-op: nothing pruned", "notes": notes,
            "seconds": statistics.median(times), "pass_seconds": statistics.median(pass_times), "params": params,
            "macs": [graphopt.count_macs(model, one), graphopt.count_macs(pruned, one)]}


@torch.no_grad()
def latency_job(job: dict) -> dict:
    """Prune again with each successful tool and time original and pruned models interleaved at batch 1."""
    model, inputs = load(job["name"])
    one = ExampleInputs.of(batch1(inputs))
    fns = {"orig": lambda: one.call(model)}
    if "graphopt" in job["tools"]:  # control: graphopt's traced graph with no pass, to separate tracing from pruning
        fns["traced"] = lambda m=graphopt.streamline(graphopt.optimize(model, [], inputs).module, inputs): one.call(m)
    for tool in job["tools"]:
        with torch.enable_grad():
            pruned = PRUNERS[tool](model, inputs, job["ratio"])[0]
        fns[tool] = lambda m=pruned: one.call(m)
    lat = graphopt.paired_latency(fns, warmup=WARMUP, repeats=job["repeats"], threads=job["threads"])
    return {"status": "ok", **{k: v.median_ms for k, v in lat.items()}}


def worker(job: dict) -> None:
    """Subprocess entry: run ``job`` and print its JSON result after TAG on stdout."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(job["threads"])
    result = prune_job(job) if job["kind"] == "prune" else latency_job(job)
    print(TAG + json.dumps(result), flush=True)


def spawn(job: dict, timeout: int) -> dict:
    """Run ``job`` in a fresh interpreter; a timeout is "hang", a crash without a result is "error"."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": f"hang (> {timeout} s)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": f"error: exit {proc.returncode}: {last}"}


def bench_model(name: str, args: argparse.Namespace) -> dict:
    """Both tools' attempts on one model, then the interleaved latency of the successful ones."""
    base = {"name": name, "ratio": args.ratio, "threads": args.threads}
    res = {t: spawn({**base, "kind": "prune", "tool": t}, args.timeout)
           for t in TOOLS if not (args.skip_tp and t == "tp")}
    ok = [t for t in res if "seconds" in res[t]]  # pruned models that run, no-ops included
    lat = spawn({**base, "kind": "latency", "tools": ok, "repeats": args.repeats}, 2 * args.timeout) if ok else {}
    return {"model": name, "res": res, "lat": lat}


# --------------------------------------------------------------------------------------------- report


def cells(row: dict, tool: str) -> dict:
    """Formatted per-tool cells of one row ("-" where the tool did not succeed)."""
    r, lat = row["res"].get(tool, {"status": "skipped"}), row["lat"]
    status = r["status"].replace("|", "/").replace("\n", " ")
    out = {"status": status if len(status) <= 60 else status[:57] + "...", "s": "-", "pass": "-", "params": "-",
           "macs": "-", "speedup": "-", "real": "-"}
    if "seconds" not in r:
        return out
    mac_gain = r["macs"][0] / max(r["macs"][1], 1)
    out.update(s=f"{r['seconds']:.2f}", **{"pass": f"{r['pass_seconds']:.2f}"}, params=f"{r['params'][1] / r['params'][0]:.0%}",
               macs=f"{r['macs'][1] / r['macs'][0]:.0%}")
    if tool in lat:
        speed = lat["orig"] / lat[tool]
        out.update(speedup=f"{speed:.2f}x", real=f"{speed / mac_gain:.0%}")
    elif lat.get("status", "ok") != "ok":
        out["speedup"] = lat["status"].split(":")[0]
    return out


def table(rows: list[dict]) -> str:
    """Markdown table of the result rows."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        go, tp = cells(row, "graphopt"), cells(row, "tp")
        orig = f"{row['lat']['orig']:.2f}" if "orig" in row["lat"] else "-"
        vals = (row["model"], go["status"], tp["status"], go["s"], go["pass"], tp["s"], go["params"], tp["params"], go["macs"],
                tp["macs"], orig, go["speedup"], tp["speedup"], go["real"], tp["real"])
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def successes(rows: list[dict], tool: str) -> list[str]:
    """Models that ``tool`` pruned successfully."""
    return [r["model"] for r in rows if r["res"].get(tool, {}).get("status") == "ok"]


def summary(rows: list[dict]) -> str:
    """Closing lines: success counts, resnet50 analysis+prune time ratio, graphopt- vs tp-pruned latency."""
    lines = [f"- {tool} pruned {len(ok)}/{len(rows)} models: {', '.join(ok) or 'none'}"
             if any(tool in r["res"] for r in rows) else f"- {tool}: skipped"
             for tool in TOOLS for ok in [successes(rows, tool)]]
    breadth = [r for r in rows if r["model"] in BREADTH_NAMES]
    lines += [f"- on the breadth zoo, {tool} pruned {len(ok)}/{len(breadth)}" + (f" (not: {', '.join(no)})" if no else "")
              for tool in TOOLS if breadth and any(tool in r["res"] for r in breadth)
              for ok in [[r for r in successes(breadth, tool)]]
              for no in [[r["model"] for r in breadth if r["model"] not in ok]]]
    r50 = next((r["res"] for r in rows if r["model"] == "resnet50"), {})
    if all("seconds" in r50.get(t, {}) for t in TOOLS):
        go, tp = r50["graphopt"]["pass_seconds"], r50["tp"]["seconds"]
        total = r50["graphopt"]["seconds"]
        caveat = "".join(f" (but {t}: {r50[t]['status']})" for t in TOOLS if r50[t]["status"] != "ok")
        faster = f"graphopt is {tp / go:.2f}x faster" if go < tp else f"tp is {go / tp:.2f}x faster"
        lines.append(f"- analysis+prune on resnet50: graphopt {go:.2f} s (the prune-channels pass; {total:.2f} s with "
                     f"torch.export capture and verification), tp {tp:.2f} s (its trace included): {faster}{caveat}")
    else:
        lines.append("- analysis+prune on resnet50: not compared (resnet50 not run or not pruned by both tools)")
    both = [(r["model"], r["lat"]["graphopt"] / r["lat"]["tp"]) for r in rows
            if r["model"] in successes(rows, "graphopt") and r["model"] in successes(rows, "tp") and "tp" in r["lat"]]
    each = ", ".join(f"{m} {x:.2f}" for m, x in both)
    lines.append(f"- latency graphopt-pruned / tp-pruned (below 1: graphopt's is faster), over the {len(both)} models "
                 f"both pruned: geometric mean {geomean([x for _, x in both]):.2f} ({each})" if both else
                 "- latency graphopt-pruned / tp-pruned: not compared (no model pruned by both tools)")
    traced = [r["lat"]["traced"] / r["lat"]["orig"] for r in rows if "traced" in r["lat"]]
    if traced:
        lines.append(f"- tracing alone (graphopt's unpruned traced graph / eager original latency): geometric mean "
                     f"{geomean(traced):.2f} over {len(traced)} models; graphopt's speedups include this factor")
    lines += [f"- {tool} warnings on {r['model']}: {'; '.join(res['notes'])}" for r in rows
              for tool, res in r["res"].items() if res.get("notes")]
    return "\n".join(lines)


def reading(rows: list[dict]) -> str:
    """One paragraph interpreting the numbers, computed from them so it stays true on a rerun."""
    text = ""
    for tool in TOOLS:
        real = [float(c["real"].rstrip("%")) / 100 for r in rows if r["model"] in successes(rows, tool)
                for c in [cells(r, tool)] if c["real"] != "-"]
        if real:
            text += (f"{tool}'s pruned models realize {geomean(real):.0%} of their theoretical MAC-reduction speedup "
                     f"(geometric mean over {len(real)} models). ")
    text += ("Speedups compare eager originals with eager tp-pruned modules and with graphopt's traced GraphModules, "
             "so graphopt's column also contains the effect of tracing itself (the 'tracing alone' line above). ")
    if any(r["model"] in NAMES for r in rows):
        text += ("The zoo models are tiny (32x32 images, 8 tokens), so per-op dispatch overhead bounds their eager "
                 "latency and channel pruning cannot remove it; the 224x224 models are the realistic case. ")
    dw = [r["model"] for r in rows if r["model"].startswith(DEPTHWISE)]
    if dw:
        text += (f"This is strongest for the depthwise-heavy nets ({', '.join(dw)}): their eager latency is "
                 "overhead-bound (many cheap depthwise and 1x1 ops), so a MAC cut shows up poorly as a speedup; "
                 "bench/prune_ort.py measures them after ONNX export in onnxruntime (bench/results/prune_ort.md). ")
    text += ("The prune times here come from 3 runs inside each subprocess at the bench's thread count; "
             "bench/prune_speed.py times analysis+prune alone, interleaved, at 1 thread (bench/results/prune_speed.md). ")
    return text + "Latencies are medians of interleaved rounds on a shared machine and can move by several percent."


def versions() -> str:
    """torch, graphopt and torch-pruning versions."""
    try:
        tp_version = version("torch-pruning")
    except PackageNotFoundError:
        tp_version = "not installed"
    return f"torch {torch.__version__}, graphopt {graphopt.__version__}, torch-pruning {tp_version}"


def header(args: argparse.Namespace) -> str:
    """Provenance lines: command, date, versions, settings, CPU, and how each tool was called."""
    return provenance(
        "Channel pruning: graphopt vs Torch-Pruning",
        f"- versions: {versions()}", f"- threads: {args.threads}; ratio: {args.ratio}; importance: L2, local",
        f"- prune time: median of {PRUNE_RUNS} runs; timeout {args.timeout} s per attempt",
        f"- latency: batch 1, {args.repeats} interleaved rounds after {WARMUP} warmup calls each (medians)",
        f"- graphopt: `graphopt.optimize(model, [PruneChannels(ratio=RATIO, importance=\"l2\")], example_inputs)`",
        f"- tp: {TP_CALL}",
        *([f"- warning: {args.threads} threads on {os.cpu_count()} logical CPUs: any other load on the machine "
            "stalls the intra-op thread team and latencies become erratic"] if args.threads >= os.cpu_count() else []),
        "- columns: params/MACs after pruning as % of the original (MACs at batch 1); speedup = original latency / "
        "pruned latency; real = speedup / MAC-reduction factor (how much of the theoretical gain is real)",
    )


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the markdown report and write it to ``--out``."""
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    rows = []
    for name in (n.strip() for n in args.models.split(",")):
        rows.append(bench_model(name, args))
        print(f"{name}: " + ", ".join(f"{t} {r['status']}" for t, r in rows[-1]["res"].items()), file=sys.stderr)
    publish(f"{header(args)}\n\n{table(rows)}\n\n{summary(rows)}\n\n{reading(rows)}\n", args.out)


if __name__ == "__main__":
    main()
