"""Build, cache and load the C kernels (kernels/csrc/sparse_linear.cpp: sparse y = x Wᵀ + b; quant_linear.cpp:
weight-only int4/int8) as one plain shared library.

No torch headers: ``g++ -O3 -shared`` takes about 2 s, against about a minute for
``torch.utils.cpp_extension.load_inline``. The library is built once per (source, compiler, flags) into
``$GRAPHOPT_KERNEL_CACHE`` (default ``~/.cache/graphopt/kernels``) under a name holding a hash of all three, and
published with an atomic rename, so parallel test workers building at once never load a half-written file.

The sources are compiled per ISA level (AVX-512 with VNNI, AVX-512, AVX2+FMA, generic) and the best level this
CPU supports (its /proc/cpuinfo flags) is chosen at run time; ``load(isa)`` gives any other level this CPU can run
(tests check every one). The VNNI build also carries an AMX tile path, used when CPUID and the kernel allow it.
No compiler, a failed build, or ``GRAPHOPT_KERNELS=reference``: ``library()`` returns None after ONE warning and
the ops run their torch reference path.
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

_CSRC = Path(__file__).parent / "csrc"
SOURCES = (_CSRC / "sparse_linear.cpp", _CSRC / "quant_linear.cpp", _CSRC / "quant_amx.cpp")  # one library
HEADERS = (_CSRC / "quant_linear.h",)
SOURCE = SOURCES[0]  # the sparse kernels' source (the name older code imported)
_AVX512 = ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma"]
_VARIANTS = {  # ISA level -> extra compiler flags; checked in this order (best first)
    "avx512vnni": _AVX512 + ["-mavx512vnni"],  # vpdpbusd: the int8-compute quant kernels' dot product
    "avx512": _AVX512,
    "avx2": ["-mavx2", "-mfma"],
    "generic": [],
}
_CPU_FLAGS = {"avx512vnni": {"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512_vnni"},
              "avx512": {"avx512f", "avx512vl", "avx512bw", "avx512dq"}, "avx2": {"avx2", "fma"}, "generic": set()}
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
        # (bits, x, M, K, qweight, scales, zeros, bias, y, N, Kp, group, act_group, threads) -> status
        lib.graphopt_quant_linear.argtypes = [i32, p, i64, i64, p, p, p, p, p, i64, i64, i64, i64, i32]
        lib.graphopt_quant_linear.restype = i32
        lib.graphopt_quantize_activations.argtypes = [p, i64, i64, i64, i64, p, p, p]
        lib.graphopt_quantize_activations.restype = i32
        lib.graphopt_quant_use_amx.argtypes = [i32]
        lib.graphopt_quant_use_amx.restype = i32
        self.quant_linear = lib.graphopt_quant_linear
        self.quantize_activations = lib.graphopt_quantize_activations
        self.quant_use_amx = lib.graphopt_quant_use_amx


def cache_dir() -> Path:
    """Where built libraries live: ``$GRAPHOPT_KERNEL_CACHE`` or ``~/.cache/graphopt/kernels``."""
    return Path(os.environ.get("GRAPHOPT_KERNEL_CACHE") or Path.home() / ".cache" / "graphopt" / "kernels")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def supported_isas() -> list[str]:
    """Every ISA level this CPU can execute, best first (from /proc/cpuinfo; only generic elsewhere)."""
    flags = _cpu_flags()
    return [isa for isa, need in _CPU_FLAGS.items() if need <= flags]


def cpu_isa() -> str:
    """The best ISA level of this CPU among avx512vnni / avx512 / avx2 / generic."""
    return supported_isas()[0]


def compiler() -> str:
    """The C++ compiler to use: ``$CXX`` or ``g++``."""
    return os.environ.get("CXX", "g++")


@functools.lru_cache(maxsize=None)
def library() -> KernelLibrary | None:
    """The kernel library for this CPU, built on first use; None (one warning) when it cannot be had."""
    if os.environ.get("GRAPHOPT_KERNELS", "").lower() == "reference":
        _warn("GRAPHOPT_KERNELS=reference is set")
        return None
    try:
        return load(cpu_isa())
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        _warn(f"building the C kernels failed ({type(e).__name__}: {str(e).strip()[:300]})")
        return None


def load(isa: str) -> KernelLibrary:
    """The library built for ``isa`` (any level of ``supported_isas()``), uncached: tests run every variant."""
    path = build(isa)
    return KernelLibrary(ctypes.CDLL(str(path)), isa, path)


def _warn(why: str) -> None:
    warnings.warn(f"graphopt sparse and quant kernels unavailable: {why}; using the (slower) torch reference path",
                  GraphoptWarning, stacklevel=3)


def build(isa: str) -> Path:
    """Compile the sources for ``isa`` (cached by a hash of sources, compiler and flags); the library's path."""
    cxx = shutil.which(compiler())
    if cxx is None:
        raise RuntimeError(f"no C++ compiler '{compiler()}' on PATH (set $CXX)")
    flags = _BASE_FLAGS + _VARIANTS[isa]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    source = b"".join(src.read_bytes() for src in SOURCES + HEADERS)
    key = hashlib.sha256(source + " ".join([cxx, version, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / f"kernels-{isa}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        for openmp in (["-fopenmp"], []):  # without libgomp the kernels still build, single-threaded
            error = _compile(cxx, flags + openmp, Path(tmp), out)
            if error is None:
                break
        else:
            raise RuntimeError(f"{cxx} failed: {error}")
        os.replace(out, target)  # atomic: a concurrent builder either sees no file or a complete one
    return target


def _compile(cxx: str, flags: list[str], tmp: Path, out: Path) -> str | None:
    """Compile every source to an object at once (the sources build in ~2 s each; in parallel the library is
    ready in about the time of the slowest), then link ``out``; the compiler's errors, or None."""
    jobs = []
    for src in SOURCES:
        obj = tmp / f"{src.stem}.o"
        jobs.append((obj, subprocess.Popen([cxx, *flags, "-c", str(src), "-o", str(obj)], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE, text=True)))
    errors = []
    try:
        for _, job in jobs:
            err = job.communicate(timeout=300)[1]
            if job.returncode:
                errors.append(err)
    finally:  # a timeout leaves no compiler running behind
        for _, job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()
    if errors:
        return "\n".join(errors)
    done = subprocess.run([cxx, *flags, *(str(obj) for obj, _ in jobs), "-o", str(out)], capture_output=True,
                          text=True, timeout=300)
    return None if done.returncode == 0 else done.stderr
