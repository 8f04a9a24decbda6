"""export_onnx's routes: exporter="auto" tries dynamo, then legacy, a static batch only where the dynamic batch is
what fails; the report names the route that wrote the file and each failure; forced routes raise their own error;
all routes failing is one ExportError naming each. Small ConvNeXt- and Swin-style models, pruned and fake-quantized.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn

import graphopt
import graphopt.export.routes as routes
from graphopt import ExportError, GraphoptWarning, VerifyError, export_onnx
import util  # noqa: F401  (defines the graphopt_test::mystery op)


class ConvNeXtStyle(nn.Module):
    """Stem conv, one ConvNeXt block (depthwise 7x7, channels-last LayerNorm + MLP, layer scale), pooled head."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.fc2(nn.functional.gelu(self.fc1(self.norm(y))))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean([-2, -1]))


class SwinStyle(nn.Module):
    """Patch embed to 8x8 tokens, one windowed attention block (4x4 windows) with a relative position bias table
    indexed by a buffer, an MLP, a pooled head."""

    def __init__(self, dim: int = 16, ws: int = 4, heads: int = 2):
        super().__init__()
        self.ws, self.heads = ws, heads
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads) * 0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("index", rel[..., 0] * (2 * ws - 1) + rel[..., 1])
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x)  # (B, C, 8, 8)
        b, c, h, w = x.shape
        ws, n = self.ws, self.ws * self.ws
        t = self.norm1(x.permute(0, 2, 3, 1))
        win = t.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, c)
        q, k, v = self.qkv(win).reshape(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5 + bias).softmax(-1)
        win = self.proj((attn @ v).transpose(1, 2).reshape(-1, n, c))
        t = win.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, c)
        t = x.flatten(2).transpose(1, 2) + t
        t = t + self.mlp(self.norm2(t))
        return self.head(t.mean(1))


MODELS = {"convnext": ConvNeXtStyle, "swin": SwinStyle}


def _model(name: str, spec: str):
    torch.manual_seed(0)
    model, x = MODELS[name]().eval(), torch.randn(2, 3, 32, 32)
    calib = [(torch.randn(8, 3, 32, 32),) for _ in range(2)] if "fake-quant" in spec else None
    return graphopt.optimize(model, spec, (x,), calib_data=calib).module, x


@pytest.fixture
def dynamo_fails(monkeypatch):
    """The dynamo route raising what the issue reports for pruned ConvNeXt/Swin graphs."""
    def fail(*args, **kwargs):
        raise RuntimeError("UserError: Invalid ranges [2:1]")

    monkeypatch.setattr(routes, "_export_dynamo", fail)


@pytest.mark.parametrize("name", ["convnext", "swin"])
@pytest.mark.parametrize("spec", ["prune-channels:ratio=0.5", "fake-quant"])
def test_pruned_and_fake_quant_models_export_by_auto_with_a_dynamic_batch(name, spec, tmp_path):
    module, x = _model(name, spec)
    report = export_onnx(module, (x,), tmp_path / "m.onnx")
    assert report.exporter == "dynamo" and report.dynamic_batch and report.verified_batches == (2, 3)
    assert report.routes_tried == (("dynamo (dynamic batch)", None),)
    assert "routes:" not in str(report)  # one route, nothing to tell
    assert report.format == ("qdq-int8" if spec == "fake-quant" else "float")


def test_auto_falls_back_to_legacy_and_reports_the_dynamo_error(dynamo_fails, tmp_path):
    module, x = _model("convnext", "prune-channels:ratio=0.5")
    report = export_onnx(module, (x,), tmp_path / "m.onnx")
    assert report.exporter == "legacy" and report.dynamic_batch and report.verified_batches == (2, 3)
    (first, why), last = report.routes_tried
    assert first == "dynamo (dynamic batch)" and last == ("legacy (dynamic batch)", None)
    assert why == "the dynamo ONNX exporter could not export GraphModule: RuntimeError: UserError: Invalid ranges [2:1]."
    assert ("routes:     dynamo (dynamic batch) failed: the dynamo ONNX exporter could not export GraphModule: "
            "RuntimeError: UserError: Invalid ranges [2:1].; legacy (dynamic batch) wrote the file") in str(report)


def test_forced_routes_raise_their_own_error(dynamo_fails, tmp_path):
    module, x = _model("convnext", "prune-channels:ratio=0.5")
    with pytest.raises(ExportError, match=r"^the dynamo ONNX exporter could not export GraphModule: RuntimeError: "
                                          r"UserError: Invalid ranges \[2:1\]\. What you can do: try "
                                          r"exporter='legacy' \(the TorchScript exporter\) or exporter='auto'"):
        export_onnx(module, (x,), tmp_path / "m.onnx", exporter="dynamo")
    assert export_onnx(module, (x,), tmp_path / "m.onnx", exporter="legacy").exporter == "legacy"
    quantized, x = _model("convnext", "fake-quant")  # the TorchScript exporter knows no quantized_decomposed ops
    with pytest.raises(ExportError, match=r"^the legacy ONNX exporter could not export GraphModule at op "
                                          r"`quantized_decomposed::quantize_per_tensor.*try exporter='dynamo'"):
        export_onnx(quantized, (x,), tmp_path / "q.onnx", exporter="legacy")


def test_a_dynamic_batch_failing_everywhere_falls_back_to_a_static_batch_and_says_so(dynamo_fails, tmp_path):
    module, x = _model("swin", "prune-channels:ratio=0.5")
    # the TorchScript exporter bakes the pruned windows' batch into a Reshape: the file fails at batch 3
    with pytest.raises(VerifyError, match=r"onnxruntime could not run the exported model on x=\(3, 3, 32, 32\)"):
        export_onnx(module, (x,), tmp_path / "m.onnx", exporter="legacy")
    with pytest.warns(GraphoptWarning, match="exports with a dynamic batch by no route .* wrote a file with the "
                                             r"static batch of the example inputs \(report.dynamic_batch is False\)"):
        report = export_onnx(module, (x,), tmp_path / "m.onnx")
    assert report.exporter == "legacy" and not report.dynamic_batch and report.verified_batches == (2,)
    assert [r for r, _ in report.routes_tried] == ["dynamo (dynamic batch)", "legacy (dynamic batch)",
                                                   "dynamo (static batch)", "legacy (static batch)"]
    assert report.routes_tried[1][1].startswith("onnxruntime could not run the exported model on x=(3, 3, 32, 32)")
    assert report.routes_tried[-1][1] is None


def test_a_module_captured_with_a_fixed_batch_exports_static_not_broken(tmp_path):
    torch.manual_seed(0)
    model, x = ConvNeXtStyle().eval(), torch.randn(2, 3, 32, 32)
    fixed = torch.export.export(model, (x,)).module()  # guards on batch 2
    with pytest.warns(GraphoptWarning, match="by no route"):
        report = export_onnx(fixed, (x,), tmp_path / "f.onnx")
    assert report.exporter == "dynamo" and not report.dynamic_batch and report.verified_batches == (2,)
    # torch itself refuses batch 3, so the legacy exporter is not tried with a dynamic batch
    assert [r for r, _ in report.routes_tried] == ["dynamo (dynamic batch)", "dynamo (static batch)"]
    assert "the torch module itself refuses batch 3 (AssertionError: Guard failed: x.size()[0] == 2)" in \
        report.routes_tried[0][1]


class Holder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 2


def refusing_mode_switches(module: nn.Module) -> nn.Module:
    """``module`` refusing train()/eval() the way torch.export's ``ExportedProgram.module()`` does (FACTS.md):
    instance attributes that raise, which a deepcopy keeps for a plain module."""
    def refuse(self, mode=True):
        raise NotImplementedError("Calling train() is not supported yet.")

    module.train = types.MethodType(refuse, module)
    module.eval = types.MethodType(refuse, module)
    return module


@pytest.mark.parametrize("exporter", ["legacy", "dynamo", "auto"])
def test_a_module_holding_one_that_refuses_train_exports_by_every_route(exporter, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    holder = Holder(refusing_mode_switches(ConvNeXtStyle()))  # left in training mode: export_onnx evals a copy
    with pytest.raises(NotImplementedError):
        holder.eval()
    with pytest.warns(GraphoptWarning, match="is in training mode"):
        report = export_onnx(holder, (x,), tmp_path / "m.onnx", exporter=exporter)
    assert report.verified_batches == (2, 3) and report.max_abs_error < 1e-4
    with pytest.raises(NotImplementedError):
        holder.inner.train()  # the refusal is back after the export


def test_an_unlifted_torch_export_module_exports_by_the_legacy_route(tmp_path):
    torch.manual_seed(0)
    model, x = ConvNeXtStyle().eval(), torch.randn(2, 3, 32, 32)
    inner = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b")},)).module()
    report = export_onnx(inner, (x,), tmp_path / "m.onnx", exporter="legacy")
    assert report.verified_batches == (2, 3) and report.max_abs_error < 1e-4


class UsesMystery(nn.Module):
    def forward(self, x):
        return torch.ops.graphopt_test.mystery(x) + 1


def test_every_route_failing_is_one_export_error_naming_each(tmp_path):
    with pytest.raises(ExportError) as err:
        export_onnx(UsesMystery().eval(), (torch.randn(2, 4),), tmp_path / "m.onnx")
    msg = str(err.value)
    head, dynamo, legacy, advice = msg.split("\n")
    assert head == "export_onnx could not export UsesMystery by any route (2 tried):"  # no batch trouble: no static
    assert dynamo.startswith("  dynamo (dynamic batch): the dynamo ONNX exporter could not export UsesMystery at ")
    assert legacy.startswith("  legacy (dynamic batch): the legacy ONNX exporter could not export UsesMystery at op "
                             "`graphopt_test")
    assert "What you can do" not in dynamo + legacy and advice.startswith("What you can do: replace the op")
    assert not (tmp_path / "m.onnx").exists()


def test_unknown_exporter_is_refused(tmp_path):
    with pytest.raises(graphopt.InputError, match="exporter must be 'auto', 'dynamo' or 'legacy', got 'onnx'"):
        export_onnx(nn.Linear(2, 2).eval(), (torch.randn(2, 2),), tmp_path / "m.onnx", exporter="onnx")
