"""Build, cache and load the C sparse kernels (kernels/csrc/sparse_linear.cpp) as a plain shared library.

No torch headers: ``g++ -O3 -shared`` takes about 2 s, against about a minute for
``torch.utils.cpp_extension.load_inline``. The library is built once per (source, compiler, flags) into
``$GRAPHOPT_KERNEL_CACHE`` (default ``~/.cache/graphopt/kernels``) under a name holding a hash of all three, and
published with an atomic rename, so parallel test workers building at once never load a half-written file.

The source is compiled per ISA level (AVX-512, AVX2+FMA, generic) and the best level this CPU supports is chosen
at run time. No compiler, a failed build, or ``GRAPHOPT_KERNELS=reference``: ``library()`` returns None after ONE
warning and the ops run their torch reference path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from graphopt.errors import GraphoptWarning

SOURCE = Path(__file__).parent / "csrc" / "sparse_linear.cpp"
_VARIANTS = {  # ISA level -> extra compiler flags; checked in this order
    "avx512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma"],
    "avx2": ["-mavx2", "-mfma"],
    "generic": [],
}
_CPU_FLAGS = {"avx512": {"avx512f", "avx512vl", "avx512bw", "avx512dq"}, "avx2": {"avx2", "fma"}, "generic": set()}
_BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]


class KernelLibrary:
    """The loaded shared library with typed entry points, and which ISA level it was built for."""

    def __init__(self, lib: ctypes.CDLL, isa: str, path: Path):
        self.lib, self.isa, self.path = lib, isa, path
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.graphopt_sparse_linear.argtypes = [i32, i32, p, p, p, p, p, p, i64, i64, i32]
        lib.graphopt_sparse_linear.restype = i32
        lib.graphopt_act_sparse_gemv.argtypes = [p, p, p, p, i64, i64, p, i32]
        lib.graphopt_act_sparse_gemv.restype = i32
        self.sparse_linear = lib.graphopt_sparse_linear
        self.act_sparse_gemv = lib.graphopt_act_sparse_gemv


def cache_dir() -> Path:
    """Where built libraries live: ``$GRAPHOPT_KERNEL_CACHE`` or ``~/.cache/graphopt/kernels``."""
    return Path(os.environ.get("GRAPHOPT_KERNEL_CACHE") or Path.home() / ".cache" / "graphopt" / "kernels")


def cpu_isa() -> str:
    """The best ISA level of this CPU among avx512 / avx2 / generic (from /proc/cpuinfo; generic elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "generic"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return next(isa for isa, need in _CPU_FLAGS.items() if need <= flags)


def compiler() -> str:
    """The C++ compiler to use: ``$CXX`` or ``g++``."""
    return os.environ.get("CXX", "g++")


@functools.lru_cache(maxsize=None)
def library() -> KernelLibrary | None:
    """The kernel library for this CPU, built on first use; None (one warning) when it cannot be had."""
    if os.environ.get("GRAPHOPT_KERNELS", "").lower() == "reference":
        _warn("GRAPHOPT_KERNELS=reference is set")
        return None
    isa = cpu_isa()
    try:
        path = build(isa)
        return KernelLibrary(ctypes.CDLL(str(path)), isa, path)
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        _warn(f"building the sparse kernels failed ({type(e).__name__}: {str(e).strip()[:300]})")
        return None


def _warn(why: str) -> None:
    warnings.warn(f"graphopt sparse kernels unavailable: {why}; using the (slower) torch reference path",
                  GraphoptWarning, stacklevel=3)


def build(isa: str) -> Path:
    """Compile the source for ``isa`` (cached by a hash of source, compiler and flags); the library's path."""
    cxx = shutil.which(compiler())
    if cxx is None:
        raise RuntimeError(f"no C++ compiler '{compiler()}' on PATH (set $CXX)")
    flags = _BASE_FLAGS + _VARIANTS[isa]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cxx, version, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / f"sparse_linear-{isa}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        for openmp in (["-fopenmp"], []):  # without libgomp the kernels still build, single-threaded
            done = subprocess.run([cxx, *flags, *openmp, str(SOURCE), "-o", str(out)],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"{cxx} failed: {done.stderr}")
        os.replace(out, target)  # atomic: a concurrent builder either sees no file or a complete one
    return target
