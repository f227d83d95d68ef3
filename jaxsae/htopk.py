"""HierarchicalTopK (Balagansky et al., EMNLP 2025): one TopK SAE trained to reconstruct from every prefix of its code.

A TopK code holds, per token, the K active latents sorted by activation, largest first. Prefix j keeps the
first j of them: x̂_j = b_dec + Σ_{i≤j} a_(i) d_(i). The loss is the mean over j ∈ J of MSE(x̂_j, x), so the
SAE truncated to any j ≤ K is itself a good j-sparse SAE.

Two implementations of the per-prefix MSE vector `mse_K` give the same numbers:
- `prefix_mse_reference` builds the B×K×D prefix tensor with a cumulative sum (memory grows with K);
- `prefix_mse` (`jax.custom_vjp`) keeps only B×D running tensors: the forward walks the prefixes with a
  running residual r_j = x̂_j − x, the backward walks them in reverse, rebuilding r_j by subtraction and
  summing the residual gradients 2·c_j·r_j/(B·D) into a suffix sum G_i = Σ_{j≥i} …, which is the gradient of
  term i's contribution a_(i) d_(i).
Both return the vector of prefix MSEs, so any prefix set J or weighting is one dot product outside them.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jaxsae import sae


@dataclasses.dataclass(frozen=True)
class HTopKConfig:
    prefixes: tuple[int, ...] = ()  # prefix lengths j (1..k) averaged by the loss, uniform weights; empty = all of 1..k
    lean: bool = True  # memory-lean custom_vjp loss; False = the B×K×D cumulative-sum reference
    chunk: int = 8  # prefixes per step of the lean loss's scan (unrolled inside a step; working set B×D)


def prefix_weights(k: int, prefixes: tuple[int, ...] = ()) -> jax.Array:
    """Uniform weights over the prefix lengths J (1-based) as a length-k vector; all of 1..k when J is empty."""
    js = tuple(prefixes) or tuple(range(1, k + 1))
    bad = [j for j in js if not 1 <= j <= k]
    if bad:
        raise ValueError(f"prefix lengths must lie in 1..k={k}, got {bad}")
    if len(set(js)) != len(js):
        raise ValueError(f"prefix lengths must be distinct, got {js}")
    w_K = jnp.zeros((k,), jnp.float32).at[jnp.asarray(js) - 1].set(1.0 / len(js))
    return w_K


def _check(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD):
    """The five inputs as jax arrays, after checking that their shapes agree."""
    vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD = map(jnp.asarray, (vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD))
    B, K = vals_BxK.shape
    M, D = W_dec_MxD.shape
    if idx_BxK.shape != (B, K):
        raise ValueError(f"idx_BxK shape {idx_BxK.shape} must equal vals_BxK shape {(B, K)}")
    if x_BxD.shape != (B, D) or b_dec_D.shape != (D,):
        raise ValueError(f"x_BxD {x_BxD.shape} / b_dec_D {b_dec_D.shape} do not match B={B}, D={D}")
    if not jnp.issubdtype(idx_BxK.dtype, jnp.integer):
        raise ValueError(f"idx_BxK must be integer, got {idx_BxK.dtype}")
    return vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD


def prefix_mse_reference(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD):
    """(mse_K with mse_K[j-1] = mean((x̂_j − x)²), r_BxD = x̂_K − x) via the full B×K×D cumulative sum."""
    vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD = _check(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD)
    terms_BxKxD = vals_BxK[..., None] * W_dec_MxD[idx_BxK]
    r_BxKxD = b_dec_D - x_BxD[:, None, :] + jnp.cumsum(terms_BxKxD, axis=1)
    return jnp.mean(r_BxKxD**2, axis=(0, 2)), r_BxKxD[:, -1]


def _chunked(a_BxK, chunk):
    """[B, K] → [N, B, chunk] with K zero-padded to N·chunk (a zero activation adds nothing)."""
    B, K = a_BxK.shape
    n = math.ceil(K / chunk)
    a_BxNC = jnp.pad(a_BxK, ((0, 0), (0, n * chunk - K)))
    return a_BxNC.reshape(B, n, chunk).transpose(1, 0, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def prefix_mse(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD, chunk=8):
    """Same (mse_K, r_BxD) as `prefix_mse_reference`, never materialising B×K×D (forward or backward)."""
    return _lean_fwd(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD, chunk)[0]


def _lean_fwd(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD, chunk):
    vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD = _check(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD)
    (B, K), D = vals_BxK.shape, x_BxD.shape[1]
    chunk = min(chunk, K)

    def step(r_BxD, inputs):
        v_BxC, i_BxC = inputs
        sse = []
        for c in range(chunk):  # unrolled: XLA fuses each gather into the update, keeping B×D live
            r_BxD = r_BxD + v_BxC[:, c, None] * W_dec_MxD[i_BxC[:, c]]
            sse.append(jnp.sum(r_BxD * r_BxD))
        return r_BxD, jnp.stack(sse)

    r0_BxD = (b_dec_D - x_BxD).astype(jnp.float32)
    rK_BxD, sse_NxC = jax.lax.scan(step, r0_BxD, (_chunked(vals_BxK, chunk), _chunked(idx_BxK, chunk)))
    mse_K = sse_NxC.reshape(-1)[:K] / (B * D)
    return (mse_K, rK_BxD), (vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD, rK_BxD)


def _lean_bwd(chunk, res, cts):
    vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD, rK_BxD = res
    (B, K), D = vals_BxK.shape, x_BxD.shape[1]
    chunk = min(chunk, K)
    ct_K, ct_r_BxD = cts
    # dL/dr_j = ct_j · 2 r_j / (B·D); padded prefixes get coefficient 0.
    coef_NxC = _chunked(jnp.broadcast_to(2.0 * ct_K / (B * D), (1, K)), chunk)[:, 0, :]

    def step(carry, inputs):
        r_BxD, G_BxD, dW_MxD = carry  # r = residual after this chunk's last prefix; G = suffix sum, from ct_r
        v_BxC, i_BxC, coef_C = inputs
        dv = [None] * chunk
        for c in reversed(range(chunk)):
            d_BxD = W_dec_MxD[i_BxC[:, c]]
            G_BxD = G_BxD + coef_C[c] * r_BxD
            dv[c] = jnp.einsum("bd,bd->b", G_BxD, d_BxD)
            dW_MxD = dW_MxD.at[i_BxC[:, c]].add(v_BxC[:, c, None] * G_BxD)
            r_BxD = r_BxD - v_BxC[:, c, None] * d_BxD
        return (r_BxD, G_BxD, dW_MxD), jnp.stack(dv, axis=1)

    init = (rK_BxD, ct_r_BxD.astype(jnp.float32), jnp.zeros(W_dec_MxD.shape, jnp.float32))
    xs = (_chunked(vals_BxK, chunk), _chunked(idx_BxK, chunk), coef_NxC)
    (_, G_BxD, dW_MxD), dv_NxBxC = jax.lax.scan(step, init, xs, reverse=True)
    dvals_BxK = dv_NxBxC.transpose(1, 0, 2).reshape(B, -1)[:, :K]
    # b_dec and −x sit in every prefix, so their gradient is the full suffix sum G_1.
    return (dvals_BxK.astype(vals_BxK.dtype), None, dW_MxD.astype(W_dec_MxD.dtype),
            jnp.sum(G_BxD, axis=0).astype(b_dec_D.dtype), (-G_BxD).astype(x_BxD.dtype))


prefix_mse.defvjp(_lean_fwd, _lean_bwd)


def hierarchical_mse(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD, cfg: HTopKConfig = HTopKConfig()):
    """(loss = mean over J of the prefix MSEs, mse_K, r_BxD = x̂_K − x) for a code sorted descending."""
    w_K = prefix_weights(vals_BxK.shape[1], cfg.prefixes)
    if cfg.lean:
        mse_K, r_BxD = prefix_mse(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD, cfg.chunk)
    else:
        mse_K, r_BxD = prefix_mse_reference(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD)
    return jnp.dot(w_K, mse_K), mse_K, r_BxD


def make_loss_fn(sae_cfg: sae.SAEConfig, cfg: HTopKConfig = HTopKConfig()):
    """`loss_fn(params, x_BxD, dead_M) -> (loss, metrics)` for `train.make_train_step`: HTopK MSE + AuxK."""
    if sae_cfg.activation != "topk":
        raise ValueError(f"HierarchicalTopK needs a topk SAE, got activation={sae_cfg.activation!r}")
    if not sae_cfg.decoder_bias:
        raise ValueError("HierarchicalTopK expects decoder_bias=True (every prefix starts from b_dec)")
    prefix_weights(sae_cfg.k, cfg.prefixes)  # validate J against k now, not at trace time

    def loss_fn(params, x_BxD, dead_M=None):
        code = sae.encode(params, x_BxD, sae_cfg)
        hmse, mse_K, r_BxD = hierarchical_mse(*code, params["W_dec"], params["b_dec"], x_BxD, cfg)
        if dead_M is None or sae_cfg.aux_k == 0:
            aux = jnp.zeros(())
        else:
            pre_BxM = sae.pre_activations(params, x_BxD, sae_cfg)  # CSE'd with encode's under jit
            aux = sae._aux_loss(params, pre_BxM, -r_BxD, dead_M, sae_cfg)
        total = hmse + sae_cfg.aux_coeff * aux
        var = jnp.sum((x_BxD - x_BxD.mean(0)) ** 2)
        fvu_K = mse_K * x_BxD.size / jnp.where(var > 0, var, 1.0)
        metrics = dict(loss=total, hmse=hmse, mse=mse_K[-1], aux=aux, l0=jnp.mean(jnp.sum(code.vals_BxK > 0, -1)),
                       fvu=jax.lax.stop_gradient(fvu_K[-1]), fvu_j1=jax.lax.stop_gradient(fvu_K[0]))
        return total, metrics

    return loss_fn


def truncate(code: sae.Code, j: int) -> sae.Code:
    """The j-sparse code of a HierarchicalTopK SAE: its first j (largest) latents per token."""
    if not 1 <= j <= code.vals_BxK.shape[1]:
        raise ValueError(f"truncation j must lie in 1..{code.vals_BxK.shape[1]}, got {j}")
    return sae.Code(code.vals_BxK[:, :j], code.idx_BxK[:, :j])
