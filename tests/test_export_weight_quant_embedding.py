"""export_onnx of packed int4/int8 embedding tables (graphopt::quant_embedding nodes, QuantEmbedding modules) as
onnxruntime's com.microsoft GatherBlockQuantized: op and attributes, no float table left in the file, the looked-up
rows exact and the logits close at two batch sizes, int8 and asymmetric tables, odd and per-channel tables, the
float fallback for a layout onnxruntime refuses, and the error for a lookup the file does not hold."""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import ExportError, GraphoptWarning, export_onnx
from graphopt.calibration.gptq import rtn
from graphopt.export import weight_quant_embedding
from graphopt.export.formats import format_for
from graphopt.export.onnx_verify import ort_kernel_counts, ort_session
from graphopt.kernels.quant_embedding import QuantEmbedding
from graphopt.kernels.quant_format import pack_quantized, quantize_rtn

VOCAB, HIDDEN = 128, 64


def tiny_llama() -> nn.Module:
    """LlamaForCausalLM from a config: hidden 64, 2 layers, vocab 128, GQA; random weights, nothing downloaded.

    The RMSNorm weights are drawn around 1 rather than left at exactly 1, as in a trained model: with unit norm
    weights the first layers' inputs are packed table rows times one factor, whose int8 activation blocks then hold
    exact rounding ties (asymmetric int4 tables), which MatMulNBits' int8 compute rounds differently from
    graphopt::quant_linear (~46 dB instead of >100 dB, for the linears, not the lookup)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def ids_of(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, 8), generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def quantized(bits: int, symmetric: bool):
    """(float model, optimize result) for quantize-weights with packed embedding tables (cached per grid)."""
    model = tiny_llama()
    spec = (f"quantize-weights:bits={bits},group_size=32,embeddings=true,min_speedup=0"
            + ("" if symmetric else ",symmetric=false"))
    return model, graphopt.optimize(model, spec, {"input_ids": ids_of(2, 0)})


def gathers(proto) -> list:
    return [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]


def attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def initializers(proto) -> dict:
    return {i.name: i for i in proto.graph.initializer}


def float_table(model: nn.Module, bits: int, symmetric: bool) -> np.ndarray:
    """The dequantized table quantize-weights packs: RTN of the float model's table in groups of 32."""
    return rtn(model.model.embed_tokens.weight.detach(), bits, 32, symmetric).dequantize().numpy()


def assert_no_float_table(proto, table: np.ndarray) -> None:
    for init in proto.graph.initializer:
        if tuple(init.dims) == table.shape and init.data_type == TensorProto.FLOAT:
            assert not np.array_equal(numpy_helper.to_array(init), table), f"float table {init.name} in the file"


def ort_with_extra_outputs(path, names: list[str], feeds: dict, tmp_path) -> list[np.ndarray]:
    """Run the file with the values ``names`` added as graph outputs (after the model's own)."""
    proto = onnx.load(str(path))
    proto.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    extended = tmp_path / f"extended_{os.path.basename(str(path))}"
    onnx.save(proto, str(extended))
    session = ort_session(str(extended))
    got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    del session
    return got


def sqnr(got: np.ndarray, want: np.ndarray) -> float:
    noise = np.square(got.astype(np.float64) - want).sum()
    return float("inf") if noise == 0 else float(10 * np.log10(np.square(want.astype(np.float64)).sum() / noise))


@pytest.mark.parametrize("source", ["graph", "modules"])
def test_int4_llama_table_is_gather_block_quantized_with_exact_rows(source, tmp_path):
    model, res = quantized(4, True)
    module = res.module if source == "graph" else res.to_model().eval()
    if source == "modules":
        assert isinstance(module.model.embed_tokens, QuantEmbedding)
    report = export_onnx(module, {"input_ids": ids_of(2, 0)}, tmp_path / "llama.onnx")
    assert report.format == "weight-quant" and report.quantized_gathers == 1 and report.float_tables == ()
    assert report.quantized_matmuls == 14  # the linears keep their MatMulNBits (lm_head stays float)
    assert report.dynamic_batch and report.verified_batches == (2, 3) and report.sqnr_db > 60
    assert "1 quantized Gathers" in str(report)
    proto = onnx.load(str(report.path))
    (node,) = gathers(proto)
    assert node.domain == "com.microsoft"
    assert attrs(node) == {"bits": 4, "block_size": 32, "gather_axis": 0, "quantize_axis": 1}
    assert len(node.input) == 3  # symmetric: the omitted zero points are 8, graphopt's symmetric zero
    inits = initializers(proto)
    data, scales = numpy_helper.to_array(inits[node.input[0]]), numpy_helper.to_array(inits[node.input[2]])
    assert data.dtype == np.uint8 and data.shape == (VOCAB, HIDDEN // 2)  # two codes a byte
    assert scales.dtype == np.float32 and scales.shape == (VOCAB, 2)
    assert "Gather" not in {n.op_type for n in proto.graph.node}  # no float lookup left
    table = float_table(model, 4, True)
    assert_no_float_table(proto, table)
    assert "GatherBlockQuantized" in ort_kernel_counts(str(report.path), str(tmp_path / "optimized.onnx"))
    # a lookup is exact: the rows onnxruntime gathers are the packed table's, bit for bit, at another batch size
    ids = ids_of(3, 1)
    logits, rows = ort_with_extra_outputs(report.path, [node.output[0]], {"input_ids": ids}, tmp_path)
    np.testing.assert_array_equal(rows, table[ids.numpy()])
    with torch.no_grad():
        want = module(input_ids=ids).logits.numpy()
    assert logits.shape == (3, 8, VOCAB) and sqnr(logits, want) > 60


def test_the_float_table_leaves_the_file(tmp_path, monkeypatch):
    model, res = quantized(4, True)
    inputs = {"input_ids": ids_of(2, 0)}
    packed = export_onnx(res.module, inputs, tmp_path / "packed.onnx")
    monkeypatch.setattr(weight_quant_embedding, "_SUPPORT", {})
    monkeypatch.setattr(weight_quant_embedding, "_probe", lambda layout: "refused for this test")
    with pytest.warns(GraphoptWarning, match="'model.embed_tokens' stays a float Gather"):
        kept = export_onnx(res.module, inputs, tmp_path / "kept.onnx")
    saved = VOCAB * HIDDEN * 4 - (VOCAB * HIDDEN // 2 + VOCAB * 2 * 4)  # float32 table - codes and scales
    assert kept.file_bytes - packed.file_bytes >= 0.95 * saved


@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, False), (8, False)])
def test_int8_and_asymmetric_tables(bits, symmetric, tmp_path):
    model, res = quantized(bits, symmetric)
    report = export_onnx(res.module, {"input_ids": ids_of(2, 0)}, tmp_path / "llama.onnx")
    assert report.quantized_gathers == 1 and report.float_tables == () and report.sqnr_db > 60
    proto = onnx.load(str(report.path))
    (node,) = gathers(proto)
    assert attrs(node)["bits"] == bits and attrs(node)["block_size"] == 32
    inits = initializers(proto)
    data = numpy_helper.to_array(inits[node.input[0]])
    assert data.dtype == np.uint8 and data.shape == (VOCAB, HIDDEN * bits // 8)
    if symmetric:
        assert len(node.input) == 3
    else:  # zero points per row and block: one byte each for int8, two blocks a byte for int4
        zeros = numpy_helper.to_array(inits[node.input[3]])
        assert zeros.dtype == np.uint8 and zeros.shape == (VOCAB, 2 if bits == 8 else 1)
    table = float_table(model, bits, symmetric)
    assert_no_float_table(proto, table)
    ids = ids_of(3, 2)
    logits, rows = ort_with_extra_outputs(report.path, [node.output[0]], {"input_ids": ids}, tmp_path)
    np.testing.assert_array_equal(rows, table[ids.numpy()])
    with torch.no_grad():
        want = res.module(input_ids=ids).logits.numpy()
    assert sqnr(logits, want) > 60


def test_a_layout_onnxruntime_refuses_stays_a_float_gather_with_a_warning(tmp_path, monkeypatch):
    model, res = quantized(8, True)
    real = weight_quant_embedding._probe
    monkeypatch.setattr(weight_quant_embedding, "_SUPPORT", {})
    monkeypatch.setattr(weight_quant_embedding, "_probe",
                        lambda layout: "no bits=8 kernel (simulated)" if layout.bits == 8 else real(layout))
    with pytest.warns(GraphoptWarning, match=r"embedding table 'model.embed_tokens' stays a float Gather .*"
                                             r"no bits=8 kernel \(simulated\)"):
        report = export_onnx(res.module, {"input_ids": ids_of(2, 0)}, tmp_path / "llama.onnx")
    assert report.quantized_gathers == 0 and report.float_tables == ("model.embed_tokens",)
    assert report.quantized_matmuls == 14 and report.sqnr_db > 60  # the linears are still integer ops
    assert "1 tables kept float (model.embed_tokens)" in str(report)
    proto = onnx.load(str(report.path))
    assert not gathers(proto)
    inits = initializers(proto)
    (lookup,) = [n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in inits]
    np.testing.assert_array_equal(numpy_helper.to_array(inits[lookup.input[0]]), float_table(model, 8, True))


def packed_table(rows: int, dim: int, bits: int, group_size: int | None, symmetric: bool) -> QuantEmbedding:
    weight = torch.randn(rows, dim)
    codes, scales, zeros = quantize_rtn(weight, bits, group_size, symmetric)
    qw = pack_quantized(codes, scales, None if symmetric else zeros, bits, group_size)
    return QuantEmbedding(qw.qweight, qw.scales, qw.zeros, bits, qw.group_size, rows, dim)


class TwoTables(nn.Module):
    """An odd per-channel int4 table (uint4 data) and an int8 table in groups of 96 (blocks of 32)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.odd = packed_table(50, 63, 4, None, symmetric=False)
        self.wide = packed_table(40, 200, 8, 96, symmetric=True)

    def forward(self, ids):
        return self.odd(ids), self.wide(ids % 40)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_odd_per_channel_and_non_power_of_two_tables_are_exact(exporter, tmp_path):
    module = TwoTables().eval()
    assert format_for(module).name == "weight-quant"
    ids = torch.randint(0, 50, (2, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphoptWarning)
        report = export_onnx(module, (ids,), tmp_path / "tables.onnx", exporter=exporter)
    assert report.quantized_gathers == 2 and report.quantized_matmuls == 0 and report.sqnr_db == float("inf")
    proto = onnx.load(str(report.path))
    inits = initializers(proto)
    by_rows = {inits[n.input[0]].dims[0]: n for n in gathers(proto)}
    odd, wide = by_rows[50], by_rows[40]
    # 4-bit data of an odd row cannot be uint8 pairs: uint4 data, zero points always given, one block of 64 a row
    assert attrs(odd) == {"block_size": 64, "gather_axis": 0, "quantize_axis": 1}
    assert inits[odd.input[0]].data_type == TensorProto.UINT4 and list(inits[odd.input[0]].dims) == [50, 63]
    assert inits[odd.input[3]].data_type == TensorProto.UINT4 and list(inits[odd.input[3]].dims) == [50, 1]
    assert attrs(wide) == {"bits": 8, "block_size": 32, "gather_axis": 0, "quantize_axis": 1}
    assert list(inits[wide.input[2]].dims) == [40, 7]  # ceil(200 / 32) blocks, each group's scale thrice
    assert not [i for i in proto.graph.initializer if i.data_type == TensorProto.FLOAT
                and list(i.dims) in ([50, 63], [40, 200])]  # no float tables
    session = ort_session(str(report.path))
    fresh = torch.randint(0, 50, (5, 7))  # another batch size (the sequence length is fixed)
    got = session.run(None, {report.input_names[0]: fresh.numpy()})
    del session
    with torch.no_grad():
        want = module(fresh)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w.numpy())


class ConstantLookup(nn.Module):
    """A packed table looked up at stored indices (a token-type table, say): the exporters fold the lookup."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = packed_table(20, 32, 4, 32, symmetric=True)
        self.register_buffer("ids", torch.tensor([1, 4, 7]))

    def forward(self, x):
        return x + self.table(self.ids)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_a_lookup_at_constant_indices_is_folded_into_its_rows_with_a_warning(exporter, tmp_path):
    module = ConstantLookup().eval()
    x = torch.randn(3, 32)
    with pytest.warns(GraphoptWarning, match="table 'table' is looked up at constant indices"):
        report = export_onnx(module, (x,), tmp_path / "folded.onnx", exporter=exporter, dynamic_batch=False)
    assert report.quantized_gathers == 0 and report.float_tables == ("table",) and report.sqnr_db > 100
    proto = onnx.load(str(report.path))
    assert not [i for i in proto.graph.initializer if list(i.dims) == [20, 32]]  # only the 3 rows it reads


def test_a_float_table_left_in_the_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(weight_quant_embedding, "_match", lambda node, consts, plan: None)  # no Gather recognized
    _, res = quantized(4, True)
    with pytest.raises(ExportError, match=r"model.embed_tokens: its float table is still read by Gather"):
        export_onnx(res.module, {"input_ids": ids_of(2, 0)}, tmp_path / "x.onnx")
