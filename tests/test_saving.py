"""graphopt.save / graphopt.load: exact round trips of optimized graphs, and clear errors for bad files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.result.saving import FORMAT, LoadError, SaveError, load, save
from models import build
from util import outputs, rebatch


def _assert_exact(loaded, optimized, inputs):
    for batch in (inputs, rebatch(inputs, 3)):
        got, want = outputs(loaded, batch), outputs(optimized, batch)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenetv2", "vit"])
def test_pruned_round_trip_is_exact(tmp_path, name):
    case = build(name)
    res = graphopt.optimize(case.model, "fuse,prune-channels:ratio=0.5", case.example_inputs)
    path = save(res, tmp_path / f"{name}.graphopt", model=case.model)
    back = load(path, model=build(name).model)
    _assert_exact(back.module, res.module, case.example_inputs)
    assert graphopt.count_params(back.module) == graphopt.count_params(res.module) < graphopt.count_params(case.model)
    assert [r.name for r in back.report.records] == ["fuse", "prune-channels"]
    assert back.report.records[1].stats == res.report.records[1].stats
    assert back.capture == res.capture == "export"


def test_lowered_module_is_saved_as_its_aten_graph(tmp_path):
    case = build("resnet_basic")
    res = graphopt.optimize(case.model, "prune-channels:ratio=0.25", case.example_inputs)
    lowered = graphopt.streamline(res.module, case.example_inputs)
    back = load(save(lowered, tmp_path / "lowered.graphopt"))
    _assert_exact(back.module, lowered, case.example_inputs)
    assert "torch.ops.aten.conv2d.default" in back.module.code
    assert back.report.records == []


class _FakeQuantLinear(nn.Module):
    """A linear layer with int8 fake quantization of its weight (per channel) and input (per tensor)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.register_buffer("w_scale", torch.rand(8) * 0.01 + 0.005)
        self.register_buffer("w_zero", torch.zeros(8, dtype=torch.int32))
        self.register_buffer("x_scale", torch.tensor(0.05))
        self.register_buffer("x_zero", torch.tensor(0, dtype=torch.int32))

    def forward(self, x):
        x = torch.fake_quantize_per_tensor_affine(x, self.x_scale, self.x_zero, -128, 127)
        w = torch.fake_quantize_per_channel_affine(self.fc.weight, self.w_scale, self.w_zero, 0, -128, 127)
        return torch.nn.functional.linear(x, w, self.fc.bias)[:, 1:7:2]


def test_quantized_graph_keeps_scales_and_quant_ops(tmp_path):
    torch.manual_seed(0)
    model, x = _FakeQuantLinear().eval(), (torch.randn(4, 16),)
    res = graphopt.optimize(model, [], x)
    back = load(save(res, tmp_path / "q.graphopt", model=model), model=_FakeQuantLinear())
    _assert_exact(back.module, res.module, x)
    code = back.module.code
    assert "fake_quantize_per_channel_affine" in code and "fake_quantize_per_tensor_affine" in code
    torch.testing.assert_close(back.module.w_scale, model.w_scale, rtol=0, atol=0)
    assert back.module.w_zero.dtype == torch.int32


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(self.emb(ids))


def test_tied_weights_stay_tied(tmp_path):
    torch.manual_seed(0)
    model, ids = _Tied().eval(), (torch.randint(0, 20, (2, 5)),)
    res = graphopt.optimize(model, [], ids)
    back = load(save(res, tmp_path / "tied.graphopt"))
    _assert_exact(back.module, res.module, ids)
    assert back.module.emb.weight is back.module.out.weight
    assert graphopt.count_params(back.module) == 160


def test_opaque_leaf_module_needs_the_original_model(tmp_path):
    case = build("mlp")
    leaf = nn.BatchNorm1d  # kept opaque: a call_module node whose running statistics must travel too
    res = graphopt.optimize(case.model, [], case.example_inputs, capture="fx", leaf_modules=[leaf])
    if not any(n.op == "call_module" for n in res.module.graph.nodes):
        pytest.fail(f"expected an opaque {leaf.__name__} call in the fx capture of mlp:\n{res.module.code}")
    path = save(res, tmp_path / "leaf.graphopt")
    with pytest.raises(LoadError, match=r"opaque submodule .* pass the freshly built original model"):
        load(path)
    back = load(path, model=build("mlp").model)
    _assert_exact(back.module, res.module, case.example_inputs)


def test_wrong_model_is_refused(tmp_path):
    case = build("resnet_basic")
    path = save(graphopt.optimize(case.model, "fuse", case.example_inputs), tmp_path / "r.graphopt", model=case.model)
    with pytest.raises(LoadError, match=r"was saved from a different ResNet \(its parameter names or shapes "
                                        r"differ from the VGG given as model=\)"):
        load(path, model=build("vgg").model)


def test_truncated_file_is_a_clear_error(tmp_path):
    case = build("mlp")
    path = save(graphopt.optimize(case.model, "fuse", case.example_inputs), tmp_path / "m.graphopt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"not a readable graphopt file .* corrupt, truncated"):
        load(path)


def test_flipped_weight_byte_fails_the_checksum(tmp_path):
    case = build("mlp")
    path = save(graphopt.optimize(case.model, "fuse", case.example_inputs), tmp_path / "m.graphopt")
    payload = torch.load(path, weights_only=True)
    next(iter(payload["tensors"].values())).view(-1)[0] += 1.0
    torch.save(payload, path)
    with pytest.raises(LoadError, match="checksum mismatch"):
        load(path)


def _rewrite(path, edit):
    """Edit the JSON of a saved file and fix its checksum, as an attacker or a buggy tool could."""
    from graphopt.result.saving import _checksum

    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["meta"])
    edit(meta)
    payload["meta"] = json.dumps(meta)
    payload["sha256"] = _checksum(payload)
    torch.save(payload, path)


def test_target_off_the_allowlist_is_refused(tmp_path):
    case = build("mlp")
    path = save(graphopt.optimize(case.model, [], case.example_inputs), tmp_path / "m.graphopt")

    def evil(meta):
        node = next(n for n in meta["graph"]["nodes"] if n["op"] == "call_function")
        node["target"] = "os.system"

    _rewrite(path, evil)
    with pytest.raises(LoadError, match=r"calls 'os.system', which is not on graphopt's allowlist"):
        load(path)


def test_other_format_and_missing_file(tmp_path):
    case = build("mlp")
    path = save(graphopt.optimize(case.model, [], case.example_inputs), tmp_path / "m.graphopt")
    _rewrite(path, lambda meta: meta.update(format="graphopt.saved-graph/99"))
    with pytest.raises(LoadError, match=f"is not '{FORMAT}'"):
        load(path)
    with pytest.raises(LoadError, match="no such file"):
        load(tmp_path / "nope.graphopt")
    with pytest.raises(SaveError, match="expects an OptimizeResult or a GraphModule, got Linear"):
        save(nn.Linear(2, 2), tmp_path / "x.graphopt")


def test_function_off_the_allowlist_is_refused_at_save(tmp_path):
    case = build("mlp")
    res = graphopt.optimize(case.model, [], case.example_inputs)
    node = next(n for n in res.module.graph.nodes if n.op == "call_function")
    node.target = torch.nn.functional.relu  # a Python function: saving it would need pickled code
    with pytest.raises(SaveError, match=r"calls torch.nn.functional.relu, which graphopt cannot save"):
        save(res, tmp_path / "x.graphopt")
    assert not (tmp_path / "x.graphopt").exists()


def _calib(n=3):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(2, 3, 32, 32, generator=gen),) for _ in range(n)]


def test_layer_removed_round_trip_is_exact(tmp_path):
    case = build("resnet_basic")
    res = graphopt.optimize(case.model, "remove-layers:n=1,protect=[]", case.example_inputs, calib_data=_calib())
    assert res.report.records[0].modified and "removed=" in str(res.report)
    back = load(save(res, tmp_path / "rl.graphopt", model=case.model), model=build("resnet_basic").model)
    _assert_exact(back.module, res.module, case.example_inputs)
    assert graphopt.count_params(back.module) == graphopt.count_params(res.module) < graphopt.count_params(case.model)


@pytest.mark.parametrize("qat", [False, True])
def test_fake_quant_round_trip_keeps_quantizers(tmp_path, qat):
    from graphopt.quant.quantizer import quantizers

    case = build("resnet_basic")
    passes = f"prune-channels:ratio=0.5,remove-layers:n=1,protect=[],fake-quant:qat={str(qat).lower()}"
    res = graphopt.optimize(case.model, passes, case.example_inputs, calib_data=_calib())
    back = load(save(res, tmp_path / "q.graphopt", model=case.model))
    _assert_exact(back.module, res.module, case.example_inputs)
    want, got = quantizers(res.module), quantizers(back.module)
    assert sorted(got) == sorted(want) and len(got) > 10
    for name, q in want.items():
        assert (got[name].spec, got[name].state, got[name].training) == (q.spec, q.state, q.training), name
        torch.testing.assert_close(got[name].scale, q.scale, rtol=0, atol=0)
        assert got[name]._scale_value == q._scale_value
    assert back.module.training == res.module.training


def test_uncalibrated_quantizer_is_refused_at_save(tmp_path):
    from graphopt.quant.quantizer import quantizers

    case = build("resnet_basic")
    res = graphopt.optimize(case.model, "fake-quant", case.example_inputs, calib_data=_calib(1))
    next(iter(quantizers(res.module).values())).state = "observe"
    with pytest.raises(SaveError, match=r"quantizer of `.*` is not calibrated yet; run the pipeline with calib_data="):
        save(res, tmp_path / "q.graphopt")


class _Payload:
    """An object whose unpickling would run code: create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_in_the_file_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.graphopt"
    torch.save({"meta": "{}", "tensors": {}, "check_inputs": [], "check_outputs": [], "sha256": "",
                "extra": _Payload(marker)}, path)
    with pytest.raises(LoadError, match="not a readable graphopt file"):
        load(path)
    assert not marker.exists()
