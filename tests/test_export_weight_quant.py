"""export_onnx of weight-quantized models (QuantLinear modules, graphopt::quant_linear graph nodes) as onnxruntime's
MatMulNBits / DynamicQuantizeMatMul: ops and attributes written, no float copy of the weights, integer kernels
onnxruntime runs, agreement with torch at two batch sizes, both exporters, onnxsim, and the errors."""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import helper, numpy_helper

import graphopt
from graphopt import ExportError, GraphoptWarning, InputError, export_onnx
from graphopt.export.formats import format_for
from graphopt.export.onnx_verify import ort_session
from graphopt.kernels.modules import QuantLinear
from graphopt.kernels.quant_format import dequantize, padded_in_features

INTEGER_OPS = ("MatMulNBits", "DynamicQuantizeMatMul")


def mlp(*sizes: int) -> nn.Module:
    """Linear layers of odd sizes with ReLUs between, in eval mode."""
    torch.manual_seed(0)
    layers = []
    for k, n in zip(sizes, sizes[1:]):
        layers += [nn.Linear(k, n), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def per_token(linear: nn.Linear) -> int:
    """The act_group of per-token dynamic int8 for a per-channel weight: its padded K."""
    return padded_in_features(linear.in_features, None)


def quantize(model: nn.Module, choose) -> nn.Module:
    """A copy with every nn.Linear replaced by QuantLinear.from_linear(**choose(name, linear))."""
    q = copy.deepcopy(model)
    for parent_name, parent in list(q.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{parent_name}.{name}" if parent_name else name
                setattr(parent, name, QuantLinear.from_linear(child, **choose(full, child)))
    return q.eval()


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def ops_of(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def integer_nodes(path) -> list:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type in INTEGER_OPS]


def attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def assert_no_float_weights(path, qmodel: nn.Module) -> None:
    """No initializer of the file holds a quantized layer's dequantized weight, in either orientation."""
    inits = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer]
    for name, layer in quant_layers(qmodel).items():
        w = dequantize(layer.quantized()).numpy()
        assert not any(a.shape in (w.shape, w.T.shape) and (np.array_equal(a, w) or np.array_equal(a, w.T))
                       for a in inits), f"float weight of {name} is still in the file"


def sqnr(got: np.ndarray, want: np.ndarray) -> float:
    return float(10 * np.log10(np.square(want).sum() / np.square(got - want).sum()))


def ort_and_torch(path, module, inputs: dict) -> tuple[np.ndarray, np.ndarray]:
    session = ort_session(str(path))
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        want = module(*inputs.values())
    return got, want.numpy()


def assert_integer_report(report, layers: int) -> None:
    """The report counts what onnxruntime runs: one integer kernel per quantized layer, at two batch sizes."""
    assert report.format == "weight-quant"
    assert report.quantized_matmuls == layers and report.integer_kernels == layers
    assert report.verified_batches == (2, 3)  # the example batch and one more: the batch really is dynamic
    text = str(report)
    assert f"{layers} weight-quantized MatMuls" in text and f"runs {layers} integer kernels" in text


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_int4_g32_float_compute_is_matmulnbits_matching_torch_elementwise(exporter, tmp_path):
    model = mlp(200, 136, 300, 30)  # K = 200, 136, 300: none a multiple of the group of 32 (last block padded)
    q = quantize(model, lambda name, lin: dict(bits=4, group_size=32, act_group=0))
    x = torch.randn(2, 200)
    report = export_onnx(q, (x,), tmp_path / "m.onnx", exporter=exporter)
    assert_integer_report(report, 3)
    nodes = integer_nodes(report.path)
    assert [n.op_type for n in nodes] == ["MatMulNBits"] * 3 and not {"MatMul", "Gemm"} & set(ops_of(report.path))
    for node, lin in zip(nodes, [m for m in model if isinstance(m, nn.Linear)]):
        assert attrs(node) == dict(K=lin.in_features, N=lin.out_features, bits=4, block_size=32, accuracy_level=0)
        assert len(node.input) == 6 and node.input[3] == "" and node.input[5]  # symmetric: no zero points; bias
    assert_no_float_weights(report.path, q)
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert report.file_bytes < float_bytes / 5  # 4-bit codes + one float scale per 32 weights: ~5.6x smaller
    for batch in (2, 5):
        got, want = ort_and_torch(report.path, q, {"input": torch.randn(batch, 200)})
        # both sides sum float32 products of the same dequantized weights; only the summation order differs,
        # ~K * 2^-24 relative to the terms (K <= 300: ~2e-5), far below the ~5e-2 int4 quantization error
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert report.sqnr_db > 80


def test_int4_g128_int8_compute_from_a_graph_module(tmp_path):
    model = mlp(200, 136, 300, 30)
    q = quantize(model, lambda name, lin: dict(bits=4, group_size=128, symmetric=False))  # act_group 128
    x = torch.randn(2, 200)
    gm = graphopt.trace(q, (x,))  # graphopt::quant_linear nodes reading get_attr buffers
    assert sum("quant_linear" in str(n.target) for n in gm.graph.nodes) == 3 and format_for(gm).name == "weight-quant"
    report = export_onnx(gm, (x,), tmp_path / "g.onnx")
    assert_integer_report(report, 3)
    for node in integer_nodes(report.path):
        assert attrs(node)["block_size"] == 128 and attrs(node)["accuracy_level"] == 4  # int8 compute
        assert node.input[3], "asymmetric weights need their zero points"
    assert_no_float_weights(report.path, q)
    # onnxruntime quantizes activations per block of 128 as graphopt::quant_linear does: the same integer sums
    got, want = ort_and_torch(report.path, gm, {"input": torch.randn(5, 200)})
    assert sqnr(got, want) > 60 and report.sqnr_db > 60


def test_int8_per_channel_weight_only_repeats_its_scale_per_block(tmp_path):
    model = mlp(200, 136, 300, 30)
    # default act_group: 32, 32, 64 (the largest of 128/64/32 dividing padded K 224, 160, 320)
    q = quantize(model, lambda name, lin: dict(bits=8, group_size=None))
    q[4] = QuantLinear.from_linear(model[4], bits=8, group_size=None, act_group=0).eval()  # float compute
    x = torch.randn(2, 200)
    with pytest.warns(GraphoptWarning, match="'4' holds int8 weights with float compute"):
        report = export_onnx(q, (x,), tmp_path / "c.onnx")
    assert_integer_report(report, 3)
    found = [attrs(n) for n in integer_nodes(report.path)]
    assert [(a["bits"], a["block_size"], a["accuracy_level"]) for a in found] == [(8, 32, 4), (8, 32, 4), (8, 64, 0)]
    assert_no_float_weights(report.path, q)
    got, want = ort_and_torch(report.path, q, {"input": torch.randn(5, 200)})
    assert sqnr(got, want) > 60 and report.sqnr_db > 60


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_dynamic_int8_mlp_is_dynamic_quantize_matmul(exporter, tmp_path):
    model = mlp(100, 72, 40)  # K = 100, 72: per-token blocks of padded K 128 and 96

    def choose(name, lin):
        asymmetric = name == "2"
        return dict(bits=4 if asymmetric else 8, group_size=None, symmetric=not asymmetric, act_group=per_token(lin))

    q = quantize(model, choose)
    x = torch.randn(2, 100)
    report = export_onnx(q, (x,), tmp_path / "d.onnx", exporter=exporter)
    assert_integer_report(report, 2)
    graph = onnx.load(report.path).graph
    assert [n.op_type for n in integer_nodes(report.path)] == ["DynamicQuantizeMatMul"] * 2
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    b = [inits[n.input[1]] for n in integer_nodes(report.path)]
    assert [(a.dtype, a.shape) for a in b] == [(np.int8, (100, 72)), (np.int8, (72, 40))]  # signed codes, (K, N)
    assert_no_float_weights(report.path, q)
    # onnxruntime quantizes activations per tensor (uint8), torch per token: a rounding apart, not elementwise
    got, want = ort_and_torch(report.path, q, {"input": torch.randn(5, 100)})
    assert sqnr(got, want) > 33 and report.sqnr_db > 33


def tiny_llama() -> nn.Module:
    """LlamaForCausalLM from a config: hidden 64, 2 layers, vocab 128, GQA; random weights, nothing downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def llama_choice(name: str, lin: nn.Linear) -> dict:
    """Attention int4 g32 (int8 compute), MLP per-token dynamic int8, lm_head int8 per channel (int8 compute)."""
    if "self_attn" in name:
        return dict(bits=4, group_size=32)
    if "mlp" in name:
        return dict(bits=8, group_size=None, act_group=per_token(lin))
    return dict(bits=8, group_size=None, act_group=32)


@pytest.mark.parametrize("source", ["modules", "graph"])
def test_tiny_llama_exports_every_linear_as_an_integer_op(source, tmp_path):
    q = quantize(tiny_llama(), llama_choice)
    ids = torch.randint(3, 128, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.int64), "use_cache": False}
    # the legacy exporter fixes the batch of a traced Llama graph (its Expand of the mask), float or not
    module, exporter = (q, "legacy") if source == "modules" else (graphopt.trace(q, inputs), "dynamo")
    report = export_onnx(module, inputs, tmp_path / "llama.onnx", exporter=exporter)
    assert_integer_report(report, 15)  # 2 layers x (q, k, v, o, gate, up, down) + lm_head
    ops = ops_of(report.path)
    assert ops["MatMulNBits"] == 9 and ops["DynamicQuantizeMatMul"] == 6
    assert ops["MatMul"] == 4  # only attention's two activation x activation products per layer stay float
    assert_no_float_weights(report.path, q)
    assert report.sqnr_db > 33
    feeds = {"input_ids": torch.randint(3, 128, (3, 8)), "attention_mask": torch.ones(3, 8, dtype=torch.int64)}
    session = ort_session(str(report.path))
    got = session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    with torch.no_grad():
        want = q(**feeds, use_cache=False).logits.numpy()
    assert sqnr(got, want) > 33


def test_onnxsim_and_3d_inputs_keep_every_layer_matched(tmp_path):
    # a 3-D input makes the exporters write MatMul (on a transposed weight) instead of Gemm
    q = quantize(mlp(100, 72, 40), lambda name, lin: dict(bits=4, group_size=32))
    x = torch.randn(2, 5, 100)
    plain = export_onnx(q, (x,), tmp_path / "plain.onnx", exporter="legacy", simplify=False)
    simplified = export_onnx(q, (x,), tmp_path / "simplified.onnx", exporter="legacy")
    assert plain.nodes_simplified is None and simplified.nodes_simplified is not None
    for report in (plain, simplified):
        assert report.quantized_matmuls == report.integer_kernels == 2
        assert ops_of(report.path)["MatMulNBits"] == 2 and "MatMul" not in ops_of(report.path)
        assert_no_float_weights(report.path, q)
        assert report.sqnr_db > 60


def test_an_act_group_onnxruntime_cannot_compute_is_refused_before_export(tmp_path):
    model = mlp(200, 30)
    q = quantize(model, lambda name, lin: dict(bits=4, group_size=96, act_group=96))
    with pytest.raises(InputError, match=r"layer '0': act_group=96 .* power of two >= 16.* act_group=32, 64 or 128"):
        export_onnx(q, (torch.randn(2, 200),), tmp_path / "x.onnx")
    # a group of 96 itself is fine: three blocks of 32 sharing its scale, exact with float compute
    ok = quantize(model, lambda name, lin: dict(bits=4, group_size=96, act_group=0))
    report = export_onnx(ok, (torch.randn(2, 200),), tmp_path / "ok.onnx")
    assert attrs(integer_nodes(report.path)[0])["block_size"] == 32 and report.sqnr_db > 80


class ConstantInput(nn.Module):
    """A quantized layer applied to a stored constant: onnxsim folds its MatMul into a float result."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = QuantLinear.from_linear(nn.Linear(64, 32), bits=4, group_size=32)
        self.register_buffer("table", torch.randn(1, 64))

    def forward(self, x):
        return x + self.proj(self.table)


def test_a_layer_missing_from_the_file_is_an_error_not_a_float_file(tmp_path):
    module = ConstantInput().eval()
    x = torch.randn(2, 32)
    folded = r"1 weight-quantized layer.*proj: no MatMul/Gemm on its weight.*simplify=False"
    with pytest.raises(ExportError, match=folded):
        export_onnx(module, (x,), tmp_path / "folded.onnx", exporter="legacy")
    report = export_onnx(module, (x,), tmp_path / "kept.onnx", exporter="legacy", simplify=False)
    assert report.quantized_matmuls == report.integer_kernels == 1


def test_identical_weights_quantized_differently_are_refused(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    q = nn.Sequential(QuantLinear.from_linear(lin, bits=4, group_size=32, act_group=0),
                      QuantLinear.from_linear(lin, bits=4, group_size=32, act_group=32)).eval()
    with pytest.raises(InputError, match="layers '0' and '1' hold the same dequantized weight"):
        export_onnx(q, (torch.randn(2, 64),), tmp_path / "x.onnx")


def test_float_models_keep_the_float_format(tmp_path):
    model = mlp(100, 40)
    assert format_for(model).name == "float"
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphoptWarning)
        report = export_onnx(model, (torch.randn(2, 100),), tmp_path / "f.onnx")
    assert report.format == "float" and report.quantized_matmuls == 0 and report.integer_kernels is None
