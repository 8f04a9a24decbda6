"""graphopt::quant_linear's C kernels against the torch reference: packing round trips, every ISA build this CPU
runs (and the AMX path on and off), activation codes bit for bit, opcheck, torch.compile, the reference fallback,
argument errors."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

from graphopt.kernels import build
from graphopt.kernels.modules import QuantLinear
from graphopt.kernels.quant_format import (TILE, _unpack_all_codes, act_group_for, dequantize, pack_quantized,
                                           padded_in_features, quantize_rtn, unpack_codes)
from graphopt.kernels.quant_ops import QuantKernelError, _run_kernel, quantize_activations, reference_quant_linear

N = 37  # not a multiple of the 16-row tile
SHAPES = [(100, 32), (100, 128), (100, None), (1000, 32), (1000, 128), (1000, None)]  # (K, group): K % group != 0
ROWS = [(1,), (3,), (17,), (2, 4)]  # leading dims of x: batch 1, 3, 17 and a 3-D input


def _weight(k: int, group: int | None, bits: int, symmetric: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, k, generator=gen) * torch.rand(N, 1, generator=gen) + 0.3 * torch.rand(N, k, generator=gen)
    codes, scales, zeros = quantize_rtn(w, bits, group, symmetric)
    return pack_quantized(codes, scales, None if symmetric else zeros, bits, group)


def _act_groups(qw) -> list[int]:
    """The default block, 0 (float compute), per-token for a per-channel weight, 8 (the smallest the C kernels take)."""
    groups = [act_group_for(qw.group_size), 0]
    if qw.group_size == qw.padded_in_features:
        groups.append(qw.padded_in_features)
    return groups + ([8] if qw.group_size == 32 else [])


def _assert_matches(y, ref, msg=""):
    scale = max(ref.abs().max().item(), 1e-30)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{msg}: {m}")


@pytest.fixture(scope="module")
def cases():
    """(label, packed weight, x, bias, act_group, reference) over every shape, width, grid and activation block."""
    out = []
    for (k, group), bits, symmetric in itertools.product(SHAPES, (4, 8), (True, False)):
        qw = _weight(k, group, bits, symmetric, seed=k + bits)
        for act, lead in itertools.product(_act_groups(qw), ROWS):
            x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(len(out)))
            bias = torch.randn(N) if len(out) % 2 else None
            out.append((f"K={k} g={group} bits={bits} sym={symmetric} act={act} x={tuple(x.shape)}", qw, x, bias, act,
                        reference_quant_linear(x, qw, bias, act)))
    return out


def _paths():
    """Every (ISA build, AMX on?) this CPU executes."""
    paths = []
    for isa in build.supported_isas():
        paths.append((isa, False))
        if isa == "avx512vnni" and build.load(isa).quant_use_amx(-1):
            paths.append((isa, True))
    return paths


@pytest.fixture(params=_paths(), ids=lambda p: f"{p[0]}{'-amx' if p[1] else ''}")
def kernel(request):
    """The library of one ISA level with AMX switched as asked (restored afterwards: library() shares the handle)."""
    isa, amx = request.param
    lib = build.load(isa)
    was = lib.quant_use_amx(-1)
    assert lib.quant_use_amx(1 if amx else 0) == int(amx)
    yield lib
    lib.quant_use_amx(was)


def _call(lib, x, qw, bias, act, threads=1):
    rows = x.numel() // qw.in_features
    return _run_kernel(lib, x, qw.qweight, qw.scales, qw.zeros, bias, qw.bits, qw.group_size, act, qw.in_features,
                       qw.out_features, threads, rows)


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("bits,symmetric,group", itertools.product((4, 8), (True, False), (32, 64, 128, None)))
def test_pack_round_trip(bits, symmetric, group):
    k = 200  # not a multiple of 64 or 128 (nor of 32 for per-channel padding)
    gen = torch.Generator().manual_seed(bits * 7 + (group or 0))
    groups = 1 if group is None else -(-k // group)
    codes = torch.randint(0, 2 ** bits, (N, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(N, groups, generator=gen) + 0.1
    zeros = torch.randint(0, 2 ** bits, (N, groups), generator=gen, dtype=torch.uint8)
    qw = pack_quantized(codes, scales, None if symmetric else zeros, bits, group)
    kp = padded_in_features(k, group)
    assert qw.qweight.shape == (-(-N // TILE), kp // (4 if bits == 8 else 8), 64)
    assert qw.padded_in_features == kp and qw.symmetric == symmetric
    back_codes, back_scales, back_zeros = unpack_codes(qw)
    assert torch.equal(back_codes, codes) and torch.equal(back_scales, scales)
    expect_zeros = torch.full_like(zeros, 2 ** (bits - 1)) if symmetric else zeros
    assert torch.equal(back_zeros, expect_zeros)
    g = kp if group is None else group
    w = scales.repeat_interleave(g, 1)[:, :k] * (codes.float() - expect_zeros.float().repeat_interleave(g, 1)[:, :k])
    torch.testing.assert_close(dequantize(qw), w, rtol=0, atol=0)
    # padding rows have scale 0, padding inputs hold the zero point: neither adds anything
    assert qw.scales.permute(0, 2, 1).reshape(-1, qw.groups)[N:].abs().sum() == 0
    padded = _unpack_all_codes(qw)
    assert torch.equal(padded[:N, :k], codes)
    assert torch.equal(padded[:N, k:], expect_zeros.repeat_interleave(g, 1)[:, k:kp])


def test_rtn_codes_reconstruct_the_weight():
    w = torch.randn(20, 70)
    for bits, symmetric in itertools.product((4, 8), (True, False)):
        codes, scales, zeros = quantize_rtn(w, bits, 32, symmetric)
        qw = pack_quantized(codes, scales, None if symmetric else zeros, bits, 32)
        step = scales.repeat_interleave(32, 1)[:, :70]
        assert ((dequantize(qw) - w).abs() <= step / 2 + 1e-6).all()


# ---------------------------------------------------------------- kernels against the reference

def test_every_shape_matches_the_reference(kernel, cases):
    for label, qw, x, bias, act, ref in cases:
        y = _call(kernel, x, qw, bias, act)
        assert y.shape == ref.shape and y.dtype == torch.float32
        _assert_matches(y, ref, f"{kernel.isa} {label}")


def test_extreme_codes_are_exact(kernel):
    """All codes at 0 / 2^bits - 1 against activations at +-127: the largest products (int16 saturation in a
    vpmaddubsw path would show here) and int32 block sums."""
    k = 512
    gen = torch.Generator().manual_seed(1)
    for bits, symmetric in itertools.product((4, 8), (True, False)):
        codes = torch.randint(0, 2, (N, k), generator=gen, dtype=torch.uint8) * (2 ** bits - 1)
        scales = torch.full((N, 1), 0.01)
        zeros = torch.randint(0, 2 ** bits, (N, 1), generator=gen, dtype=torch.uint8)
        qw = pack_quantized(codes, scales, None if symmetric else zeros, bits, None)
        x = torch.randint(0, 2, (17, k), generator=gen).float() * 2 - 1
        for act in (128, k):
            _assert_matches(_call(kernel, x, qw, None, act), reference_quant_linear(x, qw, None, act),
                            f"{kernel.isa} bits={bits} sym={symmetric} act={act}")


def test_activation_codes_are_identical(kernel):
    """The C quantizer gives torch's codes and scales bit for bit, round-half-to-even ties included."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 300, generator=gen) * torch.logspace(-6, 6, 5)[:, None]
    x[1, :64] = 0  # an all-zero block: scale 0, codes 0
    # ties: a block maximum of 127 gives the scale 1 exactly, so k + 0.5 stays a tie (round half to even: 0.5 -> 0,
    # 1.5 -> 2, 2.5 -> 2); a maximum of 254 gives 0.5, so odd integers are ties
    x[2, :64] = torch.arange(-31.5, 32.5)
    x[2, 0] = 127
    x[3, :64] = torch.arange(-63, 65, 2).float()
    x[3, 0] = 254
    for act in (32, 64, 320):
        kp = padded_in_features(300, 32) if act != 320 else 320
        xq = torch.empty(5, kp, dtype=torch.int8)
        xs = torch.empty(5, kp // act)
        xsum = torch.empty(5, kp // act, dtype=torch.int32)
        assert kernel.quantize_activations(x.data_ptr(), 5, 300, kp, act, xq.data_ptr(), xs.data_ptr(),
                                           xsum.data_ptr()) == 0
        ref_q, ref_s = quantize_activations(x, kp, act)
        assert torch.equal(xq.float(), ref_q) and torch.equal(xs, ref_s)
        assert torch.equal(xsum, ref_q.view(5, -1, act).sum(-1).int())


def test_nan_inputs_give_nan_rows(kernel):
    """A NaN input makes its row NaN, as in the reference (the comparisons of the block maximum skip NaN)."""
    qw = _weight(1000, 128, 4, True)
    x = torch.randn(17, 1000)
    x[3, 500] = float("nan")
    x[5, 7] = float("nan")
    for act in (128, 0):
        y, ref = _call(kernel, x, qw, None, act), reference_quant_linear(x, qw, None, act)
        assert torch.equal(y.isnan(), ref.isnan()) and y.isnan()[[3, 5]].all() and not y.isnan()[:3].any()
        _assert_matches(y[:3], ref[:3], f"{kernel.isa} act={act}")


def test_threads_agree(kernel):
    qw = _weight(1000, 128, 4, False)
    x = torch.randn(17, 1000)
    for act in (128, 0):
        torch.testing.assert_close(_call(kernel, x, qw, None, act, threads=2), _call(kernel, x, qw, None, act))


# ---------------------------------------------------------------- the op

def _op(x, qw, bias=None, act=None, threads=1, **override):
    args = dict(qweight=qw.qweight, scales=qw.scales, zeros=qw.zeros, bias=bias, bits=qw.bits,
                group_size=qw.group_size, act_group=act_group_for(qw.group_size) if act is None else act,
                in_features=qw.in_features, out_features=qw.out_features, threads=threads)
    args.update(override)
    return torch.ops.graphopt.quant_linear(x, *args.values())


def test_op_uses_the_library_and_matches():
    assert build.library() is not None
    qw = _weight(1000, 32, 4, True)
    x = torch.randn(3, 1000)
    for act in (32, 0, 4):  # 4: not a multiple of 8, the op runs the torch reference
        _assert_matches(_op(x, qw, act=act), reference_quant_linear(x, qw, None, act), f"act={act}")


def test_half_precision_inputs_round_back():
    qw = _weight(100, 32, 8, False)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(3, 100).to(dtype)
        y = _op(x, qw)
        assert y.dtype == dtype
        torch.testing.assert_close(y, reference_quant_linear(x.float(), qw, None, 32).to(dtype))


def test_opcheck():
    for (k, group, bits, symmetric), lead in zip([(100, 32, 4, True), (1000, 128, 8, False), (100, None, 4, False)],
                                                 [(1,), (3,), (2, 4)]):
        qw = _weight(k, group, bits, symmetric)
        for act in (act_group_for(qw.group_size), 0):
            args = (torch.randn(*lead, k), qw.qweight, qw.scales, qw.zeros, torch.randn(N), bits, qw.group_size, act,
                    k, N, 1)
            results = torch.library.opcheck(torch.ops.graphopt.quant_linear.default, args,
                                            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
            assert results == {"test_schema": "SUCCESS", "test_faketensor": "SUCCESS",
                               "test_aot_dispatch_static": "SUCCESS"}


def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    module = QuantLinear.from_linear(torch.nn.Linear(100, N), bits=4, group_size=32)
    x = torch.randn(3, 100)
    compiled = torch.compile(module, backend="inductor", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x), rtol=0, atol=0)
        torch.testing.assert_close(compiled(x[:1]), module(x[:1]), rtol=0, atol=0)


def test_reference_fallback_in_a_subprocess(tmp_path):
    """GRAPHOPT_KERNELS=reference: one warning, no library, the torch reference with the same result."""
    qw = _weight(1000, 128, 4, False)
    x = torch.randn(3, 1000)
    torch.save({"qw": qw, "x": x}, tmp_path / "case.pt")
    code = ("import sys, torch, warnings; from graphopt.kernels import build; import graphopt.kernels.quant_ops; "
            "d = torch.load(sys.argv[1], weights_only=False); qw = d['qw']\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    y = torch.ops.graphopt.quant_linear(d['x'], qw.qweight, qw.scales, qw.zeros, None, 4, 128, 128, "
            "1000, 37, 1)\n"
            "    torch.ops.graphopt.quant_linear(d['x'], qw.qweight, qw.scales, qw.zeros, None, 4, 128, 0, 1000, 37, "
            "1)\n"
            "from graphopt.errors import GraphoptWarning\n"
            "ours = [str(m.message) for m in w if issubclass(m.category, GraphoptWarning)]\n"
            "assert build.library() is None and len(ours) == 1 and 'GRAPHOPT_KERNELS=reference' in ours[0], ours\n"
            "torch.save(y, sys.argv[2])")
    env = {**os.environ, "GRAPHOPT_KERNELS": "reference"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "case.pt"), str(tmp_path / "y.pt")], env=env,
                   check=True, timeout=120)
    fallback = torch.load(tmp_path / "y.pt")
    _assert_matches(_op(x, qw), fallback, "C kernel vs reference fallback")
    assert torch.equal(fallback, reference_quant_linear(x, qw, None, 128))


@pytest.mark.parametrize("override,match", [
    ({"in_features": 99}, "input has 100 features, the packed weight expects 99"),
    ({"bits": 3}, "bits must be 4 or 8"),
    ({"act_group": 24}, "act_group must be 0 .* or divide group_size 32"),
    ({"act_group": -1}, "act_group must be 0"),
    ({"out_features": 50}, "qweight must be uint8 \\(4, Kp/8, 64\\)"),
    ({"group_size": 64}, "padded K 128 is not a multiple of group_size 64|scales must be float32"),
    ({"bias": torch.randn(5)}, "bias must have shape \\(37,\\)"),
    ({"scales": torch.ones(3, 4, 16, dtype=torch.float64)}, "scales must be float32"),
    ({"zeros": torch.ones(3, 4, 16)}, "zeros must be empty \\(symmetric\\) or uint8"),
])
def test_argument_errors(override, match):
    qw = _weight(100, 32, 4, True)
    with pytest.raises(QuantKernelError, match=match):
        _op(torch.randn(2, 100), qw, **override)


def test_non_float_input_is_rejected():
    qw = _weight(100, 32, 4, True)
    with pytest.raises(QuantKernelError, match="input must be a float tensor"):
        _op(torch.ones(2, 100, dtype=torch.int64), qw)
