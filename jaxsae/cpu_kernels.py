"""XLA:CPU kernels: `top_k` (`lax.top_k`'s exact results), the TopK encoder, a matmul, sparse backwards, a mix.

XLA:CPU's TopK partial-sorts an index vector per row on one thread: at [4096, 4608], k=32 it costs about
0.7 of the encoder matmul that feeds it; its scatter-adds (the SAE backward) run one thread too.
`cpu_kernels.cc` does them over XLA's intra-op threads: `top_k`, `encode_top_k` (the matmul and top-k of TopK
encoders fused, so the [B, M] pre-activation is never stored), `decoder_grads`, `encoder_grads` and `htopk_walk`,
which callers route through `on_cpu(kernel, xla_version, *args)`, and three differentiable ones: `matmul` (the
encoder's GEMM alone) and `attention` (causal grouped-query attention with RoPE, token-major), for
`lime_jax.model`'s inference forward, and `mix_sources` (LIMe v2's head mix over depth, which XLA runs as one small
dot per source). The library is compiled with the system C++ compiler on
first use and cached; GPU and TPU (and CPU without a compiler, or with JAXSAE_CPU_KERNELS=0) run the XLA versions.
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
import numpy as np

_SOURCE = Path(__file__).with_name("cpu_kernels.cc")
_TOPK, _ENCODE_TOPK, _MATMUL, _ATTENTION, _DECODER_GRADS, _ENCODER_GRADS, _HTOPK_WALK, _MIX, _MIX_BWD = (
    f"jaxsae_{n}_f32" for n in ("topk", "encode_topk", "matmul", "attention", "decoder_grads", "encoder_grads",
                                "htopk_walk", "mix", "mix_bwd"))


def _cache_dir() -> Path:
    root = os.environ.get("JAXSAE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxsae")
    return Path(root)


def _cpu_id() -> bytes:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return b"".join(sorted({line for line in f if line.startswith((b"model name", b"flags"))}))
    except OSError:
        return platform.processor().encode()


def _build() -> Path:
    """The kernels' shared library, compiled once per source, flags, jaxlib and CPU (atomic for parallel builds)."""
    import jaxlib

    flags = [os.environ.get("CXX", "c++"), "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
             f"-I{jax.ffi.include_dir()}"]
    # -march=native: the CPU's own vector width. Its model and flags are in the key, so hosts of another kind
    # that share this cache (a home folder on NFS) build their own instead of loading one they cannot run.
    tag = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), " ".join(flags).encode(), jaxlib.__version__.encode(),
                                      _cpu_id()])).hexdigest()[:16]
    lib = _cache_dir() / f"cpu_kernels-{tag}.so"
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
    """Whether the CPU kernels are built and registered (else the XLA paths run everywhere)."""
    if os.environ.get("JAXSAE_CPU_KERNELS", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        for name, fn in ((_TOPK, lib.JaxsaeTopKF32), (_ENCODE_TOPK, lib.JaxsaeEncodeTopKF32),
                         (_MATMUL, lib.JaxsaeMatmulF32), (_ATTENTION, lib.JaxsaeAttentionF32),
                         (_DECODER_GRADS, lib.JaxsaeDecoderGradsF32), (_ENCODER_GRADS, lib.JaxsaeEncoderGradsF32),
                         (_HTOPK_WALK, lib.JaxsaeHTopKWalkF32),
                         (_MIX, lib.JaxsaeMixF32), (_MIX_BWD, lib.JaxsaeMixBwdF32)):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(fn), platform="cpu")
    except (OSError, subprocess.CalledProcessError, AttributeError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"jaxsae: CPU kernels unavailable, using XLA's ({detail.strip()[:200]})")
        return False
    return True


def top_k(x_NxM: jax.Array, k: int, bias_M: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(values [..., k] descending, indices [..., k] int32) of the last axis of x + bias; equal to `jax.lax.top_k`.

    The kernel adds the bias ([M], or [..., M] over leading axes of x) as it reads each row, so x + bias is never
    stored: an SAE encoder's matmul output goes to the selection as it is.
    """
    if not 1 <= k <= x_NxM.shape[-1]:
        raise ValueError(f"top_k: k={k} is not in [1, {x_NxM.shape[-1]}] for an operand of shape {x_NxM.shape}")
    bias = jnp.zeros((0,), x_NxM.dtype) if bias_M is None else jnp.asarray(bias_M, x_NxM.dtype)
    if bias.size and (bias.shape[-1] != x_NxM.shape[-1] or x_NxM.shape[:bias.ndim - 1] != bias.shape[:-1]):
        raise ValueError(f"top_k: bias of shape {bias.shape} does not fit an operand of shape {x_NxM.shape}")
    return _top_k(x_NxM, bias, k)


def _bias_like(bias, x):
    """bias [..., M] over leading axes of x, reshaped to broadcast against x [..., N, M]."""
    return bias.reshape(bias.shape[:-1] + (1,) * (x.ndim - bias.ndim) + bias.shape[-1:])


def _top_k_xla(x, bias, k):
    return tuple(jax.lax.top_k(x + _bias_like(bias, x) if bias.size else x, k))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _top_k(x_NxM, bias, k):
    if x_NxM.dtype != jnp.float32 or not available():
        return _top_k_xla(x_NxM, bias, k)
    out = (jax.ShapeDtypeStruct(x_NxM.shape[:-1] + (k,), jnp.float32),
           jax.ShapeDtypeStruct(x_NxM.shape[:-1] + (k,), jnp.int32))

    def cpu(x, b):
        # Rows are independent, so a vmapped call is one call over the stacked rows (and bias rows).
        return tuple(jax.ffi.ffi_call(_TOPK, out, vmap_method="broadcast_all")(x, b))

    return tuple(jax.lax.platform_dependent(x_NxM, bias, cpu=cpu, default=functools.partial(_top_k_xla, k=k)))


@_top_k.defjvp
def _top_k_jvp(k, primals, tangents):
    (x, bias), (dx, dbias) = primals, tangents
    vals, idx = _top_k(x, bias, k)
    dvals = jnp.take_along_axis(dx, idx, axis=-1)
    if bias.size:
        dvals = dvals + jnp.take_along_axis(jnp.broadcast_to(_bias_like(dbias, x), x.shape), idx, axis=-1)
    return (vals, idx), (dvals, jnp.zeros(idx.shape, jax.dtypes.float0))


def encode_top_k(x_XxBxD: jax.Array, W_SxDxM: jax.Array, b_SxM: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(vals [S, B, k] descending, idx [S, B, k]) of the rows of x W_s + b_s, for x [1 or S, B, D] (the kernel):
    S TopK encoders with the matmul and the selection fused, so no [B, M] pre-activation is stored.

    Equal to `lax.top_k` of the product up to the product's float rounding (its sums run in another order than
    XLA's dot).
    """
    (S, D, M), (X, B, D_x) = W_SxDxM.shape, x_XxBxD.shape
    if X not in (1, S) or D_x != D or b_SxM.shape != (S, M) or not 1 <= k <= M:
        raise ValueError(f"encode_top_k: x {x_XxBxD.shape}, W {W_SxDxM.shape}, bias {b_SxM.shape} and k={k} do "
                         "not fit x [1 or S, B, D], W [S, D, M], bias [S, M], 1 <= k <= M")
    out = (jax.ShapeDtypeStruct((S, B, k), jnp.float32), jax.ShapeDtypeStruct((S, B, k), jnp.int32))
    return tuple(_call(_ENCODE_TOPK, *out)(x_XxBxD, W_SxDxM, b_SxM))


def matmul(x_RxD: jax.Array, W_DxN: jax.Array) -> jax.Array:
    """x @ W for float32 x [R, D], W [D, N] (the kernel; differentiable, its gradients by XLA's dots): the
    encoder's panels and tiles as a plain matmul, for inference forwards on XLA:CPU."""
    if x_RxD.ndim != 2 or W_DxN.ndim != 2 or x_RxD.shape[1] != W_DxN.shape[0]:
        raise ValueError(f"matmul: x {x_RxD.shape} and W {W_DxN.shape} do not fit x [R, D], W [D, N]")
    return _matmul(x_RxD, W_DxN)


@jax.custom_vjp
def _matmul(x_RxD, W_DxN):
    return _call(_MATMUL, (x_RxD.shape[0], W_DxN.shape[1]))(x_RxD, W_DxN)[0]


def _matmul_fwd(x_RxD, W_DxN):
    return _matmul(x_RxD, W_DxN), (x_RxD, W_DxN)


def _matmul_bwd(res, g_RxN):
    x_RxD, W_DxN = res
    return g_RxN @ W_DxN.T, x_RxD.T @ g_RxN


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def rope_tables(T: int, H: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) [T, H/2] float32 of rotate-half RoPE at positions 0..T-1: angle t * theta^(-2i/H)."""
    angle_TxH2 = np.arange(T, dtype=np.float64)[:, None] * theta ** (-np.arange(0, H, 2, dtype=np.float64) / H)
    return np.cos(angle_TxH2).astype(np.float32), np.sin(angle_TxH2).astype(np.float32)


def rotate_half(x_xH, cos_xH2, sin_xH2):
    """RoPE's rotation of pairs (i, i + H/2) of the last axis: cos and sin [..., H/2] broadcast against x."""
    H2 = x_xH.shape[-1] // 2
    x1, x2 = x_xH[..., :H2], x_xH[..., H2:]
    return jnp.concatenate([x1 * cos_xH2 - x2 * sin_xH2, x2 * cos_xH2 + x1 * sin_xH2], axis=-1)


def attention_xla(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, cos_TxH2, sin_TxH2):
    """`attention` written in jax.numpy (its gradient, and the path off XLA:CPU)."""
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxTxKxH.shape[2]
    rope = functools.partial(rotate_half, cos_xH2=cos_TxH2[:, None, :], sin_xH2=sin_TxH2[:, None, :])
    q_BxTxKxGxH = rope(q_BxTxNxH).reshape(B, T, K, N // K, H)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q_BxTxKxGxH, rope(k_BxTxKxH)) * H ** -0.5
    probs = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -jnp.inf), axis=-1)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_BxTxKxH).reshape(B, T, N, H)


def attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, cos_TxH2, sin_TxH2) -> jax.Array:
    """Causal grouped-query attention with rotate-half RoPE, token-major: o [B, T, N, H] for float32 q [B, T, N, H],
    k and v [B, T, K, H] (query head n reads KV head n // (N / K)), cos and sin [T, H/2] (`rope_tables`), scores
    scaled by H^-1/2 (the kernel; differentiable, its gradient by XLA through `attention_xla`)."""
    qs, ks = q_BxTxNxH.shape, k_BxTxKxH.shape
    if (len(qs) != 4 or len(ks) != 4 or ks[:2] != qs[:2] or ks[3] != qs[3] or v_BxTxKxH.shape != ks or qs[3] % 2
            or ks[2] == 0 or qs[2] % ks[2] or not jnp.shape(cos_TxH2) == jnp.shape(sin_TxH2) == (qs[1], qs[3] // 2)):
        raise ValueError(f"attention: q {qs}, k {ks}, v {v_BxTxKxH.shape}, cos {jnp.shape(cos_TxH2)} and sin "
                         f"{jnp.shape(sin_TxH2)} do not fit q [B, T, N, H], k and v [B, T, K, H] with N a multiple "
                         "of K, cos and sin [T, H/2], H even")
    return _attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, jnp.asarray(cos_TxH2), jnp.asarray(sin_TxH2))


@jax.custom_vjp
def _attention(q, k, v, cos, sin):
    return _call(_ATTENTION, q.shape)(q, k, v, cos, sin)[0]


def _attention_fwd(q, k, v, cos, sin):
    return _attention(q, k, v, cos, sin), (q, k, v, cos, sin)


def _attention_bwd(res, g):
    return jax.vjp(attention_xla, *res)[1](g)


_attention.defvjp(_attention_fwd, _attention_bwd)


def on_cpu(kernel, xla, *args):
    """kernel(*args) where XLA:CPU runs it and the kernels are built (float32/int32 operands), else xla(*args)."""
    if not available() or any(a.dtype not in (jnp.float32, jnp.int32) for a in args):
        return xla(*args)
    return jax.lax.platform_dependent(*args, cpu=kernel, default=xla)


def _call(target, *out):
    """The kernel `target` as a jax function; `out`: its results' shapes (float32) or ShapeDtypeStructs."""
    if not available():  # registers the kernels; without them only `on_cpu`'s XLA path can run
        raise RuntimeError("jaxsae: the CPU kernels are not built (see the warning above, or JAXSAE_CPU_KERNELS)")
    # Under vmap (seed ensembles) one call per seed, in a loop: each call already uses every core.
    shapes = tuple(s if isinstance(s, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(s, jnp.float32) for s in out)
    return jax.ffi.ffi_call(target, shapes, vmap_method="sequential")


def decoder_grads(g_BxD, W_MxD, idx_BxK, coef_BxK):
    """(dv [(S,) B, K], dW [(S,) M, D]) of TopK decoders from g, the gradient reaching x̂ (the kernel):
    dv[b, k] = g[b] · W[idx[b, k]] and dW[idx[b, k]] += coef[b, k] · g[b]."""
    return tuple(_call(_DECODER_GRADS, idx_BxK.shape, W_MxD.shape)(g_BxD, W_MxD, idx_BxK, coef_BxK))


def encoder_grads(idx_SxBxK, dpre_SxBxK, x_XxBxD, b_SxD, W_SxDxM):
    """(dW [S, D, M], dc [S, M], W·dc [S, D]) of S TopK encoders (x − b) W + c from dpre, the gradient reaching the
    selected pre-activations (the kernel): dW[s][:, idx] += dpre · (x[r] − b[s]), with r = s, or 0 for all seeds
    when x is [1, B, D]; b's gradient is then −W·dc."""
    S, D, M = W_SxDxM.shape
    return tuple(_call(_ENCODER_GRADS, (S, D, M), (S, M), (S, D))(idx_SxBxK, dpre_SxBxK, x_XxBxD, b_SxD, W_SxDxM))


def htopk_walk(vals_BxK, idx_BxK, W_dec_MxD, rK_BxD, coef_K, ct_r_BxD, sum_G: bool = False):
    """(dvals [B, K], dW_dec [M, D], G [B, D] (with `sum_G` its column sums [1, D]), sse [K]) of
    `htopk._walk_back` (the kernel)."""
    G_shape = (1, rK_BxD.shape[1]) if sum_G else rK_BxD.shape
    return tuple(_call(_HTOPK_WALK, idx_BxK.shape, W_dec_MxD.shape, G_shape, coef_K.shape)(
        vals_BxK, idx_BxK, W_dec_MxD, rK_BxD, coef_K, ct_r_BxD))


def _mix_xla(w_KxRxJ, *sources):
    return sum(jnp.einsum("KR,R...->K...", w_KxRxJ[..., j], src) for j, src in enumerate(sources))


def _mix_bwd_xla(w_KxRxJ, g_Kx, *sources):
    dw = jnp.stack([jnp.einsum("K...,R...->KR", g_Kx, src) for src in sources], axis=-1)
    dw = jnp.pad(dw, ((0, 0), (0, 0), (0, w_KxRxJ.shape[-1] - len(sources))))
    return (dw, *(jnp.einsum("KR,K...->R...", w_KxRxJ[..., j], g_Kx) for j in range(len(sources))))


@jax.custom_vjp
def mix_sources(w_KxRxJ: jax.Array, sources: tuple) -> jax.Array:
    """[K, ...]: the sum over sources j (each [R, ...]) of w[:, :, j] @ sources[j], contracting R.

    LIMe v2's head mix over depth (`lime_jax.model`). On CPU one kernel call reads each source once per
    direction, where XLA runs one small dot per source and adds up full-size partial sums.
    """
    K, R, J = w_KxRxJ.shape
    if not 1 <= len(sources) <= J or any(s.shape != sources[0].shape or s.shape[0] != R for s in sources):
        raise ValueError(f"mix_sources: w [K, R, J] = {w_KxRxJ.shape} needs 1..J sources of one shape [R, ...], "
                         f"got {[s.shape for s in sources]}")
    out = jax.ShapeDtypeStruct((K,) + sources[0].shape[1:], jnp.float32)
    return on_cpu(lambda w, *s: jax.ffi.ffi_call(_MIX, out, vmap_method="sequential")(w, *s), _mix_xla,
                  w_KxRxJ, *sources)


def _mix_sources_fwd(w_KxRxJ, sources):
    return mix_sources(w_KxRxJ, sources), (w_KxRxJ, sources)


def _mix_sources_bwd(res, g_Kx):
    w_KxRxJ, sources = res
    shapes = (jax.ShapeDtypeStruct(w_KxRxJ.shape, jnp.float32),
              *(jax.ShapeDtypeStruct(s.shape, jnp.float32) for s in sources))
    grads = on_cpu(lambda w, g, *s: tuple(jax.ffi.ffi_call(_MIX_BWD, shapes, vmap_method="sequential")(w, g, *s)),
                   _mix_bwd_xla, w_KxRxJ, g_Kx, *sources)
    return grads[0], tuple(grads[1:])


mix_sources.defvjp(_mix_sources_fwd, _mix_sources_bwd)
