"""Building the kernel library: cache, concurrent builders, and the torch fallback without a compiler."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from graphopt.errors import GraphoptWarning
from graphopt.kernels import build, pack


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """library() rebuilt from scratch into an empty cache, restored afterwards."""
    monkeypatch.setenv("GRAPHOPT_KERNEL_CACHE", str(tmp_path))
    build.library.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    build.library.cache_clear()


def _call(x, packed):
    return torch.ops.graphopt.sparse_linear(x, *packed.tensors(), None, packed.fmt, packed.in_features,
                                            packed.out_features, 1)


@pytest.mark.parametrize("how", ["missing compiler", "env"])
def test_fallback_warns_once_and_stays_correct(fresh_library, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("GRAPHOPT_KERNELS", "reference")
    else:
        monkeypatch.setenv("CXX", "/nonexistent/g++")
    w = torch.randn(20, 30) * (torch.rand(20, 30) > 0.8)
    x = torch.randn(3, 30)
    with pytest.warns(GraphoptWarning, match="graphopt sparse and quant kernels unavailable: .*using the .*torch reference"):
        y = _call(x, pack(w, "8x1"))
    torch.testing.assert_close(y, F.linear(x, w))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        torch.testing.assert_close(_call(x[:1], pack(w, "csr")), F.linear(x[:1], w))
    assert not list(fresh_library.glob("*.so"))


def test_cache_reuses_the_build(fresh_library):
    lib = build.library()
    assert lib is not None and lib.path.parent == fresh_library
    mtime = lib.path.stat().st_mtime_ns
    assert build.build(lib.isa) == lib.path and lib.path.stat().st_mtime_ns == mtime


def test_concurrent_builders_share_one_library(fresh_library):
    """Two processes building into the same empty cache at once both load a complete library."""
    code = ("from graphopt.kernels import build; import sys; lib = build.library(); "
            "sys.exit(0 if lib is not None and lib.lib.graphopt_isa_level() >= 0 else 1)")
    env = {**__import__("os").environ, "GRAPHOPT_KERNEL_CACHE": str(fresh_library)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(list(fresh_library.glob("kernels-*.so"))) == 1
    assert not [p for p in fresh_library.iterdir() if p.is_dir()]  # no temp dirs left behind
