"""``graphopt.save`` / ``graphopt.load``: an optimized model as data, reloaded without running pickled code.

A pruned model no longer fits its class's constructor, so graphopt saves the optimized *graph* itself rather
than a replay of the passes (which would need every pass, users' own included, to record its decisions):

- the canonical ATen-level graph (what ``optimize`` returns; a lowered module is mapped back to it) as JSON,
  its call targets resolved on load only from an allowlist (see result/graph_json.py);
- the tensors it reads (parameters, buffers, constants: fake-quant scales included) as a flat ``{name: tensor}``;
- the per-pass report (provenance), a fingerprint of the original model's parameter names and shapes (when the
  original is given to ``save``), example inputs and the outputs they gave when saved;
- a SHA-256 over all of it.

All of that is one ``torch.save`` file of plain containers, strings and tensors, read back with
``torch.load(weights_only=True)``: unpickling refuses any other object, so no code from the file runs. Loading
checks the checksum, rebuilds the module, and runs it on the stored inputs: the outputs must equal the stored
ones. Every failure raises LoadError before anything is returned: never a half-loaded model.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from graphopt.result.optimize_result import OptimizeResult
from graphopt.result.graph_json import LoadError, SaveError, graph_from_json, graph_to_json
from graphopt.graph.module import GraphoptModule, modes_kept, sync_graph_mode
from graphopt.graph.inputs import ExampleInputs, flat_outputs
from graphopt.pipeline.report import PassRecord, Report
from graphopt.result.saving_modules import class_key, decode_module, encode_module, finish
from graphopt.graph.shapes import propagate

FORMAT = "graphopt.saved-graph/1"
__all__ = ["FORMAT", "LoadError", "SaveError", "fingerprint", "load", "save"]


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's parameter and buffer names, shapes and dtypes: which architecture it was built as."""
    items = [f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in model.state_dict().items()]
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def save(result: OptimizeResult | fx.GraphModule, path: str | os.PathLike, *, model: nn.Module | None = None,
         example_inputs: Any = None) -> Path:
    """Write an optimized model (an OptimizeResult or its GraphModule) to one file at ``path``; returns the path.

    ``model`` (the original, unoptimized model) records its fingerprint, so ``load(path, model=...)`` can check
    it gets the right one. ``example_inputs`` are stored with the outputs they give, for the check on load;
    without them, inputs are made from the graph's recorded input shapes (seeded random floats, zero integers).
    Raises SaveError, before writing anything, when the graph calls something that cannot be saved as data.
    """
    gm, report = (result.module, result.report) if isinstance(result, OptimizeResult) else (result, None)
    if not isinstance(gm, fx.GraphModule):
        raise SaveError(f"graphopt.save expects an OptimizeResult or a GraphModule, got {type(gm).__name__}")
    graph = graph_to_json(gm)
    tensors, layout = _collect_tensors(gm, graph)
    inputs = ExampleInputs.of(example_inputs) if example_inputs is not None else _inputs_from_meta(gm)
    in_leaves, in_spec = pytree.tree_flatten((list(inputs.args), inputs.kwargs))
    if not all(isinstance(x, torch.Tensor) for x in in_leaves):
        raise SaveError("graphopt.save stores tensor example inputs only; pass example_inputs made of tensors")
    with torch.no_grad(), _buffers_kept(gm), modes_kept(gm, training=False):  # eval: dropout would not reproduce
        outputs = [y.clone() for y in flat_outputs(inputs.call(gm))]
    meta = {
        "format": FORMAT, "torch": torch.__version__, "graph": graph, "tensors": layout,
        "capture": gm.meta.get("graphopt_capture", "unknown"),
        "report": _json_safe(report.to_dict()) if report is not None else None,
        "original": {"class": type(model).__name__, "fingerprint": fingerprint(model)} if model is not None else None,
        "check": {"in_spec": pytree.treespec_dumps(in_spec)},
    }
    payload = {"meta": json.dumps(meta, sort_keys=True), "tensors": tensors,
               "check_inputs": [x.detach() for x in in_leaves], "check_outputs": [y.detach() for y in outputs]}
    payload["sha256"] = _checksum(payload)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leave a half-written file under the real name
    return path


def load(path: str | os.PathLike, model: nn.Module | None = None, *, verify: bool = True) -> OptimizeResult:
    """Read a file written by ``graphopt.save``; returns an OptimizeResult (``.module``, ``.report``).

    Only data is read (``torch.load(weights_only=True)``) and call targets come from an allowlist. With
    ``model`` (a freshly built original model) the file must have been saved from a model of the same
    architecture, and opaque submodules the graph calls are taken from it. With ``verify`` the loaded module is
    run on the stored inputs and must reproduce the stored outputs (the run also records every node's shape, and
    ``module.meta["graphopt_example_inputs"]`` holds those inputs). Raises LoadError on any problem.
    """
    payload = _read(Path(path))
    try:
        meta = json.loads(payload["meta"])
    except (TypeError, ValueError) as e:
        raise LoadError(f"{path}: the graph description is not valid JSON ({e}); the file is corrupt") from e
    if meta.get("format") != FORMAT:
        raise LoadError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}; save it again with this graphopt")
    _check_original(meta, model, path)
    try:
        gm = _build(meta, payload["tensors"], model)
    except LoadError:
        raise
    except Exception as e:
        raise LoadError(f"{path}: the saved graph could not be rebuilt: {type(e).__name__}: {e}") from e
    _check_outputs(gm, meta, payload, path, verify)
    report = Report(meta["capture"])
    if meta.get("report"):
        report.records = [PassRecord(**r) for r in meta["report"]["passes"]]
    return OptimizeResult(gm, report)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise LoadError(f"{path}: no such file; give the path graphopt.save wrote")
    if not zipfile.is_zipfile(path):
        raise LoadError(f"{path}: not a readable graphopt file (no torch.save archive); it is corrupt, truncated or "
                        "not written by graphopt.save")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise LoadError(f"{path}: not a readable graphopt file ({first}); it is corrupt, truncated or "
                        "not written by graphopt.save") from e
    keys = {"meta", "tensors", "check_inputs", "check_outputs", "sha256"}
    if not isinstance(payload, dict) or set(payload) != keys:
        raise LoadError(f"{path}: not a graphopt file (expected the keys {sorted(keys)})")
    if _checksum(payload) != payload["sha256"]:
        raise LoadError(f"{path}: checksum mismatch: the file was corrupted or edited after graphopt.save wrote it")
    return payload


def _checksum(payload: dict) -> str:
    h = hashlib.sha256(payload["meta"].encode())
    named = [(f"t:{k}", v) for k, v in sorted(payload["tensors"].items())]
    named += [(f"i:{i}", v) for i, v in enumerate(payload["check_inputs"])]
    named += [(f"o:{i}", v) for i, v in enumerate(payload["check_outputs"])]
    for name, t in named:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _collect_tensors(gm: fx.GraphModule, graph: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor the graph reads by get_attr or through a called submodule, stored once per storage."""
    names = [n["target"] for n in graph["nodes"] if n["op"] == "get_attr"]
    modules = sorted({n["target"] for n in graph["nodes"] if n["op"] == "call_module"})
    for m in modules:
        names += [f"{m}.{k}" for k in gm.get_submodule(m).state_dict(keep_vars=True)]
    params = {id(p) for p in gm.parameters()}
    tensors, layout, seen = {}, {"attrs": {}, "modules": {}}, {}
    for name in dict.fromkeys(names):
        t = _resolve(gm, name)
        if not isinstance(t, torch.Tensor):
            raise SaveError(f"get_attr '{name}' reads a {type(t).__name__}, not a tensor; graphopt saves tensors only")
        entry = {"param": id(t) in params, "requires_grad": bool(t.requires_grad)}
        if id(t) in seen:  # tied weights stay tied
            entry["alias_of"] = seen[id(t)]
        else:
            seen[id(t)] = name
            tensors[name] = t.detach().cpu()
        layout["attrs"][name] = entry
    try:
        layout["modules"] = {m: encode_module(gm.get_submodule(m)) for m in modules}
    except ValueError as e:
        raise SaveError(f"cannot save: {e}; run the pipeline with calib_data= first") from e
    layout["training"] = gm.training
    return tensors, layout


def _resolve(root: nn.Module, qualname: str) -> Any:
    obj = root
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _inputs_from_meta(gm: fx.GraphModule) -> ExampleInputs:
    """Example inputs of the shapes the graph recorded: seeded random floats, zero integers."""
    gen = torch.Generator().manual_seed(0)
    leaves = []
    for node in gm.graph.find_nodes(op="placeholder"):
        tm = node.meta.get("tensor_meta")
        if tm is None or not hasattr(tm, "shape"):
            raise SaveError(f"input '{node.name}' has no recorded shape; pass example_inputs= to graphopt.save")
        shape = tuple(int(s) for s in tm.shape)
        leaves.append(torch.randn(shape, generator=gen).to(tm.dtype) if tm.dtype.is_floating_point
                      else torch.zeros(shape, dtype=tm.dtype))
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        args, kwargs = pytree.tree_unflatten(leaves, info.in_spec)
        return ExampleInputs(tuple(args), dict(kwargs))
    return ExampleInputs(tuple(leaves), {})


def _check_original(meta: dict, model: nn.Module | None, path) -> None:
    if model is None or meta.get("original") is None:
        return
    want = meta["original"]
    if fingerprint(model) != want["fingerprint"]:
        raise LoadError(f"{path} was saved from a different {want['class']} (its parameter names or shapes differ "
                        f"from the {type(model).__name__} given as model=); build the model with the same "
                        "configuration it was saved from")


def _build(meta: dict, tensors: dict, model: nn.Module | None) -> fx.GraphModule:
    """A fresh root module holding the saved tensors at their qualified names, and the graph over it."""
    root = nn.Module()
    layout = meta["tensors"]
    for name, entry in layout["modules"].items():
        _install(root, name, _submodule(model, name, entry, tensors))
    for name, entry in layout["attrs"].items():
        if any(name.startswith(m + ".") for m in layout["modules"]):
            continue
        source = entry.get("alias_of", name)
        if source not in tensors:
            raise LoadError(f"tensor '{source}' is missing from the saved file")
        t = tensors[source]
        if entry["param"] and "alias_of" not in entry:
            t = tensors[source] = nn.Parameter(t, requires_grad=entry["requires_grad"])
        _install(root, name, t)
    gm = GraphoptModule(root, graph_from_json(meta["graph"]), class_name="GraphModule")
    gm.meta["graphopt_capture"] = meta["capture"]
    gm.training = layout["training"]  # only this module's flag: the called submodules keep their own modes
    sync_graph_mode(gm)  # a file from a plain GraphModule may hold eval-mode nodes under training=True
    return gm


def _submodule(model: nn.Module | None, name: str, entry: dict, tensors: dict) -> nn.Module:
    """A submodule the graph calls: rebuilt from its saved config (graphopt's own modules, see result/saving_modules.py)
    or, for an opaque one, copied from the caller's ``model``; its tensors come from the file either way."""
    cls = entry["class"]
    sub = decode_module(entry)
    if sub is None:
        if model is None:
            raise LoadError(f"the saved graph calls the opaque submodule '{name}' ({cls}), whose code is not saved; "
                            "pass the freshly built original model: graphopt.load(path, model=...)")
        try:
            sub = copy.deepcopy(model.get_submodule(name))
        except AttributeError as e:
            raise LoadError(f"model= has no submodule '{name}' ({cls}) that the saved graph calls") from e
        if class_key(type(sub)) != cls:
            raise LoadError(f"model= has a {class_key(type(sub))} at '{name}', the saved graph a {cls}")
    state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
    _assign_state(sub, state, f"'{name}' ({cls})")
    finish(sub, entry)
    return sub


def _assign_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Put the saved tensors into ``module`` as they are: shapes may differ from a fresh instance (pruning,
    per-channel scales), which load_state_dict refuses; the set of names must match exactly."""
    want = set(module.state_dict(keep_vars=True))
    if set(state) != want:
        raise LoadError(f"the saved tensors of {what} do not fit it: missing {sorted(want - set(state))}, "
                        f"unexpected {sorted(set(state) - want)}")
    for key, t in state.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = module.get_submodule(owner_name)
        if isinstance(owner._parameters.get(leaf), nn.Parameter):
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=owner._parameters[leaf].requires_grad)
        else:
            owner._buffers[leaf] = t


def _install(root: nn.Module, qualname: str, value: Any) -> None:
    *path, leaf = qualname.split(".")
    owner = root
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, (nn.Module, nn.Parameter)):
        setattr(owner, leaf, value)
    else:
        owner.register_buffer(leaf, value)


def _check_outputs(gm: fx.GraphModule, meta: dict, payload: dict, path, verify: bool) -> None:
    """Run the stored inputs through the loaded graph (recording every node's shape, as after ``optimize``) and,
    with ``verify``, require the stored outputs."""
    args, kwargs = pytree.tree_unflatten(payload["check_inputs"], pytree.treespec_loads(meta["check"]["in_spec"]))
    gm.meta["graphopt_example_inputs"] = ExampleInputs(tuple(args), dict(kwargs))
    try:
        with _buffers_kept(gm), modes_kept(gm, training=False):  # the mode save checked in
            got = propagate(gm, gm.meta["graphopt_example_inputs"])
    except Exception as e:
        raise LoadError(f"{path}: the loaded model fails on its stored example inputs: {type(e).__name__}: {e}") from e
    if not verify:
        return
    try:  # bit-equal on the machine that saved; another CPU's kernels may round the last bit differently
        torch.testing.assert_close(got, payload["check_outputs"], equal_nan=True)
    except AssertionError as e:
        raise LoadError(f"{path}: the loaded model does not reproduce the outputs stored at save time "
                        f"({str(e).strip().splitlines()[0]}); the file does not match this torch/graphopt") from e


@contextlib.contextmanager
def _buffers_kept(module: nn.Module) -> Iterator[None]:
    """Undo in-place buffer updates of the block (a training-mode BatchNorm of QAT updates its running statistics
    on every call): checking a model must not change it."""
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def _json_safe(value: Any) -> Any:
    """Report stats may hold tuples, numpy scalars or objects: keep JSON types, turn the rest into text."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not (value == value and abs(value) != float("inf")):
        return repr(value)
    if isinstance(value, (type(None), bool, int, float, str)):
        return value
    if hasattr(value, "item"):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    return repr(value)
