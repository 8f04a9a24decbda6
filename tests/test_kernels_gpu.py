"""GPU sparse kernels: the Triton block-sparse linear (checked in Triton's CPU interpreter when Triton is installed,
and on CUDA when a GPU is present) and the 2:4 semi-structured path (CUDA only); packing errors run everywhere."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from graphopt.kernels.formats import SparseFormatError
from graphopt.kernels.semi_structured import (
    SemiStructuredLinear, check_semi_structured, prune_2to4, to_semi_structured, violations_2to4,
)
from graphopt.kernels.triton_bsr import (
    BlockSparseLinear, BlockSparseWeight, bsr_linear, bsr_linear_triton, interpreter_active, pack_bsr, triton_available,
    unpack_bsr, validate_bsr,
)

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device: GPU kernels are checked only on an NVIDIA GPU")
needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton is not installed (pip install graphopt[gpu])")


def sparse_weight(n, k, zeros, seed=0, block=None, dtype=torch.float32, device="cpu"):
    """A random n x k weight with a share ``zeros`` of zeros, unstructured or in (block_n, block_k) tiles."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if block is None:
        keep = torch.rand(n, k, generator=g) >= zeros
    else:
        bn, bk = block
        tiles = torch.rand(-(-n // bn), -(-k // bk), generator=g) >= zeros
        keep = tiles.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    return (w * keep).to(dtype=dtype, device=device)


# ---- interpreter: the kernel's logic on CPU ---------------------------------------------------------------------

INTERPRETER_CHECK = textwrap.dedent("""
    import json, torch, torch.nn.functional as F
    from graphopt.kernels import triton_bsr as tb
    assert tb.interpreter_active(), "TRITON_INTERPRET=1 did not take effect"
    from tests.test_kernels_gpu import sparse_weight
    results = []
    cases = [  # (n, k, block, zeros, tile-structured?, batch shape, bias?, dtype)
        (37, 45, (16, 16), 0.5, False, (1,), True, torch.float32),
        (37, 45, (16, 16), 0.9, False, (3,), False, torch.float32),
        (70, 33, (32, 32), 0.0, False, (8,), True, torch.float32),
        (70, 33, (32, 16), 0.6, True, (8,), True, torch.float32),
        (5, 130, (16, 32), 0.5, True, (3,), True, torch.float32),
        (96, 80, (32, 16), 0.9, True, (1,), True, torch.float32),
        (96, 80, (16, 32), 0.5, True, (2, 3), False, torch.float32),
        (48, 72, (16, 16), 1.0, True, (8,), True, torch.float32),     # all-zero weight: y = bias
        (48, 72, (16, 16), 1.0, True, (3,), False, torch.float32),    # all-zero weight, no bias: y = 0
        (33, 40, (16, 16), 0.5, True, (17,), True, torch.float32),    # two row tiles of BLOCK_M
        (64, 64, (32, 32), 0.5, True, (8,), True, torch.float16),
    ]
    for n, k, block, zeros, tiled, batch, has_bias, dtype in cases:
        w = sparse_weight(n, k, zeros, seed=n + k, block=block if tiled else None, dtype=dtype)
        if n == 96:
            w[: block[0]] = 0  # an empty block row as well
        # a strided view whose row padding is NaN: a load past in_features (a missing mask) would show as NaN
        x = torch.full((*batch, k + 7), float("nan")).to(dtype)[..., :k]
        x.copy_(torch.randn(*batch, k))
        b = torch.randn(n).to(dtype) if has_bias else None
        p = tb.pack_bsr(w, block)
        assert tb.can_run_triton(x)
        y = tb.bsr_linear_triton(x, *p.tensors(), b, n)
        y_op = tb.bsr_linear(x, p, b)              # the custom op takes the kernel too under the interpreter
        ref = F.linear(x.float(), w.float(), None if b is None else b.float())
        err = max(float((y.float() - ref).abs().max()), float((y_op.float() - ref).abs().max())) if ref.numel() else 0.0
        results.append({"case": [n, k, list(block), zeros, tiled, list(batch), has_bias, str(dtype)],
                        "tiles": p.cols.numel(), "shape": list(y.shape), "dtype": str(y.dtype), "max_err": err})
    print("RESULTS" + json.dumps(results))
""")


@needs_triton
def test_triton_kernel_matches_f_linear_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    assert len(results) == 11
    for r in results:
        n, k, block, zeros, tiled, batch, has_bias, dtype = r["case"]
        assert r["shape"] == [*batch, n] and r["dtype"] == dtype, r
        tol = 2e-2 if dtype == "torch.float16" else 1e-4
        assert r["max_err"] <= tol * max(1.0, k ** 0.5), r
    assert [r["tiles"] for r in results if r["case"][3] == 1.0] == [0, 0]  # all-zero weights stored nothing
    assert all(r["tiles"] > 0 for r in results if r["case"][3] < 1.0)   # the others ran the tile loop


# ---- everywhere: packing, the torch fallback, the module, export ------------------------------------------------

@pytest.mark.parametrize("block", [(16, 16), (32, 32), (16, 64), (64, 32)])
def test_pack_unpack_roundtrip_and_tile_count(block):
    w = sparse_weight(70, 90, 0.7, block=block)
    p = pack_bsr(w, block)
    assert torch.equal(unpack_bsr(p), w)
    bn, bk = block
    tiles = torch.zeros(-(-70 // bn) * bn, -(-90 // bk) * bk)
    tiles[:70, :90] = w
    expected = int((tiles.view(-(-70 // bn), bn, -(-90 // bk), bk) != 0).any(dim=3).any(dim=1).sum())
    assert p.cols.numel() == expected == p.values.shape[0]
    assert p.values.shape[1:] == (bk, bn) and p.ptr.numel() == -(-70 // bn) + 1


def test_fallback_op_module_and_export_on_cpu():
    linear = torch.nn.Linear(45, 37)
    with torch.no_grad():
        linear.weight.copy_(sparse_weight(37, 45, 0.8, block=(16, 16)))
    before = linear.weight.clone()
    module = BlockSparseLinear.from_linear(linear, block=(16, 16))
    assert torch.equal(linear.weight, before)  # the Linear is not changed
    x = torch.randn(2, 3, 45)
    torch.testing.assert_close(module(x), linear(x))
    torch.testing.assert_close(bsr_linear(x, module.packed()), F.linear(x, linear.weight))
    exported = torch.export.export(module, (x,))
    assert any(n.target == torch.ops.graphopt.bsr_linear.default for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), linear(x))


def test_packing_errors_have_exact_messages():
    with pytest.raises(SparseFormatError, match=r"^weight: expected a floating-point weight, got torch.int64$"):
        pack_bsr(torch.ones(32, 32, dtype=torch.int64))
    with pytest.raises(SparseFormatError, match=r"^weight: the Triton block-sparse kernel takes float32, float16 or "
                                                r"bfloat16 weights, got torch.float64; convert the weight first$"):
        pack_bsr(torch.ones(32, 32, dtype=torch.float64))
    with pytest.raises(SparseFormatError, match=r"^fc1: expected a 2-D weight \(out_features, in_features\), got "
                                                r"shape \(8, 4, 1, 1\); reshape 1x1-conv weights"):
        pack_bsr(torch.ones(8, 4, 1, 1), what="fc1")
    with pytest.raises(SparseFormatError, match=r"^weight: block must be a pair \(block_n, block_k\) of sizes in "
                                                r"\(16, 32, 64\), got \(8, 32\)$"):
        pack_bsr(torch.ones(32, 32), block=(8, 32))
    p = pack_bsr(sparse_weight(40, 40, 0.5, block=(16, 16)), (16, 16))
    broken = BlockSparseWeight(40, 40, p.values, p.cols + 5, p.ptr)
    with pytest.raises(SparseFormatError, match=r"block columns must lie in \[0, 2\]; re-pack it"):
        validate_bsr(broken)
    with pytest.raises(SparseFormatError, match=r"input has 41 features, the packed weight expects 40"):
        bsr_linear(torch.randn(1, 41), p)


@pytest.mark.skipif(interpreter_active(), reason="Triton's interpreter is on in this process: the kernel would run")
def test_triton_launcher_refuses_cpu_without_interpreter():
    p = pack_bsr(sparse_weight(32, 32, 0.5), (16, 16))
    msg = (r"the Triton block-sparse kernel runs on CUDA tensors \(or on CPU under TRITON_INTERPRET=1\), got an "
           r"input on cpu" if triton_available() else r"the Triton block-sparse kernel needs Triton: pip install")
    with pytest.raises(SparseFormatError, match="^" + msg):
        bsr_linear_triton(torch.randn(1, 32), *p.tensors(), None, 32)


def test_2to4_helpers_and_errors_without_cuda():
    w = sparse_weight(32, 64, 0.0)
    pruned = prune_2to4(w)
    assert violations_2to4(pruned) == 0 and violations_2to4(w) == 32 * 16
    assert int((pruned != 0).sum()) == 32 * 64 // 2
    kept = w.abs().view(32, 16, 4).topk(2, dim=2).values.sum()
    torch.testing.assert_close(pruned.abs().sum(), kept)  # the two largest of every group survive
    with pytest.raises(SparseFormatError, match=r"^weight: 2:4 sparsity needs in_features divisible by 4, got 30$"):
        prune_2to4(torch.ones(8, 30))
    if not CUDA:
        with pytest.raises(SparseFormatError, match=r"^weight: 2:4 semi-structured sparsity runs on CUDA only, got "
                                                    r"a weight on cpu; move the model to a GPU first"):
            to_semi_structured(pruned)


# ---- CUDA: the kernels on a GPU ---------------------------------------------------------------------------------

@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 8, 130])
@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 32)])
def test_triton_kernel_on_cuda(dtype, batch, block):
    n, k = 200, 333
    w = sparse_weight(n, k, 0.8, block=block, dtype=dtype, device="cuda")
    w[: block[0]] = 0
    b = torch.randn(n, device="cuda", dtype=dtype)
    x = torch.randn(batch, k, device="cuda", dtype=dtype)
    module = BlockSparseLinear(pack_bsr(w, block), b)
    y = module(x)
    ref = F.linear(x.float(), w.float(), b.float())
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert y.dtype == dtype and y.shape == (batch, n)
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * 10)
    zero = pack_bsr(torch.zeros(n, k, device="cuda", dtype=dtype), block)
    torch.testing.assert_close(bsr_linear(x, zero, b), b.expand(batch, n))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_2to4_on_cuda(dtype):
    if torch.cuda.get_device_capability() < (8, 0):
        with pytest.raises(SparseFormatError, match="compute capability >= 8.0"):
            check_semi_structured(prune_2to4(torch.randn(64, 128, device="cuda", dtype=dtype)))
        return
    linear = torch.nn.Linear(128, 64).to("cuda", dtype)
    with torch.no_grad():
        linear.weight.copy_(prune_2to4(linear.weight))
    module = SemiStructuredLinear.from_linear(linear)
    x = torch.randn(4, 16, 128, device="cuda", dtype=dtype)
    torch.testing.assert_close(module(x), linear(x), rtol=2e-2, atol=2e-2)
    with pytest.raises(SparseFormatError, match="groups of 4 input columns hold more than 2 nonzeros"):
        to_semi_structured(torch.randn(64, 128, device="cuda", dtype=dtype))
    with pytest.raises(SparseFormatError, match=r"needs a weight shape that is a multiple of"):
        to_semi_structured(prune_2to4(torch.randn(64, 132, device="cuda", dtype=dtype)), backend="cutlass")


# ---- lower-sparse: the GPU formats --------------------------------------------------------------------------------

class GpuMix(torch.nn.Module):
    """A 1x1 conv and three Linears whose zeros suit block-sparse, 2:4, and neither."""

    def __init__(self):
        super().__init__()
        self.pw = torch.nn.Conv2d(64, 96, 1)
        self.tiled = torch.nn.Linear(96, 128)
        self.two4 = torch.nn.Linear(128, 64)
        self.scattered = torch.nn.Linear(64, 64)
        with torch.no_grad():
            self.pw.weight.copy_(sparse_weight(96, 64, 0.8, seed=1, block=(32, 32)).view(96, 64, 1, 1))
            self.tiled.weight.copy_(sparse_weight(128, 96, 0.8, seed=2, block=(16, 16)))
            self.two4.weight.copy_(prune_2to4(self.two4.weight))
            self.scattered.weight.copy_(sparse_weight(64, 64, 0.9, seed=3))

    def forward(self, x):
        x = torch.relu(self.pw(x)).mean((2, 3))
        return self.scattered(torch.relu(self.two4(torch.relu(self.tiled(x)))))


def lower_gpu_mix(device, target):
    import graphopt
    from graphopt import Context, PassManager
    from graphopt.passes.lower_sparse import LowerSparse

    dtype = torch.float16 if device == "cuda" else torch.float32
    model = GpuMix().eval().to(device, dtype)
    x = torch.randn(2, 64, 4, 4, device=device, dtype=dtype)
    gm = graphopt.trace(model, (x,))
    out, report = PassManager([LowerSparse(target=target)]).run(gm, Context((x,)))
    return model, x, out, report.records[-1].stats


def test_lower_sparse_gpu_target_on_cpu_uses_block_sparse_op():
    model, x, out, stats = lower_gpu_mix("cpu", "gpu")
    layers = stats["layers"]
    assert layers["pw"] == "bsr 32x32" and layers["tiled"] == "bsr 16x16"
    assert layers["two4"].startswith("dense: 2:4 unavailable (2:4 semi-structured sparsity runs on CUDA only")
    assert layers["scattered"] == ("dense: 100% of 32x32 tiles nonzero > gpu_max_tile_density 50%")
    assert stats["lowered"] == 2
    ops = [n.target for n in out.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.graphopt.bsr_linear.default) == 2
    torch.testing.assert_close(out(x), model(x))


def test_lower_sparse_auto_keeps_cpu_formats_for_cpu_weights():
    _, _, out, stats = lower_gpu_mix("cpu", "auto")
    assert not any(str(v).startswith(("bsr", "2:4")) for v in stats["layers"].values())
    assert torch.ops.graphopt.bsr_linear.default not in [n.target for n in out.graph.nodes]


@needs_cuda
def test_lower_sparse_picks_gpu_formats_for_cuda_weights():
    model, x, out, stats = lower_gpu_mix("cuda", "auto")
    layers = stats["layers"]
    assert layers["pw"] == "bsr 32x32" and layers["tiled"] == "bsr 16x16"
    if torch.cuda.get_device_capability() >= (8, 0):
        assert layers["two4"] == "2:4"
    torch.testing.assert_close(out(x), model(x), rtol=2e-2, atol=2e-2)
