"""Hugging Face decoders, pruned and handed back: graphopt vs Torch-Pruning (tp), family by family.

Ten decoder families are built from small configs in their default configs (``use_cache=True``,
``return_dict=True``, seeded random weights, no downloads) and pruned at ratio 0.5 by each tool. Then the same
checks run on both results:

- pruned: fewer parameters than the original;
- forward: the pruned model runs on the example batch and returns finite logits of the original's shape;
- generate: greedy ``generate()`` with the KV cache gives the same tokens as without it;
- reload: ``save_pretrained`` + ``AutoModelForCausalLM.from_pretrained`` gives the same class and identical logits.

graphopt: ``res = graphopt.optimize(model, "prune-channels:ratio=0.5", {"input_ids", "attention_mask"})`` then
``res.to_model()`` (same class, config updated by graphopt). Gemma gets ``ignore=[model.embed_tokens]``: Gemma
scales its embeddings by sqrt(config.hidden_size), which no config can keep when the hidden size is pruned.

tp: the recipe of Torch-Pruning's LLM example (examples/LLMs/prune_llm.py), written anew here:
``tp.pruner.MetaPruner(model, input_ids, importance=GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
ignored_layers=[lm_head], num_heads={q_proj: heads, k_proj: kv_heads, v_proj: kv_heads} (or {fused qkv: heads}),
prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5, out_channel_groups={gate_up_proj: 2},
round_to=4, global_pruning=False)``, ``pruner.step()``, then the config and the modules' size attributes edited
by hand as the example does (hidden size from ``lm_head.in_features``, head counts from the projections' widths
and the unchanged head_dim, ``num_key_value_groups``, intermediate size), generalized to the other families'
attribute names (GPT-2's ``n_embd``/``split_size``, OPT's ``ffn_dim``/``word_embed_proj_dim``, ...). tp is
first tried on the default config; where that fails the pruner is built with ``config.use_cache=False`` (restored
to True afterwards, before the checks) and the table says so.

Every (tool, family) attempt runs in its own subprocess. A pruning call still running after ``--timeout``
seconds is recorded as "hang", with the functions it was in (faulthandler's stack at the deadline); a crash as
"error: ...". Prune time is the median of 3 runs when the first run takes under 5 s (else that 1 run), each on a
fresh copy, 1 torch thread; graphopt's time is ``optimize`` + ``to_model``, tp's is ``MetaPruner(...)`` +
``step()`` + the hand edits.

Run from the repository root (needs the ``bench`` extra: ``pip install --no-deps torch-pruning``)::

    .venv/bin/python bench/hf_roundtrip.py
    .venv/bin/python bench/hf_roundtrip.py --families llama,opt --tools graphopt --timeout 120
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from benchkit import provenance, publish  # noqa: E402

RATIO = 0.5
TAG = "@@hf_roundtrip@@"
NOTE = "@@hf_roundtrip_note@@"
TOOLS = ("graphopt", "tp")
CHEAP_S = 10.0  # a first prune faster than this is repeated twice more for a median of 3
VOCAB, BATCH, SEQ, NEW = 128, 2, 8, 6

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               max_position_embeddings=64)
_GQA = dict(_COMMON, num_key_value_heads=2)
FAMILIES = {  # name -> (config class, model class, config kwargs, extra graphopt pass options)
    "llama": ("LlamaConfig", "LlamaForCausalLM", _GQA, ""),
    "mistral": ("MistralConfig", "MistralForCausalLM", _GQA, ""),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _GQA, ""),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_GQA, head_dim=16), ""),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_GQA, head_dim=16), ",ignore=[model.embed_tokens]"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_GQA, pad_token_id=0), ""),
    "phi": ("PhiConfig", "PhiForCausalLM", _COMMON, ""),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64),
             ""),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _COMMON, ""),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, ffn_dim=128, max_position_embeddings=64,
                                                word_embed_proj_dim=64), ""),
}
COLUMNS = ("family", "tool", "params", "pruned", "forward", "generate cache = no cache", "save + from_pretrained",
           "prune s", "notes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated families (default: all ten)")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated tools: graphopt,tp (default: both)")
    p.add_argument("--timeout", type=int, default=60, help="seconds a pruning call may run before it is a hang")
    p.add_argument("--out", default="bench/results/hf_roundtrip.md", help="markdown file to write")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: a JSON job run in a subprocess
    args = p.parse_args(argv)
    bad = (set(args.families.split(",")) - set(FAMILIES)) | (set(args.tools.split(",")) - set(TOOLS))
    if bad and not args.worker:
        p.error(f"unknown families/tools {sorted(bad)}")
    return args


# --------------------------------------------------------------------------------------------- models


def build(family: str):
    """The family's model in its default config (eval mode) and a batch of token ids with an attention mask."""
    import transformers

    config_cls, model_cls, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    assert model.config.use_cache and model.config.use_return_dict  # the default config, as from_pretrained gives
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def count(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def short(e: BaseException, n: int = 90) -> str:
    """``Type: message`` on one line, cut to ``n`` characters."""
    text = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= n else text[: n - 3] + "..."


# --------------------------------------------------------------------------------------------- the two tools


def prune_graphopt(model, inputs, family: str, notes: list[str]):
    """graphopt's pruned model of the caller's class (``optimize`` + ``to_model``)."""
    import graphopt

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", graphopt.GraphoptWarning)
        res = graphopt.optimize(model, f"prune-channels:ratio={RATIO}{FAMILIES[family][3]}", inputs)
        pruned = res.to_model()
    for w in caught:
        if issubclass(w.category, graphopt.GraphoptWarning):
            notes.append("graphopt warns: " + str(w.message).split(";")[0][:120])
    with torch.no_grad():  # the written-back model computes what the verified graph computes
        if not torch.allclose(pruned(**inputs).logits, res.module(**inputs).logits, rtol=1e-4, atol=1e-4):
            notes.append("to_model() differs from the graph")
    return pruned


def tp_hints(model):
    """``num_heads`` and ``out_channel_groups`` as the LLM example builds them (fused qkv: one entry)."""
    cfg = model.config
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    num_heads, groups = {}, {}
    for m in model.modules():
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj")):
            num_heads.update({m.q_proj: heads, m.k_proj: kv, m.v_proj: kv})
        for fused in ("qkv_proj", "query_key_value", "c_attn"):  # Phi-3, GPT-NeoX, GPT-2
            if isinstance(getattr(m, fused, None), torch.nn.Module):
                num_heads[getattr(m, fused)] = heads
        if isinstance(getattr(m, "gate_up_proj", None), torch.nn.Linear):
            groups[m.gate_up_proj] = 2
    return num_heads, groups


def width(layer, dim: str) -> int:
    """``out``/``in`` width of a Linear or of transformers' Conv1D (GPT-2)."""
    if isinstance(layer, torch.nn.Linear):
        return layer.out_features if dim == "out" else layer.in_features
    return layer.weight.shape[1] if dim == "out" else layer.weight.shape[0]  # Conv1D stores (in, out)


def tp_edit(model, orig_heads: int, orig_kv: int) -> list[str]:
    """The example's hand edits after ``step()``: config and module attributes from the pruned widths."""
    cfg, edits = model.config, []
    hidden = model.lm_head.in_features
    cfg.hidden_size = hidden  # GPT-2: an alias of n_embd
    edits.append("hidden_size")
    heads = kv = None
    for m in model.modules():
        hd = getattr(m, "head_dim", None) or getattr(m, "head_size", None)
        if not isinstance(hd, int):
            continue
        if all(hasattr(m, a) for a in ("q_proj", "k_proj")):
            heads, kv = m.q_proj.out_features // hd, m.k_proj.out_features // hd
        elif hasattr(m, "qkv_proj"):  # [q | k | v], tp prunes q and kv heads in the same proportion
            total = m.qkv_proj.out_features // hd
            heads = total * orig_heads // (orig_heads + 2 * orig_kv)
            kv = (total - heads) // 2
        elif hasattr(m, "query_key_value") or hasattr(m, "c_attn"):
            heads = kv = width(getattr(m, "query_key_value", None) or m.c_attn, "out") // (3 * hd)
        else:
            continue
        for attr, value in (("num_heads", heads), ("num_key_value_heads", kv), ("num_key_value_groups", heads // kv),
                            ("embed_dim", heads * hd), ("split_size", heads * hd), ("hidden_size", heads * hd)):
            if hasattr(m, attr):
                setattr(m, attr, value)
    if heads:
        cfg.num_attention_heads = heads
        edits.append("num_attention_heads")
        if getattr(cfg, "num_key_value_heads", None) is not None:
            cfg.num_key_value_heads = kv
            edits.append("num_key_value_heads")
        if getattr(cfg, "head_dim", None) is not None:
            edits.append("head_dim (unchanged)")
    inter = None
    for m in model.modules():
        for name in ("gate_proj", "fc1", "dense_h_to_4h", "c_fc", "gate_up_proj"):
            if isinstance(getattr(m, name, None), torch.nn.Module):
                inter = width(getattr(m, name), "out") // (2 if name == "gate_up_proj" else 1)
                for attr in ("intermediate_size", "hidden_size"):
                    if hasattr(m, attr):
                        setattr(m, attr, inter if attr == "intermediate_size" else hidden)
                break
    if inter:
        key = {"opt": "ffn_dim", "gpt2": "n_inner"}.get(cfg.model_type, "intermediate_size")
        setattr(cfg, key, inter)
        edits.append(key)
    if cfg.model_type == "opt":
        cfg.word_embed_proj_dim = model.get_input_embeddings().embedding_dim
        edits.append("word_embed_proj_dim")
    return edits


def prune_tp(model, inputs, family: str, notes: list[str]):
    """tp's pruned model (the LLM example's recipe, see the module docstring), edited by hand."""
    import torch_pruning as tp

    cfg = model.config

    def pruner_for(m):
        num_heads, groups = tp_hints(m)
        return tp.pruner.MetaPruner(
            m, example_inputs=inputs["input_ids"], importance=tp.importance.GroupMagnitudeImportance(p=2),
            global_pruning=False, pruning_ratio=RATIO, ignored_layers=[m.lm_head], num_heads=num_heads,
            prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=RATIO, out_channel_groups=groups,
            round_to=4)

    pruner = None
    if not notes:  # the first run tries the default config (use_cache=True) on a copy of its own
        try:
            trial = copy.deepcopy(model)
            pruner, model = pruner_for(trial), trial
            notes.append("tp default config: ok")
        except Exception as e:  # noqa: BLE001 - recorded, then retried the way the example's users do
            notes.append(f"tp default config: {short(e, 60)}; pruned with config.use_cache=False")
    elif notes[0] == "tp default config: ok":  # later runs repeat what worked
        pruner = pruner_for(model)
    if pruner is None:
        model.config.use_cache = False
        pruner = pruner_for(model)
    pruner.step()
    edits = tp_edit(model, cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or
                    cfg.num_attention_heads)
    model.config.use_cache = True
    if not any(n.startswith("tp edited") for n in notes):
        notes.append("tp edited " + ", ".join(edits) + " by hand")
    return model.eval()


PRUNERS = {"graphopt": prune_graphopt, "tp": prune_tp}


# --------------------------------------------------------------------------------------------- checks


@torch.no_grad()
def check(model, pruned, inputs) -> dict:
    """pruned / forward / generate / reload cells for a pruned model."""
    from transformers import AutoModelForCausalLM

    out = {"params": [count(model), count(pruned)]}
    out["pruned"] = "yes" if out["params"][1] < out["params"][0] else "no"
    try:
        logits = pruned(**inputs).logits
        want = (BATCH, SEQ, VOCAB)
        out["forward"] = ("yes" if tuple(logits.shape) == want and torch.isfinite(logits).all() else
                          f"broken: logits {tuple(logits.shape)}, finite={bool(torch.isfinite(logits).all())}")
    except Exception as e:  # noqa: BLE001 - the failure is the finding
        out["forward"] = f"error: {short(e)}"
        return out
    try:
        prompt = dict(inputs, max_new_tokens=NEW, do_sample=False)
        cached = pruned.generate(**prompt, use_cache=True)
        plain = pruned.generate(**prompt, use_cache=False)
        out["generate"] = ("yes" if torch.equal(cached, plain) and cached.shape == (BATCH, SEQ + NEW) else
                           f"no: {int((cached != plain).sum())} of {cached.numel()} tokens differ")
    except Exception as e:  # noqa: BLE001
        out["generate"] = f"error: {short(e)}"
    try:
        with tempfile.TemporaryDirectory() as folder:
            pruned.save_pretrained(folder)
            again = AutoModelForCausalLM.from_pretrained(folder).eval()
        if type(again) is not type(pruned):
            out["reload"] = f"broken: reloaded as {type(again).__name__}"
        else:
            diff = (again(**inputs).logits - pruned(**inputs).logits).abs().max().item()
            out["reload"] = "yes" if diff == 0 else f"broken: logits differ by up to {diff:.2g}"
    except Exception as e:  # noqa: BLE001
        out["reload"] = f"error: {short(e)}"
    return out


class Notes(list):
    """Notes that are also printed as they come, so a worker that hangs later still reports them."""

    def append(self, note: str) -> None:
        if note not in self:
            super().append(note)
            print(NOTE + json.dumps(note), flush=True)


def job_run(job: dict) -> dict:
    """One (tool, family) attempt: prune (timed, 1 or 3 runs on fresh copies), then the checks."""
    model, inputs = build(job["family"])
    prune, notes, times, pruned = PRUNERS[job["tool"]], Notes(), [], None
    try:
        for i in range(3):
            fresh = copy.deepcopy(model)
            faulthandler.dump_traceback_later(job["timeout"], exit=True)  # a hang prints its stack and exits
            start = time.perf_counter()
            with torch.enable_grad():  # tp traces with autograd
                pruned = prune(fresh, inputs, job["family"], notes)
            times.append(time.perf_counter() - start)
            faulthandler.cancel_dump_traceback_later()
            if times[0] >= CHEAP_S:
                break
    except Exception as e:  # noqa: BLE001
        where = [f.name for f in traceback.extract_tb(e.__traceback__) if "torch_pruning" in f.filename
                 or "/graphopt/" in f.filename]
        return {"status": f"error: {short(e)}" + (f" (in {where[-1]})" if where else ""), "notes": notes}
    return {"status": "ok", "notes": notes, "seconds": statistics.median(times), "runs": len(times),
            **check(model, pruned, inputs)}


def worker(job: dict) -> None:
    """Subprocess entry: run ``job`` and print its JSON result after TAG on stdout."""
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    print(TAG + json.dumps(job_run(job)), flush=True)


def hang_site(stderr: str) -> str:
    """The pruning functions a timed-out worker was in (outermost first), from faulthandler's dump."""
    frames = re.findall(r'File "([^"]+)", line \d+ in (\w+)', stderr.split("Timeout (", 1)[-1])
    lib = [fn for path, fn in reversed(frames) if "torch_pruning" in path or "/graphopt/" in path]
    return " > ".join(dict.fromkeys(lib[1:4])) or "outside the pruning library"


def spawn(job: dict) -> dict:
    """Run ``job`` in a fresh interpreter; a timeout is "hang", a crash without a result is "error"."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=job["timeout"] + 120, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": f"hang (> {job['timeout']} s, not in pruning)"}
    lines = proc.stdout.splitlines()
    for line in reversed(lines):
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    notes = [json.loads(line[len(NOTE):]) for line in lines if line.startswith(NOTE)]
    if "Timeout (" in proc.stderr:
        return {"status": f"hang (> {job['timeout']} s in {hang_site(proc.stderr)})", "notes": notes}
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": f"error: exit {proc.returncode}: {last[:80]}", "notes": notes}


# --------------------------------------------------------------------------------------------- report


def round_trip(r: dict) -> bool:
    """Pruned, runs, generates consistently and reloads identically."""
    return r.get("status") == "ok" and all(r.get(k) == "yes" for k in ("pruned", "forward", "generate", "reload"))


def row(family: str, tool: str, r: dict) -> str:
    """One markdown table row."""
    notes = "; ".join(r.get("notes", [])).replace("|", "/")
    if family == "gemma" and tool == "graphopt":
        notes = "ignore=[model.embed_tokens] (as in tests/test_hf_roundtrip.py)" + (f"; {notes}" if notes else "")
    if r["status"] != "ok":
        cells = (r["status"].replace("|", "/"), "-", "-", "-", "-", "-", notes)
        return "| " + " | ".join((family, tool, *cells)) + " |"
    before, after = r["params"]
    params = f"{before:,} -> {after:,} ({after / before:.0%})"
    secs = f"{r['seconds']:.2f} ({'median of 3' if r['runs'] == 3 else '1 run'})"
    vals = (params, r["pruned"], r["forward"], r.get("generate", "-"), r.get("reload", "-"), secs, notes)
    return "| " + " | ".join((family, tool, *vals)) + " |"


def table(results: dict) -> str:
    """Markdown table: one row per (family, tool)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += [row(f, t, r) for f, by_tool in results.items() for t, r in by_tool.items()]
    return "\n".join(lines)


def summary(results: dict, tools: list[str]) -> str:
    """How many families each tool takes through the whole round trip, and where the others stop."""
    lines = []
    for tool in tools:
        ok = [f for f, by in results.items() if round_trip(by[tool])]
        lines.append(f"- **{tool}: {len(ok)}/{len(results)} families through the whole round trip** "
                     f"(pruned, forward, generate with cache = without, save + from_pretrained identical): "
                     f"{', '.join(ok) or 'none'}")
        stops = {}
        for f, by in results.items():
            r = by[tool]
            if round_trip(r):
                continue
            why = (r["status"].split(" (")[0].split(":")[0] if r["status"] != "ok" else
                   next(f"{k} {r[k].split(':')[0]}" for k in ("pruned", "forward", "generate", "reload")
                        if r.get(k, "yes") != "yes"))
            stops.setdefault(why, []).append(f)
        lines += [f"  - {why}: {', '.join(fs)}" for why, fs in stops.items()]
    return "\n".join(lines)


def versions() -> str:
    """torch, transformers, graphopt and torch-pruning versions."""
    import graphopt

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"
    return (f"torch {torch.__version__}, transformers {v('transformers')}, graphopt {graphopt.__version__}, "
            f"torch-pruning {v('torch-pruning')}")


def header(args: argparse.Namespace) -> str:
    """Provenance lines: command, date, CPU, versions and how each tool was called."""
    return provenance(
        "Hugging Face round trip: graphopt vs Torch-Pruning",
        f"- versions: {versions()}",
        f"- models: 2-layer decoders, hidden 64, 4 heads (2 KV heads where the family has GQA), vocab {VOCAB}, "
        "default configs (use_cache=True), seeded random weights; inputs: input_ids + attention_mask, batch "
        f"{BATCH} x {SEQ} tokens; generate: greedy, {NEW} new tokens",
        f"- ratio {RATIO}; 1 torch thread; a pruning call running past {args.timeout} s is a hang; "
        f"prune time: median of 3 runs when the first is under {CHEAP_S:.0f} s, else 1 run",
        "- graphopt: `res = graphopt.optimize(model, \"prune-channels:ratio=0.5\", batch)`; "
        "`pruned = res.to_model()` (time: both calls)",
        "- tp: Torch-Pruning's LLM example recipe (examples/LLMs/prune_llm.py): `MetaPruner(model, input_ids, "
        "importance=GroupMagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=[lm_head], "
        "num_heads={q/k/v_proj: heads/kv heads, or fused qkv: heads}, prune_num_heads=True, "
        "prune_head_dims=False, head_pruning_ratio=0.5, out_channel_groups={gate_up_proj: 2}, round_to=4, "
        "global_pruning=False)`, `pruner.step()`, then config and module attributes edited by hand "
        "(see the script; time: all three). Tried on the default config first, then with config.use_cache=False",
        "- columns: params before -> after (after as % of before); pruned = fewer parameters; forward = runs "
        "with finite logits of the original's shape; generate = greedy tokens with the KV cache equal those "
        "without it; save + from_pretrained = `AutoModelForCausalLM.from_pretrained` of the saved folder gives the "
        "same class and bit-identical logits",
    )


def main(argv: list[str] | None = None) -> None:
    """Run every (family, tool) attempt, print the markdown report and write it to ``--out``."""
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    tools = args.tools.split(",")
    results, begin = {}, time.perf_counter()
    for family in args.families.split(","):
        results[family] = {}
        for tool in tools:
            start = time.perf_counter()
            results[family][tool] = r = spawn({"family": family, "tool": tool, "timeout": args.timeout})
            status = r["status"] if r["status"] != "ok" else ("round trip ok" if round_trip(r) else
                                                              {k: r.get(k) for k in ("pruned", "forward", "generate",
                                                                                     "reload")})
            print(f"{family} {tool}: {status} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    took = f"- the whole bench took {time.perf_counter() - begin:.0f} s ({len(results) * len(tools)} subprocesses)"
    publish(f"{header(args)}\n\n{table(results)}\n\n{summary(results, tools)}\n{took}\n", args.out)


if __name__ == "__main__":
    main()
