"""lower-sparse: masked dense models lowered to packed sparse kernels, equal outputs, export/compile, choices."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

import graphopt
from graphopt import Context, PassManager
from graphopt.kernels import SparseFormatError
from graphopt.passes.lower_sparse import LowerSparse
from tests.models import build


class MaskWeight(nn.Module):
    """W = original * mask: how the sparsify pass holds a sparsified weight."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w):
        return w * self.mask


def block_mask(shape, sparsity: float, rows: int = 1, cols: int = 1, seed: int = 0) -> torch.Tensor:
    """A 0/1 mask of ``shape`` (2-D or conv) with about ``sparsity`` zeros in rows x cols blocks."""
    gen = torch.Generator().manual_seed(seed)
    n, k = shape[0], int(torch.tensor(shape[1:]).prod())
    keep = torch.rand(-(-n // rows), -(-k // cols), generator=gen) >= sparsity
    return keep.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:n, :k].reshape(shape).float()


class ConvMlp(nn.Module):
    """3x3 conv (stays dense), a 1x1 conv, and an MLP: the layers lower-sparse can take."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pw = nn.Conv2d(16, 64, 1)
        self.fc1 = nn.Linear(64, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x):
        x = torch.relu(self.pw(torch.relu(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def traced(model, inputs):
    return graphopt.trace(model, inputs)


def sparsify_like(gm, names, sparsity=0.9, rows=1, cols=1):
    """Zero weights the way the sparsify pass leaves them: a parametrization on the owner module."""
    for i, name in enumerate(names):
        owner = gm.get_submodule(name)
        mask = block_mask(owner.weight.shape, sparsity, rows, cols, seed=i)
        parametrize.register_parametrization(owner, "weight", MaskWeight(mask))
    return gm


def run_pass(gm, inputs, **options):
    out, report = PassManager([LowerSparse(**options)]).run(gm, Context(inputs))
    return out, report.records[-1]


def test_parametrized_weights_are_baked_and_lowered():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = sparsify_like(traced(ConvMlp().eval(), (x,)), ["pw", "fc1", "fc2"])
    want = gm(x)
    out, record = run_pass(gm, (x,), min_speedup=0.0)
    torch.testing.assert_close(out(x), want)
    assert sorted(record.stats["baked_parametrizations"]) == ["fc1.weight", "fc2.weight", "pw.weight"]
    assert set(record.stats["layers"]) == {"pw", "fc1", "fc2"}  # the 3x3 conv is not a candidate
    code = out.code
    torch.testing.FileCheck().check("aten.conv2d").check("graphopt.sparse_linear").check(
        "graphopt.sparse_linear").check("graphopt.sparse_linear").run(code)
    assert "aten.linear" not in code and code.count("aten.conv2d") == 1
    assert not any(parametrize.is_parametrized(m) for m in out.modules())


@pytest.mark.parametrize("pattern,rows,cols", [("8x1", 8, 1), ("16x1", 16, 1), ("1x4", 1, 4), ("csr", 1, 1)])
def test_format_is_detected_from_the_zeros(pattern, rows, cols):
    """Without being told the pattern, the cost model picks the format the zeros were laid out for."""
    x = torch.randn(1, 768)
    model = nn.Sequential(nn.Linear(768, 3072)).eval()
    with torch.no_grad():
        model[0].weight.mul_(block_mask((3072, 768), 0.9, rows, cols))
    out, record = run_pass(traced(model, (x,)), (x,))
    chosen = record.stats["layers"]["0"]
    assert chosen == pattern or (pattern == "16x1" and chosen == "8x1"), chosen  # 16x1 zeros are 8x1 zeros too
    torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-4)


def test_keeps_dense_where_sparse_would_not_pay():
    x = torch.randn(1, 64)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 8)).eval()
    with torch.no_grad():
        model[0].weight.mul_(block_mask((64, 64), 0.95))        # tiny: call overhead beats the saved bytes
        model[2].weight.mul_(block_mask((2048, 64), 0.3))       # below min_sparsity
        model[4].weight.mul_(block_mask((8, 2048), 0.95))
    out, record = run_pass(traced(model, (x,)), (x,))
    layers = record.stats["layers"]
    assert layers["0"].startswith("dense: no format beats dense by 1.2x at 1 rows (model)")
    assert layers["2"] == "dense: sparsity 30% < min_sparsity 50%"
    torch.testing.assert_close(out(x), model(x))


def test_benchmark_choice_and_idempotence():
    x = torch.randn(1, 512)
    model = nn.Sequential(nn.Linear(512, 1024)).eval()
    with torch.no_grad():
        model[0].weight.mul_(block_mask((1024, 512), 0.95, 8, 1))
    out, record = run_pass(traced(model, (x,)), (x,), benchmark=True, min_speedup=1.0)
    chosen = record.stats["layers"]["0"]
    assert chosen in ("8x1", "16x1", "1x4", "csr") or chosen.endswith("(benchmark)"), chosen
    torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-4)
    again, record2 = run_pass(out, (x,), min_speedup=0.0)
    assert record2.modified is False and record2.stats["lowered"] == 0


def test_lowered_graph_exports_and_compiles():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = sparsify_like(traced(ConvMlp().eval(), (x,)), ["pw", "fc1", "fc2"], rows=8)
    want = gm(x)
    out, _ = run_pass(gm, (x,), min_speedup=0.0)
    exported = torch.export.export(out, (x,))
    assert "graphopt.sparse_linear" in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), want)
    compiled = torch.compile(out, backend="inductor" if _inductor_ok() else "eager")
    with torch.no_grad():  # the sparse ops are inference kernels (no autograd formula)
        torch.testing.assert_close(compiled(x), want)


def _inductor_ok() -> bool:
    import shutil
    return shutil.which("g++") is not None


def test_user_model_is_not_mutated_and_zoo_mlp_lowers():
    case = build("mlp")
    model = case.model
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(block_mask(m.weight.shape, 0.9))
    before = copy.deepcopy(model.state_dict())
    result = graphopt.optimize(model, [LowerSparse(min_speedup=0.0)], case.example_inputs)
    assert result.report.records[-1].stats["lowered"] == 3
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    torch.testing.assert_close(result.module(*case.example_inputs), model(*case.example_inputs))


@pytest.mark.slow
def test_hf_gpt2_lowered_equals_masked_model():
    case = build("hf_gpt2")
    gm = traced(case.model, case.example_inputs)
    names = sorted({n.target.rpartition(".")[0] for n in gm.graph.nodes
                    if n.op == "get_attr" and n.target.endswith("weight") and n.target.startswith("transformer.h")
                    and gm.get_submodule(n.target.rpartition(".")[0]).weight.dim() == 2})
    sparsify_like(gm, names, 0.9, 8, 1)
    want = gm(**case.example_inputs) if isinstance(case.example_inputs, dict) else gm(*case.example_inputs)
    out, record = run_pass(gm, case.example_inputs, min_speedup=0.0)
    assert record.stats["lowered"] >= 1
    got = out(**case.example_inputs) if isinstance(case.example_inputs, dict) else out(*case.example_inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_options():
    with pytest.raises(SparseFormatError, match=r"lower-sparse: unknown format\(s\) \['2x2'\]"):
        LowerSparse(formats=("2x2",))
    with pytest.raises(graphopt.PipelineError, match="unknown pass 'lower-sparce'; did you mean 'lower-sparse'"):
        PassManager(["lower-sparce"])


def test_choice_depends_on_sparsity_pattern_and_rows():
    """The cost model: blocks pay from 50% at batch 1; unstructured zeros at 50% and any 50% at batch 64 do not."""
    from graphopt.kernels import choose_format
    blocks50 = torch.randn(768, 3072) * block_mask((768, 3072), 0.5, 8, 1)
    scattered50 = torch.randn(768, 3072) * block_mask((768, 3072), 0.5)
    scattered90 = torch.randn(768, 3072) * block_mask((768, 3072), 0.9)
    assert choose_format(blocks50, 1).fmt in ("8x1", "16x1")
    assert choose_format(blocks50, 64).fmt is None
    assert choose_format(scattered50, 1).fmt is None
    assert choose_format(scattered90, 1).fmt == "csr"
    choice = choose_format(scattered90, 1)
    assert choice.speedup > 1.2 and choice.how == "model"


@pytest.mark.parametrize("pattern", ["8x1", "unstructured"])
def test_after_the_sparsify_pass(pattern):
    """sparsify leaves masks as parametrizations; lower-sparse bakes them (a deep copy keeps its masks)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256)).eval()
    x = torch.randn(1, 256)
    gm, _ = PassManager([f"sparsify:sparsity=0.9,pattern={pattern}"]).run(traced(model, (x,)), Context((x,)))
    want = gm(x)
    twin = copy.deepcopy(gm)
    out, record = run_pass(gm, (x,))
    assert set(record.stats["layers"].values()) == {"8x1" if pattern == "8x1" else "csr"}
    torch.testing.assert_close(out(x), want, rtol=1e-4, atol=1e-4)
    assert any(parametrize.is_parametrized(m) for m in twin.modules())
    torch.testing.assert_close(twin(x), want)
