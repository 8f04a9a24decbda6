"""graphopt.export_onnx: every zoo model after prune-channels + fuse, other pass families, QDQ, I/O naming, errors."""

import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import ExportError, VerifyError, export_onnx
from graphopt.export.onnx_io import count_qdq
from models import HF_NAMES, NAMES, TRANSFORMER_NAMES, build
import util  # noqa: F401  (defines the graphopt_test::mystery op)

# Attention models and HF models take 5-20 s each to export on a loaded 2-core machine.
SLOW = set(TRANSFORMER_NAMES) | set(HF_NAMES) | {"densenet", "mobilenetv3"}
ZOO = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in NAMES]


def initializer_shapes(path) -> dict[str, tuple]:
    """Name -> shape of every initializer in the ONNX file."""
    return {i.name: tuple(i.dims) for i in onnx.load(str(path)).graph.initializer}


def input_dims(path) -> dict[str, list]:
    """Input name -> dims (symbol names for dynamic ones)."""
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in onnx.load(str(path)).graph.input}


def assert_dense_shrunk(path, gm, original):
    """The file holds the pruned tensors themselves: no masks, no copy of the original weights."""
    inits = initializer_shapes(path)
    params = dict(gm.named_parameters())
    by_name = [n for n in params if n in inits]
    assert by_name, "no parameter kept its name in the ONNX file"
    for n in by_name:
        assert inits[n] == tuple(params[n].shape), (n, inits[n], tuple(params[n].shape))
    onnx_elems = sum(int(np.prod(d)) for d in inits.values())
    pruned_elems = sum(t.numel() for t in params.values()) + sum(b.numel() for b in gm.buffers())
    # slack for the small constants exporters create (position ids, causal masks, shape tensors)
    assert onnx_elems <= 1.02 * pruned_elems + 4096, (onnx_elems, pruned_elems)
    assert onnx_elems < 0.7 * sum(p.numel() for p in original.parameters())


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_exports_after_prune_and_fuse(name, tmp_path):
    case = build(name)
    res = graphopt.optimize(case.model, ["prune-channels:ratio=0.5", "fuse"], case.example_inputs)
    path = tmp_path / f"{name}.onnx"
    report = export_onnx(res.module, case.example_inputs, path)
    assert report.verified_batches == (2, 3)  # example batch and one more: the batch dim really is dynamic
    assert report.max_abs_error is not None and report.max_abs_error < 1e-3
    assert report.file_bytes == os.path.getsize(path) and report.nodes_simplified is not None
    assert all(dims[0] == "batch" for dims in input_dims(path).values())
    assert_dense_shrunk(path, res.module, case.model)
    # fuse folds every BN that follows a conv/linear; a pre-activation BN (densenet) stays, and may stay in ONNX
    left_by_fuse = sum("batch_norm" in str(n.target) for n in res.module.graph.nodes if n.op == "call_function")
    onnx_bns = [n for n in onnx.load(str(path)).graph.node if n.op_type == "BatchNormalization"]
    assert len(onnx_bns) <= left_by_fuse


@pytest.mark.parametrize("name", ["resnet_basic", "inception"])
def test_prune_only_keeps_every_parameter_by_name_at_its_pruned_shape(name, tmp_path):
    # CNNs only: a Linear applied to a 3-D input exports as MatMul on a pre-transposed weight with a new name
    # (transformers are checked by element count in assert_dense_shrunk)
    case = build(name)
    res = graphopt.optimize(case.model, ["prune-channels:ratio=0.5"], case.example_inputs)
    path = tmp_path / "pruned.onnx"
    export_onnx(res.module, case.example_inputs, path)
    inits = initializer_shapes(path)
    conv_and_fc = {n: p for n, p in res.module.named_parameters() if p.dim() >= 2}
    for n, p in conv_and_fc.items():
        if n in inits:
            assert inits[n] == tuple(p.shape)
    assert all(n in inits for n in conv_and_fc)


@pytest.mark.parametrize("name", ["vgg", "convnext"])
def test_fuse_alone_exports(name, tmp_path):
    case = build(name)
    res = graphopt.optimize(case.model, ["fuse"], case.example_inputs)
    report = export_onnx(res.module, case.example_inputs, tmp_path / "fused.onnx")
    assert report.max_abs_error < 1e-4


def _registered(name):
    return pytest.mark.skipif(name not in graphopt.registered_passes(), reason=f"pass {name} not registered yet")


# zoo models without a residual block have nothing remove-layers can take (it refuses them with a clear error)
NO_RESIDUAL_BLOCKS = {"mlp", "vgg", "densenet", "inception", "shufflenet", "unet"}


@_registered("remove-layers")
@pytest.mark.parametrize("name", [p for p in ZOO if getattr(p, "values", (p,))[0] not in NO_RESIDUAL_BLOCKS])
def test_exports_after_remove_layers(name, tmp_path):
    case = build(name)
    remove = graphopt.registered_passes()["remove-layers"](n=1, protect=(), use_example_inputs=True)
    res = graphopt.optimize(case.model, [remove], case.example_inputs)
    assert res.report.records[0].modified
    shallow = export_onnx(res.module, case.example_inputs, tmp_path / "shallow.onnx")
    full = export_onnx(graphopt.trace(case.model, case.example_inputs), case.example_inputs,
                       tmp_path / "full.onnx", verify=False)
    assert shallow.verified_batches == (2, 3)
    assert shallow.nodes < full.nodes  # a removed block leaves the ONNX graph, it is not masked


@_registered("fake-quant")
@pytest.mark.parametrize("name", ZOO)
def test_exports_after_fake_quant_with_qdq_nodes(name, tmp_path):
    case = build(name)
    calib = [case.example_inputs]
    res = graphopt.optimize(case.model, ["prune-channels:ratio=0.5", "fake-quant"], case.example_inputs,
                            calib_data=calib)
    # a flipped rounding moves a value by one quantization step; compare with the step's size, not 1e-4
    report = export_onnx(res.module, case.example_inputs, tmp_path / "qdq.onnx", rtol=0.05, atol=0.05)
    assert report.qdq_nodes >= 4 and report.nodes_simplified is not None
    assert report.verified_batches == (2, 3)


class FakeQuantConv(nn.Module):
    """Per-channel fake-quant on the conv weight, per-tensor on the activation: the QDQ shapes fake-quant emits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.fake_quantize_per_tensor_affine(x, 0.05, 128, 0, 255)
        scale = self.conv.weight.detach().abs().amax((1, 2, 3)) / 127
        w = torch.fake_quantize_per_channel_affine(self.conv.weight, scale, torch.zeros(8, dtype=torch.int32),
                                                   0, -128, 127)
        return self.fc(torch.relu(nn.functional.conv2d(x, w, self.conv.bias, padding=1)).mean((2, 3)))


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_qdq_pairs_survive_simplification_with_a_dynamic_batch(exporter, tmp_path):
    model = FakeQuantConv().eval()
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "qdq.onnx"
    report = export_onnx(model, (x,), path, exporter=exporter, opset=13 if exporter == "legacy" else None)
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 2
    assert report.qdq_nodes == 4 and report.nodes_simplified is not None
    per_channel = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                   and any(a.name == "axis" for a in n.attribute)]
    assert per_channel or exporter == "legacy"  # dynamo writes axis=0 explicitly; legacy relies on the default
    assert report.verified_batches == (2, 3) and report.max_abs_error < 1e-4


def test_kwargs_inputs_and_nested_outputs_get_their_names(tmp_path):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, input_ids, attention_mask, scale=1.0):
            h = self.emb(input_ids) * attention_mask.unsqueeze(-1) * scale
            return {"logits": self.head(h), "extra": (h.sum(-1), {"pooled": h.mean(1)})}

    model = TwoHeads().eval()
    inputs = {"input_ids": torch.randint(0, 20, (2, 5)), "attention_mask": torch.ones(2, 5), "scale": 0.5}
    path = tmp_path / "heads.onnx"
    report = export_onnx(model, inputs, path)
    assert report.input_names == ("input_ids", "attention_mask")  # the float `scale` is baked in
    assert report.output_names == ("logits", "extra.0", "extra.1.pooled")
    assert input_dims(path) == {"input_ids": ["batch", 5], "attention_mask": ["batch", 5]}
    assert report.verified_batches == (2, 3)


def test_batch_of_one_stays_dynamic_and_static_batch_is_honoured(tmp_path):
    case = build("resnet_basic")
    x1 = case.example_inputs[0][:1]
    gm = graphopt.optimize(case.model, ["prune-channels:ratio=0.5"], (x1,)).module
    report = export_onnx(gm, (x1,), tmp_path / "b1.onnx")
    assert report.verified_batches == (1, 2) and report.dynamic_batch
    static = export_onnx(gm, (x1,), tmp_path / "static.onnx", dynamic_batch=False, simplify=False)
    assert static.verified_batches == (1,) and not static.dynamic_batch and static.nodes_simplified is None
    assert input_dims(tmp_path / "static.onnx") == {"x": [1, 3, 32, 32]}


def test_legacy_exporter_opset_and_report_text(tmp_path):
    case = build("resnet_basic")
    gm = graphopt.optimize(case.model, ["prune-channels:ratio=0.5", "fuse"], case.example_inputs).module
    report = export_onnx(gm, case.example_inputs, tmp_path / "legacy.onnx", exporter="legacy", opset=17)
    assert report.exporter == "legacy" and report.opset == 17 and report.verified_batches == (2, 3)
    text = str(report)
    assert "opset 17, legacy exporter" in text and "inputs:     x  (dynamic batch)" in text
    assert "verified:   onnxruntime at batch 2, 3: max abs error" in text
    assert_dense_shrunk(tmp_path / "legacy.onnx", gm, case.model)


def test_the_module_is_not_changed(tmp_path):
    case = build("mlp")
    gm = graphopt.optimize(case.model, ["prune-channels:ratio=0.5"], case.example_inputs).module
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    code, children = gm.code, [n for n, _ in gm.named_children()]
    export_onnx(gm, case.example_inputs, tmp_path / "m.onnx")
    assert gm.code == code and [n for n, _ in gm.named_children()] == children
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_a_module_in_training_mode_is_exported_as_an_eval_copy(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    with pytest.warns(graphopt.GraphoptWarning, match="Sequential is in training mode; exporting an eval"):
        report = export_onnx(model, (torch.randn(2, 4),), tmp_path / "t.onnx")
    assert report.max_abs_error < 1e-4
    assert model.training and model[1].training  # the caller's module keeps its mode


# ----------------------------------------------------------------------------------------------------- errors

class UsesMystery(nn.Module):
    def forward(self, x):
        return torch.ops.graphopt_test.mystery(x) + 1


def test_exporter_failure_names_the_op_and_the_fallback(tmp_path):
    with pytest.raises(ExportError) as err:
        export_onnx(UsesMystery().eval(), (torch.randn(2, 4),), tmp_path / "m.onnx", exporter="dynamo")
    msg = str(err.value)
    assert msg.startswith("the dynamo ONNX exporter could not export UsesMystery at ")
    assert "graphopt_test" in msg and "mystery" in msg
    assert "try exporter='legacy' (the TorchScript exporter)" in msg
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ExportError) as err:
        export_onnx(UsesMystery().eval(), (torch.randn(2, 4),), tmp_path / "m.onnx", exporter="legacy")
    msg = str(err.value)
    assert msg.startswith("the legacy ONNX exporter could not export UsesMystery at op `graphopt_test")
    assert "try exporter='dynamo' (the torch.export-based exporter) or exporter='auto' (tries both)" in msg


class DriftingModule(nn.Module):
    """Adds how often it was called: the exported graph bakes in one count, later calls differ."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * 2 + self.calls


def test_onnxruntime_disagreement_is_a_verify_error_naming_the_output(tmp_path):
    with pytest.raises(VerifyError) as err:
        export_onnx(DriftingModule().eval(), (torch.randn(2, 4),), tmp_path / "d.onnx")
    msg = str(err.value)
    assert msg.startswith("onnxruntime disagrees with torch on output `output` at batch 2: max abs error ")
    assert "(tolerance rtol=0.001, atol=0.0001)" in msg and "retry with simplify=False" in msg
    assert (tmp_path / "d.onnx").exists()  # kept for inspection
    report = export_onnx(DriftingModule().eval(), (torch.randn(2, 4),), tmp_path / "d.onnx", verify=False)
    assert report.max_abs_error is None and "verified:   no" in str(report)


def test_unwritable_paths_fail_before_exporting(tmp_path):
    model, x = nn.Linear(4, 2).eval(), torch.randn(2, 4)
    missing = tmp_path / "no_such_dir" / "m.onnx"
    with pytest.raises(ExportError) as err:
        export_onnx(model, (x,), missing)
    assert str(err.value) == (f"cannot write the ONNX file to '{missing}': folder '{missing.parent}' does not exist; "
                              "create it first")
    with pytest.raises(ExportError) as err:
        export_onnx(model, (x,), tmp_path)
    assert str(err.value) == (f"cannot write the ONNX file to '{tmp_path}': it is a directory; pass a file path "
                              f"such as '{tmp_path / 'model.onnx'}'")


class BatchBaked(nn.Module):
    """Reshapes with a Python int read from the example: the legacy exporter bakes the batch size in."""

    def __init__(self, keep_rows: bool):
        super().__init__()
        self.keep_rows = keep_rows

    def forward(self, x):
        rows = int(x.shape[0])
        return x.reshape(rows, -1) * 2 if self.keep_rows else x.reshape(rows, 4, 2) * 2


@pytest.mark.parametrize("keep_rows, message", [
    (True, r"ONNX output `output` has shape \(2, 12\), torch \(3, 8\) at batch 3; the export fixed a dimension"),
    (False, r"onnxruntime could not run the exported model on x=\(3, 8\): .*if only the second batch size fails"),
])
def test_a_baked_batch_size_fails_at_the_second_batch_with_a_verify_error(keep_rows, message, tmp_path):
    x = torch.randn(2, 8)
    with pytest.raises(VerifyError, match=message + ".*export with dynamic_batch=False"):
        export_onnx(BatchBaked(keep_rows).eval(), (x,), tmp_path / "b.onnx", exporter="legacy")
    report = export_onnx(BatchBaked(keep_rows).eval(), (x,), tmp_path / "b.onnx", exporter="legacy",
                         dynamic_batch=False)
    assert report.verified_batches == (2,)


def test_bad_arguments(tmp_path):
    with pytest.raises(graphopt.InputError, match="expects a torch.nn.Module"):
        export_onnx(lambda x: x, (torch.randn(1),), tmp_path / "f.onnx")
    with pytest.raises(graphopt.InputError, match="exporter must be 'auto', 'dynamo' or 'legacy', got 'tflite'"):
        export_onnx(nn.ReLU().eval(), (torch.randn(1),), tmp_path / "f.onnx", exporter="tflite")
    with pytest.raises(graphopt.InputError, match=r"example_inputs \(\(2, 3\) float32\) do not fit Linear: "):
        export_onnx(nn.Linear(4, 2).eval(), (torch.randn(2, 3),), tmp_path / "f.onnx")
    assert count_qdq(onnx.ModelProto()) == 0
