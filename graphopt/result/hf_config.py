"""Hugging Face configs after a write-back: one table of where each family keeps its sizes, one updater.

A ``transformers`` model is rebuilt by ``from_pretrained`` from its ``config`` alone, so after pruning the config
must describe the new module shapes: hidden size, attention and key/value heads, head_dim, intermediate size,
number of layers and per-layer lists (``layer_types``), and for mixture-of-experts families the expert count,
top-k and the routed / shared experts' widths (``MOE_WIDTHS``); ``layer_idx`` of the kept layers is renumbered so
that the KV cache indexes the right slot. Family knowledge (module names, config field names) lives in ``FAMILIES``
and ``MOE_WIDTHS`` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Family:
    """Where a family keeps its sizes, relative to one layer of its layer list.

    ``q``/``k``: query/key projections; ``qkv``: a fused projection and how many equal parts it holds (GPT-2's
    ``c_attn``: 3) or None for (heads + 2 * kv_heads) * head_dim (Phi-3); ``up``: the MLP's widening layer (a fused
    gate+up counts half); ``intermediate``: the config field of the MLP width; ``head_dim``: whether the family's
    attention reads its head width from the config field ``head_dim_field`` (else it derives hidden_size //
    num_attention_heads); ``root_widths``: (module under the model root, config field of its output width), for
    heads outside the layer list whose input and output widths are one field (DeBERTa's pooler)."""

    layers: str
    q: str = ""
    k: str = ""
    qkv: str = ""
    qkv_parts: int | None = 3
    up: str = ""
    up_fused: bool = False
    intermediate: str = "intermediate_size"
    head_dim: bool = True  # the attention reads config.<head_dim_field> (else head_dim = hidden_size // heads)
    head_dim_field: str = "head_dim"
    root_widths: tuple = ()
    o: str = ""  # the attention's output projection: its input width counts the query heads of a (h + 2 kv) qkv
    embed_fields: tuple = ()  # more config fields that hold the embedding width (OPT's word_embed_proj_dim)
    embed_scaled: bool = False  # embeddings are scaled by sqrt(hidden_size) (Gemma): that scale cannot change
    norms: tuple = ()  # (norm module, config field of its width): DeepSeek's low-rank attention (q_lora_rank)


_LLAMA = Family("model.layers", q="self_attn.q_proj", k="self_attn.k_proj", up="mlp.up_proj")
FAMILIES: dict[str, Family] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite", "smollm3", "cohere",
                           "stablelm")},
    **{t: Family("model.layers", q="self_attn.q_proj", k="self_attn.k_proj", up="mlp.up_proj", embed_scaled=True)
       for t in ("gemma", "gemma2", "gemma3_text")},
    # mixture-of-experts decoders: no MLP width tracked (it lives in fused expert tensors; update_experts below
    # keeps their count), and DeepSeek's latent attention has no q_proj of heads * head_dim rows
    **{t: Family("model.layers", q="self_attn.q_proj", k="self_attn.k_proj") for t in ("mixtral", "qwen2_moe",
                                                                                        "qwen3_moe", "olmoe", "gpt_oss")},
    "deepseek_v3": Family("model.layers", norms=(("self_attn.q_a_layernorm", "q_lora_rank"),
                                                 ("self_attn.kv_a_layernorm", "kv_lora_rank"))),
    "phi3": Family("model.layers", qkv="self_attn.qkv_proj", qkv_parts=None, up="mlp.gate_up_proj", up_fused=True,
                   o="self_attn.o_proj"),
    "phi": Family("model.layers", q="self_attn.q_proj", k="self_attn.k_proj", up="mlp.fc1"),
    "gpt2": Family("transformer.h", qkv="attn.c_attn", up="mlp.c_fc", intermediate="n_inner", head_dim=False),
    "gpt_neox": Family("gpt_neox.layers", qkv="attention.query_key_value", up="mlp.dense_h_to_4h", head_dim=False),
    "opt": Family("model.decoder.layers", q="self_attn.q_proj", k="self_attn.k_proj", up="fc1", intermediate="ffn_dim",
                  head_dim=False, embed_fields=("word_embed_proj_dim",)),
    "falcon": Family("transformer.h", qkv="self_attention.query_key_value", qkv_parts=None, o="self_attention.dense",
                     up="mlp.dense_h_to_4h", intermediate="ffn_hidden_size", head_dim=False),
    "bloom": Family("transformer.h", qkv="self_attention.query_key_value", up="mlp.dense_h_to_4h",
                    intermediate="", head_dim=False),
    "bert": Family("encoder.layer", q="attention.self.query", k="attention.self.key", up="intermediate.dense",
                   head_dim=False),
    "roberta": Family("encoder.layer", q="attention.self.query", k="attention.self.key", up="intermediate.dense",
                      head_dim=False),
    "vit": Family("encoder.layer", q="attention.attention.query", k="attention.attention.key",
                  up="intermediate.dense", head_dim=False),
    "deberta-v2": Family("encoder.layer", q="attention.self.query_proj", k="attention.self.key_proj",
                         up="intermediate.dense", head_dim_field="attention_head_size",
                         root_widths=(("pooler.dense", "pooler_hidden_size"),)),
}


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (without importing transformers if it is absent)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def update_config(model: nn.Module, deleted: list[tuple[str, int]]) -> list[str]:
    """Make ``model.config`` describe its modules; renumber ``layer_idx``. Returns warnings (sizes the config
    cannot describe: widths that differ per layer, an unknown family)."""
    config = model.config
    family = FAMILIES.get(config.model_type)
    layers = _layer_list(model, family)
    head_dim = _head_dim(config, family)  # before the hidden size changes: configs without head_dim derive it from that
    _drop_layers(model, config, layers, deleted)
    update_experts(model)
    notes = update_moe_widths(model, layers)
    embeddings = model.get_input_embeddings()
    if isinstance(embeddings, nn.Embedding) and embeddings.embedding_dim != config.hidden_size:
        if family is not None and family.embed_scaled:
            notes.append(f"{config.model_type} scales its embeddings by sqrt(hidden_size); the pruned graph keeps "
                         f"sqrt({config.hidden_size}), a config of hidden size {embeddings.embedding_dim} would not, so "
                         "from_pretrained cannot rebuild this model: keep the hidden size "
                         "(ignore=[model.embed_tokens]) or save it with torch.save")
        for name in ("hidden_size", *(family.embed_fields if family else ())):
            _set(config, name, embeddings.embedding_dim)
    if family is None:
        return [f"{type(model).__name__} (model_type '{config.model_type}') has no entry in graphopt.result.hf_config."
                "FAMILIES: only the hidden size and layer count of its config were updated"]
    if layers is None:
        return notes + [f"{type(model).__name__} keeps no layer list at '{family.layers}' (graphopt.result.hf_config."
                        "FAMILIES): its heads and MLP widths were not written to the config"]
    if not len(layers):
        return notes
    return notes + _update_widths(config, family, layers, head_dim) + _update_root_widths(model, family)


_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")  # one config field per family
_EXPERT_ATTRS = ("num_experts", "n_routed_experts", "num_local_experts")  # the MoE modules' copies of it
_TOP_K_ATTRS = ("top_k", "num_experts_per_tok")


def update_experts(model: nn.Module) -> None:
    """After experts were removed (prune-experts): the config's expert count, its top-k capped by it, and the same
    counts held by the MoE modules (routers, experts, blocks). The count is read off the fused expert tensors
    ``[num_experts, ...]``; a model whose MoE layers disagree is left for the write-back check to report."""
    config = model.config
    old = next((getattr(config, f) for f in _EXPERT_FIELDS if isinstance(getattr(config, f, None), int)), None)
    if old is None:
        return
    found = {p.shape[0] for name, p in model.named_parameters()
             if p.dim() == 3 and name.rpartition(".")[0].endswith("experts")}
    if len(found) != 1 or (new := found.pop()) == old:
        return
    for f in _EXPERT_FIELDS:
        if f in vars(config):
            setattr(config, f, new)
    k = getattr(config, "num_experts_per_tok", None)
    if isinstance(k, int) and k > new:
        config.num_experts_per_tok = new
    for module in model.modules():
        for attr in _EXPERT_ATTRS:
            if getattr(module, attr, None) == old and isinstance(vars(module).get(attr), int):
                setattr(module, attr, new)
        for attr in _TOP_K_ATTRS:
            if isinstance(vars(module).get(attr), int) and getattr(module, attr) > new:
                setattr(module, attr, new)


@dataclass(frozen=True)
class MoeWidths:
    """Where a mixture-of-experts family keeps its MLP widths: ``experts`` (the config field of the routed experts'
    width), its shared expert module (``shared``, under the MoE block) with its field and the config field that
    multiplies it (DeepSeek's shared experts are ``moe_intermediate_size * n_shared_experts`` wide), and ``dense``:
    the field of the plain MLP layers some layers keep (DeepSeek's first layers, Qwen2-MoE's ``mlp_only_layers``)."""

    experts: str
    shared: str = ""
    shared_field: str = ""
    shared_times: str = ""
    dense: str = "intermediate_size"


MOE_WIDTHS: dict[str, MoeWidths] = {
    "mixtral": MoeWidths("intermediate_size"),
    "olmoe": MoeWidths("intermediate_size"),
    "gpt_oss": MoeWidths("intermediate_size"),
    "qwen3_moe": MoeWidths("moe_intermediate_size"),
    "qwen2_moe": MoeWidths("moe_intermediate_size", "shared_expert", "shared_expert_intermediate_size"),
    "deepseek_v3": MoeWidths("moe_intermediate_size", "shared_experts", "moe_intermediate_size", "n_shared_experts"),
}


def update_moe_widths(model: nn.Module, layers: nn.ModuleList | None) -> list[str]:
    """After prune-channels: the config fields of a mixture-of-experts family's MLP widths (``MOE_WIDTHS``), read
    off each layer's routed experts (the fused ``down_proj``), shared expert and plain MLP. Returns warnings for a
    field whose layers disagree (the config holds one value)."""
    config = model.config
    family = MOE_WIDTHS.get(config.model_type)
    if family is None or layers is None:
        return []
    seen: dict[str, set[int]] = {}
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        experts = getattr(mlp, "experts", None)
        down = getattr(experts, "down_proj", None)
        if isinstance(down, torch.Tensor) and down.dim() == 3:
            seen.setdefault(family.experts, set()).add(down.shape[1 if getattr(experts, "is_transposed", False) else 2])
            shared = getattr(mlp, family.shared, None) if family.shared else None
            if isinstance(getattr(shared, "up_proj", None), nn.Linear):
                times = getattr(config, family.shared_times, 1) if family.shared_times else 1
                seen.setdefault(family.shared_field, set()).add(shared.up_proj.out_features / times)
        elif isinstance(getattr(mlp, "up_proj", None), nn.Linear):
            seen.setdefault(family.dense, set()).add(mlp.up_proj.out_features)
    warnings = []
    for field, values in seen.items():
        if len(values) > 1 or not float(next(iter(values))).is_integer():
            warnings.append(f"the {config.model_type} config holds one {field}, but after pruning its layers would "
                            f"need {sorted(values)} (routed and shared experts and plain MLPs as it derives them), so "
                            "from_pretrained cannot rebuild it: prune them by one ratio, or save it with graphopt.save")
        else:
            _set(config, field, int(values.pop()))
    return warnings


def _layer_list(model: nn.Module, family: Family | None) -> nn.ModuleList | None:
    if family is None:
        return None
    prefixed = f"{model.base_model_prefix}.{family.layers}"  # a task model (BertForSequenceClassification.bert)
    for path in (family.layers, family.layers.partition(".")[2], prefixed):
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return found
    return None


def _drop_layers(model: nn.Module, config, layers: nn.ModuleList | None, deleted: list[tuple[str, int]]) -> None:
    """After layers were deleted: the layer count, per-layer config lists, and every ``layer_idx`` renumbered."""
    if layers is None:
        return
    old_count = config.num_hidden_layers
    gone = {index for path, index in deleted if model.get_submodule(path) is layers}
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == old_count and gone:
            setattr(config, key, [v for i, v in enumerate(value) if i not in gone])
    _set(config, "num_hidden_layers", len(layers))
    for i, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx") and isinstance(module.layer_idx, int):
                module.layer_idx = i


def _update_widths(config, family: Family, layers: nn.ModuleList, head_dim: int) -> list[str]:
    per_layer = [_widths(layer, family, head_dim) for layer in layers]
    warnings = []
    if any(w != per_layer[0] for w in per_layer):
        warnings.append(f"the layers of this {config.model_type} model have different widths after pruning "
                        f"({sorted(set(per_layer))}); its config can describe only one, so from_pretrained cannot "
                        "rebuild it: save it with graphopt.save or torch.save, or prune with uniform widths")
    heads, kv_heads, intermediate = per_layer[0]
    if heads:
        _set(config, "num_attention_heads", heads)
    if kv_heads and hasattr(config, "num_key_value_heads"):
        _set(config, "num_key_value_heads", kv_heads)
    if heads and family.head_dim:
        setattr(config, family.head_dim_field, head_dim)  # explicit: hidden_size // heads may no longer give it
    elif heads and heads * head_dim != config.hidden_size:
        warnings.append(f"{config.model_type} configs derive head_dim from hidden_size / num_attention_heads; "
                        f"{heads} heads of {head_dim} no longer fit hidden size {config.hidden_size}, so "
                        "from_pretrained cannot rebuild this model: save it with torch.save or graphopt.save")
    if intermediate and family.intermediate:
        _set(config, family.intermediate, intermediate)
    for path, name in family.norms:
        found = {layer.get_submodule(path).weight.shape[0] for layer in layers if _has_module(layer, path)}
        if len(found) == 1:
            _set(config, name, found.pop())
        elif found:
            warnings.append(f"the layers of this {config.model_type} model need different {name} after pruning "
                            f"({sorted(found)}); its config holds one, so from_pretrained cannot rebuild it")
    return warnings


def _update_root_widths(model: nn.Module, family: Family) -> list[str]:
    """Config fields of modules outside the layer list (``Family.root_widths``): a square layer's width."""
    notes = []
    for path, name in family.root_widths:
        module = next((m for p in (path, f"{model.base_model_prefix}.{path}") if _has_module(model, p)
                       for m in [model.get_submodule(p)]), None)
        if not isinstance(module, nn.Linear):
            continue
        if module.in_features != module.out_features:
            notes.append(f"{model.config.model_type} configs give '{path}' one width ({name}), but after pruning it "
                         f"maps {module.in_features} to {module.out_features} features, so from_pretrained cannot "
                         f"rebuild it: prune its output like the hidden size (ignore=[{path}]) or save it with "
                         "graphopt.save")
        else:
            _set(model.config, name, module.out_features)
    return notes


def _has_module(layer: nn.Module, path: str) -> bool:
    try:
        layer.get_submodule(path)
        return True
    except AttributeError:
        return False


def _head_dim(config, family: Family | None) -> int:
    explicit = getattr(config, family.head_dim_field if family else "head_dim", None)
    return int(explicit) if explicit else config.hidden_size // config.num_attention_heads


def _widths(layer: nn.Module, family: Family, head_dim: int) -> tuple[int, int, int]:
    """(heads, key/value heads, MLP width) of one layer, from its weights."""
    heads = kv = 0
    if family.q:
        heads = _out(layer, family.q) // head_dim
        kv = _out(layer, family.k) // head_dim
    elif family.qkv and family.qkv_parts:
        heads = kv = _out(layer, family.qkv) // family.qkv_parts // head_dim
    elif family.qkv:  # (heads + 2 kv) * head_dim rows; the output projection reads heads * head_dim
        heads = _in(layer, family.o) // head_dim
        kv = (_out(layer, family.qkv) // head_dim - heads) // 2
    up = _out(layer, family.up) if family.up else 0
    return heads, kv, up // 2 if family.up_fused else up


def _out(layer: nn.Module, path: str) -> int:
    try:
        module = layer.get_submodule(path)
    except AttributeError:
        return 0
    if isinstance(module, nn.Sequential):  # a low-rank pair: the second layer gives the width
        module = module[-1]
    if not hasattr(module, "weight"):  # graphopt's kernel modules (QuantLinear, SparseLinear) hold packed weights
        return module.out_features
    weight = module.weight
    return weight.shape[1] if type(module).__name__ == "Conv1D" else weight.shape[0]


def _in(layer: nn.Module, path: str) -> int:
    module = layer.get_submodule(path)
    if isinstance(module, nn.Sequential):
        module = module[0]
    return module.weight.shape[1] if hasattr(module, "weight") else module.in_features


def _set(config, field: str, value) -> None:
    if field and (hasattr(config, field) or field in getattr(config, "attribute_map", {})):
        setattr(config, field, value)


def sync_sizes_with_config(model: nn.Module) -> None:
    """Set the size attributes of ``model``'s modules (``num_key_value_groups``, ``head_dim``, ...) to what a model
    built from its updated config has: the config is what ``from_pretrained`` rebuilds from, so it decides. The
    reference is built on the meta device (no memory, no initialization); a config the class cannot build from
    leaves the attributes as the write-back set them (its check then names any that disagree)."""
    import torch

    from graphopt.result.writeback_sizes import plain_size_attributes

    try:
        with torch.device("meta"):
            reference = type(model)(model.config)
    except Exception:  # noqa: BLE001 - the config's own problem is reported by the write-back check
        return
    fresh = dict(reference.named_modules())
    for path, module in model.named_modules():
        twin = fresh.get(path)
        if twin is None or type(twin) is not type(module):
            continue
        wanted = dict(plain_size_attributes(twin))
        for attr, value in plain_size_attributes(module):
            if attr in wanted and wanted[attr] != value and type(wanted[attr]) is type(value):
                setattr(module, attr, wanted[attr])
