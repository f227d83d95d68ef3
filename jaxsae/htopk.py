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
`autoencode_prefix_mse` runs the encoder too and fuses the lean backward with TopK's sparse encoder backward
(scatter-adds of the selected rows, no [B, M] gradient); it is what `make_loss_fn` gives the trainer.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxsae import sae


@dataclasses.dataclass(frozen=True)
class HTopKConfig:
    prefixes: tuple[int, ...] = ()  # prefix lengths j (1..k) averaged by the loss, uniform weights; empty = all of 1..k
    lean: bool = True  # memory-lean custom_vjp loss; False = the B×K×D cumulative-sum reference
    tile: int = 256  # lean loss: rows of the batch processed together (its T×D working set should fit in cache)


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


def _row_tile(B: int, tile: int) -> int:
    """The largest divisor of B that is at most `tile`, so that equal row tiles cover the batch."""
    return max(t for t in range(1, min(tile, B) + 1) if B % t == 0)


def _rows(W_MxD, i_T):
    return W_MxD.at[i_T].get(mode="promise_in_bounds")


def _col(a_TxK, k):
    return jax.lax.dynamic_index_in_dim(a_TxK, k, 1, keepdims=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def prefix_mse(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD, tile=256):
    """Same (mse_K, r_BxD) as `prefix_mse_reference`, never materialising B×K×D (forward or backward)."""
    return _lean_fwd(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD, tile)[0]


# Both passes walk the batch in tiles of T rows and, inside a tile, the K prefixes: the T×D running
# tensors stay in cache while the decoder rows stream past, which is what makes the lean loss fast on CPU.
def _lean_fwd(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD, tile):
    vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD = _check(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD)
    (B, K), D = vals_BxK.shape, x_BxD.shape[1]
    T = _row_tile(B, tile)

    def one_tile(sse_K, tile_in):
        v_TxK, i_TxK, x_TxD = tile_in

        def add_prefix(k, carry):
            r_TxD, sse_K = carry
            r_TxD = r_TxD + _col(v_TxK, k)[:, None] * _rows(W_dec_MxD, _col(i_TxK, k))
            return r_TxD, sse_K.at[k].add(jnp.sum(r_TxD * r_TxD))

        r_TxD, sse_K = jax.lax.fori_loop(0, K, add_prefix, (b_dec_D - x_TxD, sse_K), unroll=min(K, 4))
        return sse_K, r_TxD

    tiles = (vals_BxK.reshape(B // T, T, K), idx_BxK.reshape(B // T, T, K), x_BxD.reshape(B // T, T, D))
    sse_K, r_NxTxD = jax.lax.scan(one_tile, jnp.zeros((K,), jnp.float32), tiles)
    rK_BxD = r_NxTxD.reshape(B, D)
    return (sse_K / (B * D), rK_BxD), (vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD, rK_BxD)


def _lean_bwd(tile, res, cts):
    vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD, rK_BxD = res
    ct_K, ct_r_BxD = cts
    dvals_BxK, dW_dec_MxD, G_BxD, _ = _walk_back(vals_BxK, idx_BxK, W_dec_MxD, rK_BxD, ct_K, ct_r_BxD, tile)
    # b_dec and −x sit in every prefix, so their gradient is the full suffix sum G_1.
    return (dvals_BxK.astype(vals_BxK.dtype), None, dW_dec_MxD.astype(W_dec_MxD.dtype),
            jnp.sum(G_BxD, axis=0).astype(b_dec_D.dtype), (-G_BxD).astype(x_BxD.dtype))


def _walk_back(vals_BxK, idx_BxK, W_dec_MxD, rK_BxD, ct_K, ct_r_BxD, tile, ct_vals_BxK=None, x_in_BxD=None):
    """(dvals, dW_dec, G_1 = dL/dr_0, dW_enc|b_enc) by walking the prefixes backwards, tile by tile.

    With `x_in_BxD` (the encoder input) it also does TopK's sparse encoder backward in the same loop:
    d(pre) of each selected latent is scatter-added times [x_in, 1] into rows of an [M, D+1] buffer
    holding dW_encᵀ and d(b_enc).
    """
    (B, K), (M, D) = vals_BxK.shape, W_dec_MxD.shape
    T, N = _row_tile(B, tile), B // _row_tile(B, tile)
    coef_K = 2.0 * ct_K / (B * D)  # dL/dr_j = coef_j · r_j
    ct_vals_BxK = jnp.zeros((B, K), jnp.float32) if ct_vals_BxK is None else ct_vals_BxK
    enc = x_in_BxD is not None
    x_in1_BxE = jnp.concatenate([x_in_BxD, jnp.ones((B, 1), x_in_BxD.dtype)], 1) if enc else jnp.zeros((B, 0))

    def one_tile(carry, tile_in):
        v_TxK, i_TxK, r_TxD, G_TxD, ctv_TxK, x_in1_TxE = tile_in  # r starts as r_K; G as ct_r

        def sub_prefix(kk, inner):
            r_TxD, G_TxD, (dW_dec_MxD, dW_enc1_MxE), dv_TxK = inner
            k = K - 1 - kk
            i_T, v_T = _col(i_TxK, k), _col(v_TxK, k)
            d_TxD = _rows(W_dec_MxD, i_T)
            G_TxD = G_TxD + coef_K[k] * r_TxD
            dv_T = jnp.einsum("td,td->t", G_TxD, d_TxD) + _col(ctv_TxK, k)
            dW_dec_MxD = dW_dec_MxD.at[i_T].add(v_T[:, None] * G_TxD, mode="promise_in_bounds")
            if enc:  # the ReLU after top_k passes the gradient only where the value is positive
                dpre_T = jnp.where(v_T > 0, dv_T, 0.0)
                dW_enc1_MxE = dW_enc1_MxE.at[i_T].add(dpre_T[:, None] * x_in1_TxE, mode="promise_in_bounds")
            dv_TxK = jax.lax.dynamic_update_index_in_dim(dv_TxK, dv_T, k, 1)
            return r_TxD - v_T[:, None] * d_TxD, G_TxD, (dW_dec_MxD, dW_enc1_MxE), dv_TxK

        _, G_TxD, carry, dv_TxK = jax.lax.fori_loop(
            0, K, sub_prefix, (r_TxD, G_TxD, carry, jnp.zeros((T, K), jnp.float32)), unroll=min(K, 4))
        return carry, (dv_TxK, G_TxD)

    tile_rows = lambda a: a.reshape(N, T, *a.shape[1:])  # noqa: E731
    tiles = tuple(map(tile_rows, (vals_BxK, idx_BxK, rK_BxD, ct_r_BxD.astype(jnp.float32), ct_vals_BxK, x_in1_BxE)))
    init = (jnp.zeros((M, D), jnp.float32), jnp.zeros((M, D + 1) if enc else (0, 0), jnp.float32))
    (dW_dec_MxD, dW_enc1_MxE), (dv_NxTxK, G_NxTxD) = jax.lax.scan(one_tile, init, tiles)
    return dv_NxTxK.reshape(B, K), dW_dec_MxD, G_NxTxD.reshape(B, D), dW_enc1_MxE


prefix_mse.defvjp(_lean_fwd, _lean_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def autoencode_prefix_mse(params: dict, x_BxD, sae_cfg: sae.SAEConfig, tile: int = 256):
    """(mse_K, r_BxD, Code) of a TopK SAE on x, lean like `prefix_mse`, its backward fused with the encoder's.

    The forward is `sae.encode` then `prefix_mse`'s walk. The backward walks the prefixes once and, for each
    selected latent, scatter-adds into dW_dec and dW_enc: no [B, M] or [B, K, D] tensor in either pass.
    """
    return _ae_fwd(params, x_BxD, sae_cfg, tile)[0]


def _ae_fwd(params, x_BxD, sae_cfg, tile):
    code = sae.encode(params, x_BxD, sae_cfg)
    (mse_K, rK_BxD), _ = _lean_fwd(*code, params["W_dec"], params["b_dec"], x_BxD, tile)
    return (mse_K, rK_BxD, code), (params, x_BxD, code, rK_BxD)


def _ae_bwd(sae_cfg, tile, res, cts):
    params, x_BxD, code, rK_BxD = res
    ct_K, ct_r_BxD, (ct_vals_BxK, _) = cts
    W_enc_DxM, D = params["W_enc"], x_BxD.shape[1]
    dvals_BxK, dW_dec_MxD, G_BxD, dW_enc1_MxE = _walk_back(
        *code, params["W_dec"], rK_BxD, ct_K, ct_r_BxD, tile, ct_vals_BxK, x_BxD - params["b_dec"])
    db_enc_M = dW_enc1_MxE[:, D]
    dpre_BxK = jnp.where(code.vals_BxK > 0, dvals_BxK, 0.0)
    # The encoder reads x − b_dec: through it, dx = Σ_k dpre_k W_enc[:, idx_k] (formed only if x's gradient
    # is used) and d(b_dec) = −Σ_b dx = −W_enc·d(b_enc).
    enc_as_dec = {"W_dec": W_enc_DxM.T, "b_dec": jnp.zeros((D,), x_BxD.dtype)}
    dx_enc_BxD = sae.decode(enc_as_dec, sae.Code(dpre_BxK, code.idx_BxK), sae_cfg)
    grads = {**jax.tree.map(jnp.zeros_like, params), "W_enc": dW_enc1_MxE[:, :D].T, "b_enc": db_enc_M,
             "W_dec": dW_dec_MxD, "b_dec": jnp.sum(G_BxD, axis=0) - W_enc_DxM @ db_enc_M}
    grads = {name: g.astype(params[name].dtype) for name, g in grads.items()}
    return grads, (dx_enc_BxD - G_BxD).astype(x_BxD.dtype)


autoencode_prefix_mse.defvjp(_ae_fwd, _ae_bwd)


def hierarchical_mse(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD, cfg: HTopKConfig = HTopKConfig()):
    """(loss = mean over J of the prefix MSEs, mse_K, r_BxD = x̂_K − x) for a code sorted descending."""
    w_K = prefix_weights(vals_BxK.shape[1], cfg.prefixes)
    if cfg.lean:
        mse_K, r_BxD = prefix_mse(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD, cfg.tile)
    else:
        mse_K, r_BxD = prefix_mse_reference(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D, x_BxD)
    return jnp.dot(w_K, mse_K), mse_K, r_BxD


def make_loss_fn(sae_cfg: sae.SAEConfig, cfg: HTopKConfig = HTopKConfig()):
    """`loss_fn(params, x_BxD, dead_M) -> (loss, metrics)` for `train.make_train_step`: HTopK MSE + AuxK."""
    if sae_cfg.activation != "topk":
        raise ValueError(f"HierarchicalTopK needs a topk SAE, got activation={sae_cfg.activation!r}")
    if not sae_cfg.decoder_bias:
        raise ValueError("HierarchicalTopK expects decoder_bias=True (every prefix starts from b_dec)")
    w_K = prefix_weights(sae_cfg.k, cfg.prefixes)

    def loss_fn(params, x_BxD, dead_M=None):
        if cfg.lean:
            mse_K, r_BxD, code = autoencode_prefix_mse(params, x_BxD, sae_cfg, cfg.tile)
        else:
            code = sae.encode(params, x_BxD, sae_cfg)
            mse_K, r_BxD = prefix_mse_reference(*code, params["W_dec"], params["b_dec"], x_BxD)
        hmse = jnp.dot(w_K, mse_K)
        if dead_M is None or sae_cfg.aux_k == 0:
            aux = jnp.zeros(())
        else:
            aux = sae.aux_loss(params, x_BxD, -r_BxD, dead_M, sae_cfg)
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
