"""Weight-quantized Hugging Face models in their default configs (use_cache=True, return_dict=True): the model
written back still generates, and round-trips through save_pretrained / from_pretrained."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import graphopt
from graphopt.kernels import QuantLinear

transformers = pytest.importorskip("transformers")


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(config).eval()


def _ids(batch=1, length=12, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_gptq_int4_llama_generates_and_round_trips_through_from_pretrained(tmp_path):
    model = _llama()
    assert model.config.use_cache and model.config.return_dict
    calib = [{"input_ids": _ids(2, 16, seed=s)} for s in range(4)]
    res = graphopt.optimize(model, "quantize-weights:bits=4,group_size=32,method=gptq,symmetric=false,"
                                   "output_layers=true,min_speedup=0", {"input_ids": _ids()}, calib_data=calib)
    back = res.to_model()
    assert type(back) is transformers.LlamaForCausalLM
    quantized = [n for n, m in back.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the LM head
    ids = _ids()
    with torch.no_grad():
        want = res.module(input_ids=ids).logits
        torch.testing.assert_close(back(input_ids=ids).logits, want)
        generated = back.generate(ids, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 18)
    assert float((want - model(input_ids=ids).logits).norm() / want.norm()) < 0.3  # int4 of random weights
    back.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    assert '"quant_method": "graphopt"' in config and '"lm_head"' in config
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert isinstance(again.model.layers[1].mlp.down_proj, QuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, want)
        assert torch.equal(again.generate(ids, max_new_tokens=6, do_sample=False), generated)


def test_load_pretrained_registers_the_format_in_a_fresh_process(tmp_path):
    model = _llama()
    res = graphopt.optimize(model, "quantize-weights:bits=8,group_size=none,min_speedup=0", {"input_ids": _ids()})
    back = res.to_model()
    back.save_pretrained(tmp_path)
    with torch.no_grad():
        want = back(input_ids=_ids()).logits
    torch.save(want, tmp_path / "want.pt")
    script = (  # graphopt first, transformers later: from_pretrained alone would not know the format
        "import torch, graphopt\n"
        "from graphopt.kernels import QuantLinear\n"
        f"m = graphopt.load_pretrained({str(tmp_path)!r})\n"
        "assert isinstance(m.model.layers[0].self_attn.q_proj, QuantLinear)\n"
        f"ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))\n"
        f"torch.testing.assert_close(m(input_ids=ids).logits, torch.load({str(tmp_path / 'want.pt')!r}))\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_gpt2_conv1d_layers_are_quantized_and_the_tied_head_stays_float():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    res = graphopt.optimize(model, "quantize-weights:bits=4,group_size=32,compute=float,output_layers=true,"
                                   "min_speedup=0", {"input_ids": _ids()})
    decisions = res.report.records[-1].decisions
    assert decisions["lm_head"] == "float: also read by other ops"
    back = res.to_model()
    assert isinstance(back.transformer.h[0].attn.c_attn, QuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=_ids()).logits, res.module(input_ids=_ids()).logits)
        assert back.generate(_ids(), max_new_tokens=3, do_sample=False).shape == (1, 15)


def test_the_command_line_quantizes_calibrates_and_exports_a_llama(tmp_path):
    from graphopt.cli.entry import main

    code = main(["optimize", "graphopt.examples:tiny_llama", "--input-shape", "1,12", "--input-dtype", "int64",
                 "--passes", "quantize-weights:bits=4,group_size=32,method=gptq,min_speedup=0", "--calib", "random:2",
                 "--out", str(tmp_path)])
    assert code == 0
    import onnx

    proto = onnx.load(str(tmp_path / "model.onnx"))
    assert sum(n.op_type == "MatMulNBits" for n in proto.graph.node) == 14
    report = (tmp_path / "report.md").read_text()
    assert "int4 g32 gptq" in report


def test_embedding_tables_pack_write_back_and_reload(tmp_path):
    model = _llama()
    res = graphopt.optimize(model, "quantize-weights:bits=4,group_size=32,embeddings=true,min_speedup=0",
                            {"input_ids": _ids()})
    assert "packed table" in res.report.records[-1].decisions["model.embed_tokens"]
    back = res.to_model()
    table = back.model.embed_tokens
    assert type(table).__name__ == "QuantEmbedding"
    ids = _ids()
    from graphopt.calibration.gptq import rtn

    want_rows = rtn(model.model.embed_tokens.weight.detach(), 4, 32).dequantize()[ids]
    torch.testing.assert_close(table(ids), want_rows)
    assert graphopt.model_bytes(table) < model.model.embed_tokens.weight.numel() * 4 / 6
    with torch.no_grad():
        want = res.module(input_ids=ids).logits
        torch.testing.assert_close(back(input_ids=ids).logits, want)
    back.save_pretrained(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert type(again.model.embed_tokens).__name__ == "QuantEmbedding"
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, want)


def test_quantizing_only_the_embedding_table_is_no_empty_run(recwarn):
    res = graphopt.optimize(_llama(), "quantize-weights:layers=[model.embed_tokens],embeddings=true",
                            {"input_ids": _ids()})
    assert res.report.records[-1].stats["embeddings"] == 1
    assert not [w for w in recwarn if "no layer was quantized" in str(w.message)]
