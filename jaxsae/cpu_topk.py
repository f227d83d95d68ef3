"""`top_k`: `jax.lax.top_k`'s exact results, from a multi-threaded kernel when it runs on XLA:CPU.

XLA:CPU's TopK partial-sorts an index vector per row on one thread: at [4096, 4608], k=32 it costs about
0.7 of the encoder matmul that feeds it. `cpu_topk.cc` scans each row once against its current k-th best
and splits rows over XLA's intra-op threads. It is compiled with the system C++ compiler on first use and
cached; GPU and TPU (and CPU without a compiler, or with JAXSAE_CPU_TOPK=0) run `lax.top_k`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

_SOURCE = Path(__file__).with_name("cpu_topk.cc")
_TARGET = "jaxsae_topk_f32"


def _cache_dir() -> Path:
    root = os.environ.get("JAXSAE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxsae")
    return Path(root)


def _cpu_id() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return b"".join(sorted({line for line in f if line.startswith((b"model name", b"flags"))}))
    except OSError:
        return platform.processor().encode()


def _build() -> Path:
    """The kernel's shared library, compiled once per source and jaxlib version (atomic for parallel builds)."""
    import jaxlib

    flags = [os.environ.get("CXX", "c++"), "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
             f"-I{jax.ffi.include_dir()}"]
    # -march=native: the CPU's own vector width. Its model and flags are in the key, so hosts of another kind
    # that share this cache (a home folder on NFS) build their own instead of loading one they cannot run.
    tag = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), " ".join(flags).encode(), jaxlib.__version__.encode(),
                                      _cpu_id()])).hexdigest()[:16]
    lib = _cache_dir() / f"cpu_topk-{tag}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        subprocess.run(flags + [str(_SOURCE), "-o", str(out)], check=True, capture_output=True, text=True)
        os.replace(out, lib)
    return lib


@functools.cache
def available() -> bool:
    """Whether the CPU kernel is built and registered (else `top_k` is `lax.top_k` everywhere)."""
    if os.environ.get("JAXSAE_CPU_TOPK", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.JaxsaeTopKF32), platform="cpu")
    except (OSError, subprocess.CalledProcessError, AttributeError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"jaxsae: CPU top-k kernel unavailable, using lax.top_k ({detail.strip()[:200]})")
        return False
    return True


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def top_k(x_NxM: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(values [..., k] descending, indices [..., k] int32) of the last axis; equal to `jax.lax.top_k`."""
    if not 1 <= k <= x_NxM.shape[-1]:
        raise ValueError(f"top_k: k={k} is not in [1, {x_NxM.shape[-1]}] for an operand of shape {x_NxM.shape}")
    if x_NxM.dtype != jnp.float32 or not available():
        return jax.lax.top_k(x_NxM, k)
    out = (jax.ShapeDtypeStruct(x_NxM.shape[:-1] + (k,), jnp.float32),
           jax.ShapeDtypeStruct(x_NxM.shape[:-1] + (k,), jnp.int32))

    def cpu(x):
        # Rows are independent, so a vmapped call is one call over the stacked rows.
        return tuple(jax.ffi.ffi_call(_TARGET, out, vmap_method="broadcast_all")(x))

    return tuple(jax.lax.platform_dependent(x_NxM, cpu=cpu, default=lambda x: tuple(jax.lax.top_k(x, k))))


@top_k.defjvp
def _top_k_jvp(k, primals, tangents):
    vals, idx = top_k(primals[0], k)
    return (vals, idx), (jnp.take_along_axis(tangents[0], idx, axis=-1), jnp.zeros(idx.shape, jax.dtypes.float0))
