"""Llama decoder (RMSNorm, rotate-half RoPE, GQA, SwiGLU) with LIMe K/V routing, as pure functions.

Params are a dict; per-layer weights are stacked on a leading L axis (plain Llama runs them under `lax.scan`):
  embed [V, D], final_norm [D], unembed [D, V] (untied only), and layers:
  attn_norm [L, D], wq [L, D, N, H], wk/wv [L, D, K, H], wo [L, N, H, D],
  mlp_norm [L, D], w_gate/w_up [L, D, F], w_down [L, F, D], router (LIMe only, shapes in `init`).

Layer index convention: layer l is the residual stream after block l (0-based).

LIMe routing changes only what attention's keys and values read; queries are never mixed. Layer 0 has a single
source (itself), so it has no router, as in the official code (corl-team/lime, v2: a fixed identity slice; for
v1 a softmax over one source is the constant 1): routers are stacked over layers 1..L-1 only, leading axis
L - 1, row i belonging to layer i + 1. They are stored fixed-width over all L source layers (so they stack);
layer l reads only sources j <= l, and the entries of later layers are zero and unused. A one-hot router on
the current layer reproduces plain Llama (`to_lime` converts a Llama that way).
  static  (v1): K/V head r reads sum_j softmax_j(router[l-1, r, j]) * rms(h_j), h_j the state entering layer j.
  dynamic (v1): the same, with per-token logits norm(h_l) @ w + b: a linear on the current normalised state
                plus a static per-(head, source) bias b (zero from scratch; it lets `to_lime` start at one-hot).
  v2:           K/V heads read an unconstrained mix (router [L-1, K, L, K]) of every earlier layer's pre-RoPE K||V.
Routed models run their layers in an unrolled Python loop over a growing tuple of earlier states: summing
per-source terms keeps one copy of each state for the backward pass (O(L B T D)), where a scan carrying a
stacked buffer would store the whole buffer at every layer (O(L^2 B T D)); v1's per-head mixes [K, B, T, D] are
recomputed in the backward pass, not stored (`_mix_project`); v2's head mix over depth runs on CPU as one
C++ kernel per layer and direction (`jaxsae.cpu_kernels.mix_sources`; XLA's per-source dots cost a quarter of
the step at d=64). Attention and the routed mixes run
head-major ([B, heads, T, H], [K, B, T, ...]), the layout of their batched matmuls, and K and V come from one
matmul over wk||wv.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import cpu_kernels
from jaxsae.adapter import token_nll  # noqa: F401  (the LM loss lives once, with the adapter contract)
from lime_jax import sharding as lm_sharding
from lime_jax.config import ROUTINGS, LlamaConfig

Params = dict


def init(key: jax.Array, cfg: LlamaConfig) -> Params:
    """Random float32 parameters: N(0, 1/fan_in) matmul weights, N(0, 0.02) embeddings, unit norm gains.

    Not jitted (compiling the RNG costs more than running it); wrap it in `jax.jit(..., out_shardings=...)` to
    create sharded parameters in place.
    """
    L, D, N, K, H, F, V = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab
    ks = iter(jax.random.split(key, 10))

    def normal(shape, std):
        return std * jax.random.normal(next(ks), shape, jnp.float32)

    layers = {
        "attn_norm": jnp.ones((L, D)),
        "wq": normal((L, D, N, H), D ** -0.5),
        "wk": normal((L, D, K, H), D ** -0.5),
        "wv": normal((L, D, K, H), D ** -0.5),
        "wo": normal((L, N, H, D), (N * H) ** -0.5),
        "mlp_norm": jnp.ones((L, D)),
        "w_gate": normal((L, D, F), D ** -0.5),
        "w_up": normal((L, D, F), D ** -0.5),
        "w_down": normal((L, F, D), F ** -0.5),
    }
    # Routers of layers l = 1..L-1 (row l - 1); layer l reads source layers j <= l.
    layer_R = jnp.arange(1, L)
    mask_RxJ = (jnp.arange(L)[None, :] <= layer_R[:, None]).astype(jnp.float32)
    if cfg.routing == "static":  # router [L-1, K, L]: logits over source layers j per KV head
        layers["router"] = normal((L - 1, K, L), cfg.router_init) * mask_RxJ[:, None, :]
    elif cfg.routing == "dynamic":  # per-token logits = norm(h) @ w + b: w [L-1, D, K, L], b [L-1, K, L]
        layers["router"] = {"w": normal((L - 1, D, K, L), cfg.router_init) * mask_RxJ[:, None, None, :],
                            "b": jnp.zeros((L - 1, K, L))}
    elif cfg.routing == "v2":  # router [L-1, K, L, K]: (target head, source layer, source head), U(+-sqrt(3/fan_in))
        fan_in = (layer_R + 1.0) * K
        bound = jnp.sqrt(3.0 / fan_in)[:, None, None, None]
        w = jax.random.uniform(next(ks), (L - 1, K, L, K), minval=-1.0, maxval=1.0) * bound
        current = layer_R[:, None, None, None] == jnp.arange(L)[None, None, :, None]
        layers["router"] = jnp.where(current, jnp.eye(K)[None, :, None, :], w) * mask_RxJ[:, None, :, None]
    params = {"embed": normal((V, D), 0.02), "final_norm": jnp.ones((D,)), "layers": layers}
    if not cfg.tie_embeddings:
        params["unembed"] = normal((D, V), D ** -0.5)
    return params


def to_lime(params: Params, cfg: LlamaConfig, routing: str, logit_gap: float = 20.0) -> tuple[Params, LlamaConfig]:
    """A plain Llama as a LIMe model computing the same function: routers that read only the current layer.

    v2: the identity on the current layer's heads, zero elsewhere (exact; v2 is linear in its router, so every
    entry gets a full-size gradient). static / dynamic (v1): a softmax cannot be exactly one-hot, so earlier
    sources get logit -logit_gap against 0 on the current layer (static logits; dynamic bias, with zero
    per-token weights). The default 20 leaves each earlier source a weight e^-20 = 2e-9, below float32
    rounding even summed over 30 layers; those routers are saturated, so their gradients are ~e^-gap times
    the v2 ones: lower the gap to trade exactness for learning speed.
    """
    if cfg.routing != "none":
        raise ValueError(f"to_lime converts a plain Llama (routing='none'), got routing={cfg.routing!r}")
    if routing not in ROUTINGS or routing == "none":
        raise ValueError(f"routing={routing!r} not in {ROUTINGS[1:]}")
    if not logit_gap > 0:
        raise ValueError(f"logit_gap must be positive, got {logit_gap}")
    if "router" in params["layers"]:
        raise ValueError("params already hold a router, but cfg.routing='none'")
    L, D, K = cfg.n_layers, cfg.d_model, cfg.n_kv_heads
    source_J = jnp.arange(L)[None, :]
    layer_R = jnp.arange(1, L)[:, None]  # router rows belong to layers 1..L-1
    if routing == "v2":
        current_RxJ = (source_J == layer_R).astype(jnp.float32)
        router = jnp.einsum("RJ,KS->RKJS", current_RxJ, jnp.eye(K))  # [L-1, K, L, K]
    else:
        logits_RxJ = jnp.where(source_J < layer_R, -float(logit_gap), 0.0).astype(jnp.float32)
        logits_RxKxJ = jnp.broadcast_to(logits_RxJ[:, None, :], (L - 1, K, L))
        router = logits_RxKxJ if routing == "static" else {"w": jnp.zeros((L - 1, D, K, L)), "b": logits_RxKxJ}
    return {**params, "layers": {**params["layers"], "router": router}}, dataclasses.replace(cfg, routing=routing)


def _rms(x: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) over the last axis, computed in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def _rope(x_xTxH: jax.Array, theta: float) -> jax.Array:
    """Rotate-half RoPE at positions 0..T-1 along axis -2 (pairs i and i + H/2, the HF Llama layout)."""
    T, H = x_xTxH.shape[-2], x_xTxH.shape[-1]
    # The angles are static, so the cos/sin tables are numpy constants: computed in the program, XLA fuses them
    # into each consumer and evaluates two transcendentals per element of q and k (~2% of SmolLM2's forward).
    cos, sin = cpu_kernels.rope_tables(T, H, theta)
    return cpu_kernels.rotate_half(x_xTxH.astype(jnp.float32), cos, sin).astype(x_xTxH.dtype)


def _attention(q_BxNxTxH, k_BxKxSxH, v_BxKxSxH, cfg: LlamaConfig) -> jax.Array:
    """Causal GQA on head-major tensors (query head n = k * G + g attends with KV head k = n // G).

    Head-major [B, heads, T, H] is the layout of the two batched dots (batch B and the KV head, rows (G, T)),
    so they run without transposing their operands or results.
    """
    B, N, T, H = q_BxNxTxH.shape
    K = cfg.n_kv_heads
    q_BxKxGxTxH = _rope(q_BxNxTxH, cfg.rope_theta).reshape(B, K, N // K, T, H)
    k_BxKxSxH = _rope(k_BxKxSxH, cfg.rope_theta)
    scores = jnp.einsum("BKGTH,BKSH->BKGTS", q_BxKxGxTxH, k_BxKxSxH).astype(jnp.float32) * H ** -0.5
    causal_TxS = jnp.tril(jnp.ones((T, T), bool))
    probs = jax.nn.softmax(jnp.where(causal_TxS, scores, -jnp.inf), axis=-1).astype(v_BxKxSxH.dtype)
    return jnp.einsum("BKGTS,BKSH->BKGTH", probs, v_BxKxSxH).reshape(B, N, T, H)


def _wkv(lp: Params) -> jax.Array:
    """K and V projection weights side by side, [D, K, 2H] (keys then values per head), for one matmul."""
    return lp["wkv"] if "wkv" in lp else jnp.concatenate([lp["wk"], lp["wv"]], axis=-1)


def _head_major(a_BxTxNxH: jax.Array) -> jax.Array:
    """[B, T, heads, H] -> [B, heads, T, H]. Projections are written as plain matmuls then this transpose: as a
    head-major einsum, XLA:CPU transposed the weights and the input of each projection on every call instead."""
    return jnp.swapaxes(a_BxTxNxH, 1, 2)


def _split_kv(kv_BxKxTx2H):
    H = kv_BxKxTx2H.shape[-1] // 2
    return kv_BxKxTx2H[..., :H], kv_BxKxTx2H[..., H:]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mix(spec: str, w, sources: tuple):
    """Routing's mix over depth: the sum over sources j of einsum(spec, w[..., j], sources[j]).

    One einsum per source, not a broadcast product (autodiff would store each broadcast copy). The backward
    is written out below: with JAX's own for this sum, the training step of dynamic routing ran 5-13% slower
    (L=16, d=128), though it compiled to as many dots and bytes. (v2's head mix is `cpu_kernels.mix_sources`.)
    """
    return sum(jnp.einsum(spec, w[..., j], src) for j, src in enumerate(sources))


def _mix_fwd(spec, w, sources):
    return _mix(spec, w, sources), (w, sources)


def _mix_bwd(spec, residuals, g):
    """Each gradient one einsum: of w[..., j] against source j, of source j against w[..., j]."""
    w, sources = residuals
    ins, out = spec.split("->")
    w_spec, src_spec = ins.split(",")
    dw = jnp.stack([jnp.einsum(f"{out},{src_spec}->{w_spec}", g, src) for src in sources], axis=-1)
    return dw, tuple(jnp.einsum(f"{w_spec},{out}->{src_spec}", w[..., j], g) for j in range(len(sources)))


_mix.defvjp(_mix_fwd, _mix_bwd)


# The kernel packs W on every call, a cost of D*N against R*D*N multiply-adds: at 128 rows XLA's dots were faster
# on SmolLM2's forward (exploration runs on a 2-core Zen 3, paired, the attention kernel on both sides: XLA's time
# over the kernel's 0.94 at 128 rows, 1.04 at 256, 1.05-1.13 at 512).
_KERNEL_MIN_ROWS = 256


def _dense(x_BxTxD: jax.Array, w_Dx: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """x @ w over D for w [D, ...]: [B, T, ...]; a plain [B*T, D] x [D, N] matmul (jaxsae's kernel on XLA:CPU
    where cfg.cpu_matmul, float32 and at least _KERNEL_MIN_ROWS rows)."""
    B, T, D = x_BxTxD.shape
    if (not cfg.cpu_matmul or B * T < _KERNEL_MIN_ROWS or x_BxTxD.dtype != jnp.float32
            or w_Dx.dtype != jnp.float32):
        return jnp.einsum("BTD,D...->BT...", x_BxTxD, w_Dx)
    y_RxN = cpu_kernels.on_cpu(cpu_kernels.matmul, jnp.matmul, x_BxTxD.reshape(B * T, D), w_Dx.reshape(D, -1))
    return y_RxN.reshape(B, T, *w_Dx.shape[1:])


def _own_kv(lp: Params, x_BxTxD: jax.Array, cfg: LlamaConfig):
    """This layer's own K and V from its normed input, head-major [B, K, T, H] each (no routing)."""
    return _split_kv(_head_major(_dense(x_BxTxD, _wkv(lp), cfg)))


def _keys_values(lp: Params, h_BxTxD, x_BxTxD, sources: tuple, cfg: LlamaConfig):
    """Attention's K and V for this layer, head-major [B, K, T, H] (routed under LIMe), and the sources with
    this layer's appended."""
    dt = x_BxTxD.dtype
    if cfg.routing == "none":
        return (*_own_kv(lp, x_BxTxD, cfg), sources)
    n = len(sources) + 1  # this layer reads sources 0..l
    if cfg.routing == "v2":
        # Sources head-major [K, B, T, 2H]: mixing heads over depth is then [K, R] x [R, B*T*2H] per source.
        # The projection is written as a plain matmul and a transpose: 2-3% faster than the head-major einsum.
        kv_KxBxTx2H = jnp.transpose(jnp.einsum("BTD,DKE->BTKE", x_BxTxD, _wkv(lp)), (2, 0, 1, 3))
        sources = sources + (kv_KxBxTx2H,)
        if n > 1:  # layer 0: no router, its own K/V (the official fixed identity slice)
            w_KxRxJ = jnp.moveaxis(lp["router"][:, :n], 1, -1)
            kv_KxBxTx2H = cpu_kernels.mix_sources(w_KxRxJ, sources)  # one fused pass on CPU (XLA elsewhere)
        return (*_split_kv(jnp.swapaxes(kv_KxBxTx2H, 0, 1)), sources)
    # v1: mix gain-free normalised states over depth, then apply this layer's norm gain (mixing is linear).
    sources = sources + (_rms(h_BxTxD, cfg.norm_eps).astype(dt),)
    if n == 1:  # layer 0: a softmax over one source is 1, so no router and the plain projection
        return (*_own_kv(lp, x_BxTxD, cfg), sources)
    if cfg.routing == "static":
        w = jax.nn.softmax(lp["router"][:, :n].astype(jnp.float32), axis=-1).astype(dt)  # [K, J]
        spec = "K,BTD->KBTD"
    else:
        logits_BxTxKxJ = (jnp.einsum("BTD,DKJ->BTKJ", x_BxTxD, lp["router"]["w"][..., :n]).astype(jnp.float32)
                          + lp["router"]["b"][:, :n].astype(jnp.float32))
        w = jax.nn.softmax(logits_BxTxKxJ, axis=-1).astype(dt)  # per token: [B, T, K, J]
        spec = "BTK,BTD->KBTD"
    # The norm gain scales the (small) projection weights rather than the mix: same result, less traffic.
    wkv_KxDx2H = jnp.einsum("DKE,D->KDE", _wkv(lp), lp["attn_norm"])
    kv_KxBxTx2H = _mix_project(spec, w, sources, wkv_KxDx2H)
    return (*_split_kv(jnp.swapaxes(kv_KxBxTx2H, 0, 1)), sources)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mix_project(spec: str, w, sources: tuple, wkv_KxDx2H):
    """v1's K/V: the head-major mix [K, B, T, D] of the sources, projected per head (a batched matmul over K).

    The backward pass recomputes the mix from the sources (kept anyway) instead of storing it: K times a
    residual per layer. On XLA:CPU every byte of a step's temporaries is page-faulted anew each step (the
    buffer is mmapped per execution), which cost more than the recomputation.
    """
    return jnp.einsum("KBTD,KDE->KBTE", _mix(spec, w, sources), wkv_KxDx2H)


def _mix_project_fwd(spec, w, sources, wkv_KxDx2H):
    return _mix_project(spec, w, sources, wkv_KxDx2H), (w, sources, wkv_KxDx2H)


def _mix_project_bwd(spec, residuals, g_KxBxTx2H):
    w, sources, wkv_KxDx2H = residuals
    # The recomputed mix must not be scheduled into the forward pass (XLA:CPU drops jax.checkpoint's barriers
    # before scheduling, and would then hoist it and keep it alive all the same): its weights are made to
    # depend on the incoming gradient (times 0, which XLA does not fold for floats).
    w_dep = w * (1 + 0 * g_KxBxTx2H[(0,) * g_KxBxTx2H.ndim].astype(w.dtype))
    mixed_KxBxTxD = _mix(spec, w_dep, sources)
    _, project_vjp = jax.vjp(functools.partial(jnp.einsum, "KBTD,KDE->KBTE"), mixed_KxBxTxD, wkv_KxDx2H)
    dmixed_KxBxTxD, dwkv_KxDx2H = project_vjp(g_KxBxTx2H)
    return (*_mix_bwd(spec, (w, sources), dmixed_KxBxTxD), dwkv_KxDx2H)


_mix_project.defvjp(_mix_project_fwd, _mix_project_bwd)


def _block(carry, lp: Params, cfg: LlamaConfig):
    """One pre-norm decoder block: h += attn(norm(h)); h += swiglu(norm(h)). Also returns its (routed) V,
    head-major [B, K, T, H]."""
    h_BxTxD, sources = carry
    dt = jnp.dtype(cfg.dtype)
    lp = jax.tree.map(lambda p: p.astype(dt), lp)
    x_BxTxD = (_rms(h_BxTxD, cfg.norm_eps) * lp["attn_norm"]).astype(dt)
    B, T, N, H = *x_BxTxD.shape[:2], cfg.n_heads, cfg.head_dim
    if cfg.cpu_matmul and cfg.routing == "none" and dt == jnp.float32:
        # jaxsae's attention kernel, token-major with RoPE inside: a third of the time of XLA:CPU's batched dots and
        # softmax on SmolLM2's shapes, and no head-major copies of q, k, v or o.
        q_BxTxNxH = _dense(x_BxTxD, lp["wq"], cfg)
        k_BxTxKxH, v_BxTxKxH = _split_kv(_dense(x_BxTxD, _wkv(lp), cfg))
        cos_TxH2, sin_TxH2 = cpu_kernels.rope_tables(T, H, cfg.rope_theta)
        o_BxTxNH = cpu_kernels.on_cpu(cpu_kernels.attention, cpu_kernels.attention_xla, q_BxTxNxH, k_BxTxKxH,
                                      v_BxTxKxH, cos_TxH2, sin_TxH2).reshape(B, T, N * H)
        v_BxKxTxH = _head_major(v_BxTxKxH)
    else:
        q_BxNxTxH = _head_major(_dense(x_BxTxD, lp["wq"], cfg))
        k_BxKxTxH, v_BxKxTxH, sources = _keys_values(lp, h_BxTxD, x_BxTxD, sources, cfg)
        o_BxNxTxH = _attention(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, cfg)
        # o as a plain [B, T, N*H] @ [N*H, D] matmul: contracting (N, H) in an einsum, XLA:CPU copied wo transposed.
        o_BxTxNH = jnp.swapaxes(o_BxNxTxH, 1, 2).reshape(B, T, N * H)
    h_BxTxD = h_BxTxD + _dense(o_BxTxNH, lp["wo"].reshape(N * H, -1), cfg)
    x_BxTxD = (_rms(h_BxTxD, cfg.norm_eps) * lp["mlp_norm"]).astype(dt)
    gate_BxTxF = jax.nn.silu(_dense(x_BxTxD, lp["w_gate"], cfg))
    up_BxTxF = _dense(x_BxTxD, lp["w_up"], cfg)
    h_BxTxD = h_BxTxD + _dense(gate_BxTxF * up_BxTxF, lp["w_down"], cfg)
    return (h_BxTxD, sources), v_BxKxTxH


def _embed(params: Params, tokens_BxT, cfg: LlamaConfig):
    """The carry entering block 0: embeddings and an empty tuple of routing sources."""
    # The gather's output keeps the tokens' batch sharding (needed under explicitly sharded meshes).
    sharding = jax.typeof(tokens_BxT).sharding
    out_sharding = sharding.update(spec=jax.sharding.PartitionSpec(*sharding.spec, None))
    h_BxTxD = params["embed"].at[tokens_BxT].get(out_sharding=out_sharding).astype(cfg.dtype)
    return lm_sharding.constrain_embedded(h_BxTxD), ()


def _unstack(tree) -> list:
    """A pytree of [N, ...] stacks as N pytrees: one `unstack` per leaf, whose gradient is one stack."""
    leaves, treedef = jax.tree.flatten(tree)
    return [treedef.unflatten(parts) for parts in zip(*(jnp.unstack(leaf) for leaf in leaves))]


def _block_weights(params: Params, cfg: LlamaConfig, start: int, stop: int) -> list[Params]:
    """Blocks start..stop-1's weights, one dict each; routed blocks i >= 1 also get their router (row i - 1 of
    the L - 1 stacked ones).

    Stacked weights are unstacked, not indexed block by block: the gradient of an index is a zero-padded
    [L, ...] copy per block, O(L^2) memory traffic in all.
    """
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):  # unstack_layers' layout: already per block
        return list(layers[start:stop])
    blocks = _unstack({name: stack[start:stop] for name, stack in layers.items() if name != "router"})
    first = max(start, 1)
    if cfg.routing != "none" and first < stop:
        routers = _unstack(jax.tree.map(lambda r: r[first - 1:stop - 1], layers["router"]))
        for lp, router in zip(blocks[first - start:], routers):
            lp["router"] = router
    return blocks


def _blocks(params: Params, carry, cfg: LlamaConfig, start: int, stop: int):
    """Run blocks start..stop-1; returns the carry and each block's V stacked [stop - start, B, K, T, H]."""
    step = functools.partial(_block, cfg=cfg)
    if cfg.remat:
        step = jax.checkpoint(step)
    if cfg.routing == "none" and isinstance(params["layers"], dict):
        return jax.lax.scan(step, carry, jax.tree.map(lambda p: p[start:stop], params["layers"]))
    values = []
    for lp in _block_weights(params, cfg, start, stop):
        carry, v_BxTxKxH = step(carry, lp)
        values.append(v_BxTxKxH)
    return carry, jnp.stack(values)


def unstack_layers(params: Params, cfg: LlamaConfig) -> Params:
    """params with "layers" as a tuple of per-block weight dicts, for the inference entry points.

    `apply`, `residuals`, `splice` and `values` accept either layout and compute the same numbers. With
    stacked [L, ...] weights every call slices each block's weights out of the stacks inside the program, a
    copy of all weights per forward (14 MB per SmolLM2 block; XLA:CPU does not feed a slice to a matmul in
    place), which is a sizeable part of a forward of a few hundred tokens. Per-block arrays are read where
    they lie. Each block also holds `wkv`, its K and V weights side by side [D, K, 2H] (the one K/V matmul's
    operand, read in place instead of concatenated per call; `wk`/`wv` stay for readers of the weights).
    Train on the stacked layout (optimiser state and sharding specs expect it).
    """
    if not isinstance(params["layers"], dict):
        raise ValueError(f"params['layers'] is already unstacked ({type(params['layers']).__name__})")
    blocks = _block_weights(params, cfg, 0, cfg.n_layers)
    return {**params, "layers": tuple({**lp, "wkv": _wkv(lp)} for lp in blocks)}


def _logits(params: Params, h_BxTxD, cfg: LlamaConfig) -> jax.Array:
    """Final RMSNorm and the (tied) unembedding, in float32."""
    x_BxTxD = _rms(h_BxTxD, cfg.norm_eps) * params["final_norm"]
    if cfg.tie_embeddings:
        return jnp.einsum("BTD,VD->BTV", x_BxTxD, params["embed"].astype(jnp.float32))
    return jnp.einsum("BTD,DV->BTV", x_BxTxD, params["unembed"].astype(jnp.float32))


# XLA:CPU's default dot library (YNNPACK in jax 0.10) ran SmolLM2's forward matmuls at ~0.8x the rate of oneDNN
# (torch's) on an AVX-512 host; oneDNN per dot brings the inference forward to that rate. Only plain Llama's
# forward asks for it: in training steps (backward layouts) and in LIMe's routed mixes some dots ran 2-3x slower
# under oneDNN, and its whole-graph mode ("dot") aborted the process on a training step. It is on only where it
# has run cleanly, x86 CPUs with AVX-512: on a 2-core AMD Zen 3 (AVX2) host SmolLM2's forward under it corrupted
# the heap (glibc aborts, segfaults; jax 0.10.2). LIME_JAX_CPU_DOTS=xla turns it off, =onednn on whatever the CPU.
_ONEDNN_DOTS = {"xla_cpu_use_onednn": True,
                "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def _cpu_has_avx512() -> bool:
    """Whether the CPU's flags, as `cpu_kernels` reads them from /proc/cpuinfo, list AVX-512 (avx512f)."""
    return b"avx512f" in cpu_kernels._cpu_id().split()


def _cpu_dots_choice() -> str:
    choice = os.environ.get("LIME_JAX_CPU_DOTS", "auto")
    if choice not in ("auto", "xla", "onednn", "jaxsae"):
        raise ValueError(f"LIME_JAX_CPU_DOTS must be auto, xla, onednn or jaxsae, got {choice!r}")
    return choice


def _uses_onednn(cfg: LlamaConfig) -> bool:
    """Whether the inference entry points compile cfg's forward with oneDNN dots (plain Llama on x86, AVX-512 by
    default)."""
    choice = _cpu_dots_choice()
    if cfg.routing != "none" or choice in ("xla", "jaxsae") or jax.default_backend() != "cpu":
        return False
    return platform.machine().lower() in ("x86_64", "amd64") and (choice == "onednn" or _cpu_has_avx512())


# On a 2-core AMD Zen 3 (AVX2) host, XLA:CPU's dots (YNNPACK) ran SmolLM2's [B*T, 576] x [576, 1536]-like
# projections 10-20% slower than numpy's OpenBLAS at B*T = 2048; jaxsae's matmul kernel (the TopK encoder's
# GEMM) closed most of that gap (the batch-16 harvest forward 6-14% faster in exploration runs; see `_dense`).
def _inference_cfg(cfg: LlamaConfig) -> LlamaConfig:
    """cfg for the inference entry points (`residuals`, `splice`): `cpu_matmul` on where jaxsae's CPU kernels run
    the projections, by default on x86 CPUs without AVX-512 (those take oneDNN) in a process with one local device
    (a custom call has no sharding rule). Local, not global: harvest, streaming and CE forward each process's own
    contexts, so N one-device processes take the same path as one and write the same bytes.
    LIME_JAX_CPU_DOTS=jaxsae asks for it anywhere on CPU, =xla or =onednn never."""
    choice = _cpu_dots_choice()
    if cfg.cpu_matmul or choice in ("xla", "onednn") or jax.default_backend() != "cpu":
        return cfg
    if choice == "auto" and (platform.machine().lower() not in ("x86_64", "amd64") or _cpu_has_avx512()
                             or jax.local_device_count() > 1):
        return cfg
    return dataclasses.replace(cfg, cpu_matmul=True) if cpu_kernels.available() else cfg


def _forward_jit(*static_argnums: int):
    """Decorator: jit fn(params, x, cfg, ...), with oneDNN dots where `_uses_onednn(cfg)` and the call is not
    being traced (compiler options apply to top-level jits only; inside a transformation it is the plain jit:
    traced arguments show it, and a call with concrete arguments inside a user's jit is refused by JAX)."""
    def wrap(fn):
        plain = jax.jit(fn, static_argnums=static_argnums)
        onednn = jax.jit(fn, static_argnums=static_argnums, compiler_options=_ONEDNN_DOTS)

        @functools.wraps(fn)
        def call(params, x, cfg, *args):
            if not _uses_onednn(cfg) or any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((params, x))):
                return plain(params, x, cfg, *args)
            with warnings.catch_warnings():  # XLA cannot serialise oneDNN thunks for the persistent cache
                warnings.filterwarnings("ignore", message=".*onednn-fusion")
                try:
                    return onednn(params, x, cfg, *args)
                except ValueError as e:  # concrete arguments, but called inside a user's jit: nested
                    if "compiler_options" not in str(e):
                        raise
            return plain(params, x, cfg, *args)
        return call
    return wrap


@_forward_jit(2)
def _apply(params, tokens_BxT, cfg):
    (h_BxTxD, _), _ = _blocks(params, _embed(params, tokens_BxT, cfg), cfg, 0, cfg.n_layers)
    return _logits(params, h_BxTxD, cfg)


@_forward_jit(2, 3)
def _residuals(params, tokens_BxT, cfg, layers):
    carry, out, start = _embed(params, tokens_BxT, cfg), {}, 0
    for layer in layers:
        carry, _ = _blocks(params, carry, cfg, start, layer + 1)
        out[layer], start = carry[0], layer + 1
    return out, carry


@_forward_jit(2, 3)
def _finish(params, carry, cfg, start):
    if start < cfg.n_layers:
        carry, _ = _blocks(params, carry, cfg, start, cfg.n_layers)
    return _logits(params, carry[0], cfg)


def _check_tokens(tokens_BxT, cfg: LlamaConfig) -> None:
    """Shape, dtype and (when concrete) range checks, so bad input fails loudly instead of gathering garbage."""
    shape, dtype = jnp.shape(tokens_BxT), jnp.result_type(tokens_BxT)
    if len(shape) != 2 or shape[1] == 0:
        raise ValueError(f"tokens must have shape [batch, positions] with positions >= 1, got {shape}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"tokens must be integer ids, got dtype {dtype}")
    if shape[1] > cfg.max_len:
        raise ValueError(f"{shape[1]} positions exceed the model's max_len={cfg.max_len}")
    if not isinstance(tokens_BxT, jax.core.Tracer) and shape[0] > 0:
        tokens_BxT = np.asarray(tokens_BxT)  # np.min on a jax.Array calls its traced .min inside a user's jit
        lo, hi = int(tokens_BxT.min()), int(tokens_BxT.max())
        if lo < 0 or hi >= cfg.vocab:
            raise ValueError(f"token ids must lie in [0, {cfg.vocab}), got min {lo}, max {hi}")


def _check_layer(layer: int, cfg: LlamaConfig) -> int:
    if not isinstance(layer, (int, np.integer)) or not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer must be an int in [0, {cfg.n_layers}), got {layer!r}")
    return int(layer)


def apply(params: Params, tokens_BxT: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """Next-token logits [B, T, V] (float32)."""
    _check_tokens(tokens_BxT, cfg)
    return _apply(params, tokens_BxT, cfg)


def residuals(params: Params, tokens_BxT: jax.Array, cfg: LlamaConfig, layers: int | Sequence[int]) -> dict:
    """{layer: h_BxTxD}, the residual stream after each requested block; stops after the last one."""
    _check_tokens(tokens_BxT, cfg)
    layers = (layers,) if isinstance(layers, (int, np.integer)) else tuple(layers)
    if not layers:
        raise ValueError("residuals needs at least one layer")
    layers = tuple(sorted({_check_layer(layer, cfg) for layer in layers}))
    return _residuals(params, tokens_BxT, _inference_cfg(cfg), layers)[0]


def splice(params: Params, tokens_BxT: jax.Array, cfg: LlamaConfig, layer: int,
           fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Logits [B, T, V] with the residual after block `layer` replaced by fn(h_BxTxD).

    The two halves of the model are jitted separately, so a new `fn` (e.g. a fresh SAE closure) costs no
    recompilation of the model; jit `fn` yourself if it is expensive.
    """
    _check_tokens(tokens_BxT, cfg)
    layer = _check_layer(layer, cfg)
    cfg = _inference_cfg(cfg)
    _, (h_BxTxD, sources) = _residuals(params, tokens_BxT, cfg, (layer,))
    new_BxTxD = fn(h_BxTxD)
    if jnp.shape(new_BxTxD) != h_BxTxD.shape:
        raise ValueError(f"splice fn must keep the shape {h_BxTxD.shape}, returned {jnp.shape(new_BxTxD)}")
    return _finish(params, (jnp.asarray(new_BxTxD, h_BxTxD.dtype), sources), cfg, layer + 1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _values(params, tokens_BxT, cfg):
    v_LxBxKxTxH = _blocks(params, _embed(params, tokens_BxT, cfg), cfg, 0, cfg.n_layers)[1]
    return v_LxBxKxTxH.transpose(0, 1, 3, 2, 4)


def values(params: Params, tokens_BxT: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """Every layer's attention values V (after LIMe routing), [L, B, T, K, H]."""
    _check_tokens(tokens_BxT, cfg)
    return _values(params, tokens_BxT, cfg)
