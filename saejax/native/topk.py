"""The native top-k: build (once per machine), registration, and the jax-level op."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

SOURCE = Path(__file__).with_name("topk.cc")
TARGET = "saejax_topk_f32"
# Tried in order: the first that compiles is kept (-march=native vectorises the block
# maxima; a compiler that rejects it still builds the portable form).
FLAGS = (("-O3", "-march=native"), ("-O3",))


def cache_dir() -> Path:
    """Where compiled kernels are kept (see the package docstring)."""
    if os.environ.get("SAEJAX_NATIVE_CACHE"):
        return Path(os.environ["SAEJAX_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "saejax" / "native"


def _cpu_id() -> str:
    """The machine and its CPU flags (a -march=native build runs only where it was built)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + flags


def build(cxx: str | None = None, out_dir: Path | None = None) -> Path:
    """Compiles ``topk.cc`` (or finds it compiled) and returns the shared library's path.

    Raises RuntimeError with one line saying why when there is no compiler or it fails.
    """
    cxx = cxx or os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if not cxx or not shutil.which(cxx):
        raise RuntimeError(f"no C++ compiler found (tried $CXX, c++, g++, clang++; got {cxx!r})")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cxx} --version failed: {e}") from e
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, jax.__version__.encode(), version.encode(),
                                     _cpu_id().encode(), repr(FLAGS).encode()])).hexdigest()[:20]
    if out_dir is None:
        out_dir = cache_dir()
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError:  # no writable home (some CI runners): a per-user temporary folder
            out_dir = Path(tempfile.gettempdir()) / f"saejax-native-{os.getuid()}"
    out_dir = Path(out_dir)
    lib = out_dir / f"topk-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in FLAGS:
        # Built under a unique name and renamed: concurrent builders (test workers) each
        # finish their own file and the rename is atomic.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        cmd = [cxx, *flags, "-std=c++17", "-shared", "-fPIC", "-w", "-I", jax.ffi.include_dir(),
               str(SOURCE), "-o", tmp]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            r = None
            errors.append(str(e))
        if r is not None and r.returncode == 0:
            os.replace(tmp, lib)
            return lib
        os.unlink(tmp)
        if r is not None:
            lines = (r.stderr or r.stdout).strip().splitlines()
            errors.append(lines[0] if lines else f"exit {r.returncode}")
    raise RuntimeError(f"{cxx} could not build {SOURCE.name}: {errors[-1]}")


@functools.cache
def _load() -> tuple[bool, str | None]:
    """(registered, why not): builds and registers the FFI target once per process."""
    if os.environ.get("SAEJAX_NATIVE", "1") == "0":
        return False, "disabled by SAEJAX_NATIVE=0"
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SaejaxTopK), platform="cpu")
    except (RuntimeError, OSError, AttributeError) as e:
        warnings.warn(f"saejax: the native top-k is off, lax.top_k runs instead: {e}",
                      RuntimeWarning, stacklevel=3)
        return False, str(e)
    return True, None


def available() -> bool:
    """Whether the native kernel is built and registered (builds it if needed)."""
    return _load()[0]


def build_error() -> str | None:
    """Why the native kernel is not available (None when it is)."""
    return _load()[1]


def top_k(x: Float[Array, "... n"], k: int) -> tuple[Float[Array, "... k"], Int[Array, "... k"]]:
    """``lax.top_k(x, k)``: the same values and indices, from the native kernel on the CPU.

    Differentiable like ``lax.top_k`` (the values are gathered from ``x``). Runs
    ``lax.top_k`` where the kernel does not apply (see the package docstring).
    """
    k = int(k)
    if (jax.default_backend() != "cpu" or x.dtype != jnp.float32 or x.ndim == 0
            or not 1 <= k <= x.shape[-1] or x.size == 0 or not available()):
        return jax.lax.top_k(x, k)
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (k,), jnp.int32)
    idx = jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")(jax.lax.stop_gradient(x))
    return jnp.take_along_axis(x, idx, axis=-1), idx
