"""Sparse kernels against the dense reference: every format, shape, sparsity and batch; ISA builds; bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from graphopt.kernels import FORMATS, SparseFormatError, SparseLinear, library, pack, unpack, validate
from graphopt.kernels.build import KernelLibrary, build
from graphopt.kernels.formats import PackedWeight

SHAPES = [(1, 1), (5, 3), (7, 13), (37, 53), (64, 96), (129, 260), (300, 17)]
SPARSITIES = [0.0, 0.5, 0.9, 0.99]
BATCHES = [1, 3, 8, 64]


def zeroed(n: int, k: int, sparsity: float, fmt: str = "csr", seed: int = 0) -> torch.Tensor:
    """A random weight with about ``sparsity`` zeros laid out in ``fmt``'s pattern (csr: unstructured)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    rows, cols = {"8x1": (8, 1), "16x1": (16, 1), "1x4": (1, 4)}.get(fmt, (1, 1))
    keep = torch.rand(-(-n // rows), -(-k // cols), generator=gen) >= sparsity
    keep = keep.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:n, :k]
    return w * keep


def sparse_linear(x, packed, bias=None, threads=1):
    return torch.ops.graphopt.sparse_linear(x, *packed.tensors(), bias, packed.fmt, packed.in_features,
                                            packed.out_features, threads)


def formats_for(k: int):
    return [f for f in FORMATS if not (f == "1x4" and k < 4)]


def test_library_builds_for_this_cpu():
    lib = library()
    assert lib is not None and lib.path.exists()
    assert lib.isa in ("avx512vnni", "avx512", "avx2", "generic")


@pytest.mark.parametrize("n,k", SHAPES)
def test_every_format_matches_dense(n, k):
    """Each format (packed from weights with that format's pattern or unstructured zeros) equals F.linear."""
    for fmt, pattern, sparsity in itertools.product(formats_for(k), ["csr", "8x1", "1x4"], SPARSITIES):
        w = zeroed(n, k, sparsity, pattern, seed=n * k)
        bias = torch.randn(n) if sparsity != 0.5 else None
        packed = pack(w, fmt)
        assert torch.equal(unpack(packed), w)
        for batch in BATCHES:
            x = torch.randn(batch, k)
            torch.testing.assert_close(sparse_linear(x, packed, bias), F.linear(x, w, bias), rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"{fmt} {pattern} {n}x{k} s={sparsity} b={batch}: {m}")


def test_empty_rows_columns_and_all_zero_weight():
    w = zeroed(40, 36, 0.7)
    w[3] = 0
    w[8:16] = 0  # a whole empty 8-row group
    w[:, 5] = 0
    w[:, 32:] = 0  # the tail 1x4 run is empty
    for weight in (w, torch.zeros(40, 36)):
        for fmt in FORMATS:
            packed = pack(weight, fmt)
            for batch in (1, 8):
                x = torch.randn(batch, 36)
                bias = torch.ones(40)
                torch.testing.assert_close(sparse_linear(x, packed, bias), F.linear(x, weight, bias))


def test_leading_dims_threads_and_int32_indices():
    w = zeroed(33, 40000, 0.98)  # more inputs than int16 can address: int32 column indices
    packed = pack(w, "csr")
    assert packed.cols.dtype == torch.int32
    x = torch.randn(2, 3, 40000)
    torch.testing.assert_close(sparse_linear(x, packed, threads=2), F.linear(x, w), rtol=1e-4, atol=1e-4)
    assert pack(zeroed(8, 100, 0.9), "8x1").cols.dtype == torch.int16


def test_bf16_runs_through_fp32_kernels():
    """bf16 inputs are widened, multiplied with the fp32-packed weight and rounded back to bf16."""
    w = zeroed(64, 96, 0.9, "8x1").to(torch.bfloat16)
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    y = sparse_linear(x, pack(w, "8x1"))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x.float(), w.float()).bfloat16(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_other_isa_builds_match(isa):
    """The AVX2 and generic builds (chosen at run time on other CPUs) give the same numbers."""
    if isa == "avx2" and library().isa == "generic":
        pytest.skip("this CPU has no AVX2")
    import ctypes
    lib = KernelLibrary(ctypes.CDLL(str(build(isa))), isa, build(isa))
    assert lib.lib.graphopt_isa_level() == {"avx2": 1, "generic": 0}[isa]
    w = zeroed(45, 70, 0.8)
    for fmt in FORMATS:
        packed = pack(w, fmt)
        for batch in (1, 3, 17):
            x = torch.randn(batch, 70)
            from graphopt.kernels.ops import _run_kernel
            y = _run_kernel(lib, x, *packed.tensors(), None, fmt, 45, 1)
            torch.testing.assert_close(y, F.linear(x, w), rtol=1e-4, atol=1e-4)


def test_act_sparse_linear_skips_zero_inputs():
    w, b = torch.randn(130, 200), torch.randn(130)
    for batch in (1, 4):
        x = torch.relu(torch.randn(batch, 200))
        y = torch.ops.graphopt.act_sparse_linear(x, w.t().contiguous(), b, 1)
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    zeros = torch.zeros(1, 200)
    torch.testing.assert_close(torch.ops.graphopt.act_sparse_linear(zeros, w.t().contiguous(), b, 1), b[None])


def test_custom_ops_pass_opcheck():
    """Fake (meta) implementations agree with the real ones (shapes, dtypes, schema)."""
    packed = pack(zeroed(24, 40, 0.8, "8x1"), "8x1")
    for x in (torch.randn(1, 40), torch.randn(2, 5, 40)):
        results = torch.library.opcheck(torch.ops.graphopt.sparse_linear.default,
                                        (x, *packed.tensors(), torch.randn(24), "8x1", 40, 24, 1),
                                        test_utils=("test_schema", "test_faketensor"))
        assert results == {"test_schema": "SUCCESS", "test_faketensor": "SUCCESS"}
    torch.library.opcheck(torch.ops.graphopt.act_sparse_linear.default,
                          (torch.randn(1, 40), torch.randn(40, 24), None, 1),
                          test_utils=("test_schema", "test_faketensor"))


def test_sparse_linear_module_from_linear():
    linear = torch.nn.Linear(50, 30)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) > 0.9)
    for fmt in FORMATS:
        module = SparseLinear.from_linear(linear, fmt)
        x = torch.randn(4, 50)
        torch.testing.assert_close(module(x), linear(x))
        assert f"fmt={fmt}" in repr(module)


# ---------------------------------------------------------------- bad input


def test_pack_rejects_wrong_dtype_shape_and_format():
    with pytest.raises(SparseFormatError, match=r"fc1: expected a floating-point weight, got torch.int64"):
        pack(torch.ones(4, 4, dtype=torch.int64), "csr", what="fc1")
    with pytest.raises(SparseFormatError, match=r"expected a 2-D weight \(out_features, in_features\), got shape "
                                                r"\(4, 4, 1, 1\); reshape 1x1-conv weights with weight.flatten\(1\)"):
        pack(torch.ones(4, 4, 1, 1), "csr")
    with pytest.raises(SparseFormatError, match="unknown sparse format '4x4'; choose one of 8x1, 16x1, 1x4, csr"):
        pack(torch.ones(4, 4), "4x4")
    with pytest.raises(SparseFormatError, match="format 1x4 needs at least 4 input features, got 3; use 'csr'"):
        pack(torch.ones(4, 3), "1x4")


def test_strict_pack_rejects_a_mask_off_the_declared_pattern():
    w = zeroed(16, 32, 0.8, "8x1")
    pack(w, "8x1", strict=True)  # follows the pattern
    w[0, torch.nonzero(w[0])[0]] = 0  # one zero inside an 8x1 block
    with pytest.raises(SparseFormatError, match=r"fc: its zeros do not follow the 8x1 pattern \(1 zeros would be "
                                                r"stored inside 8x1 blocks\); prune with pattern '8x1'"):
        pack(w, "8x1", strict=True, what="fc")


def test_corrupted_packed_weights_are_rejected():
    good = pack(zeroed(16, 32, 0.8), "csr")
    v, c, p = good.tensors()
    bad_cols = c.clone()
    bad_cols[0] = 32
    cases = {
        "column indices must lie in \\[0, 31\\]": (v, bad_cols, p),
        "ptr must rise from 0 to the number of entries": (v, c, p.flip(0)),
        "values for": (v[:-1], c, p),
        "values must be a 1-D float32 tensor, got torch.float64": (v.double(), c, p),
        "ptr has 3 entries, expected 17": (v, c, p[:3]),
    }
    for message, (values, cols, ptr) in cases.items():
        corrupted = PackedWeight("csr", 16, 32, values, cols, ptr)
        with pytest.raises(SparseFormatError, match=message):
            validate(corrupted)
        with pytest.raises(SparseFormatError, match="re-pack it from the dense weight"):
            SparseLinear(corrupted)


def test_op_rejects_mismatched_input():
    packed = pack(zeroed(8, 16, 0.5), "8x1")
    with pytest.raises(SparseFormatError, match="input has 15 features, the packed weight expects 16"):
        sparse_linear(torch.randn(1, 15), packed)


def test_two_threads_match_one():
    for fmt in FORMATS:
        w = zeroed(300, 200, 0.8, fmt)
        packed = pack(w, fmt)
        for batch in (1, 9):
            x = torch.randn(batch, 200)
            torch.testing.assert_close(sparse_linear(x, packed, threads=2), sparse_linear(x, packed, threads=1))


def test_op_rejects_inconsistent_packed_tensors():
    packed = pack(zeroed(16, 32, 0.5), "8x1")
    values, cols, ptr = packed.tensors()
    with pytest.raises(SparseFormatError, match=r"8 values per column index \(\d+ values, \d+ indices\)"):
        torch.ops.graphopt.sparse_linear(torch.randn(1, 32), values[:-8], cols, ptr, None, "8x1", 32, 16, 1)
    with pytest.raises(SparseFormatError, match="ptr has 2 entries, which does not fit 16 outputs in format 8x1"):
        torch.ops.graphopt.sparse_linear(torch.randn(1, 32), values, cols, ptr[:2], None, "8x1", 32, 16, 1)
