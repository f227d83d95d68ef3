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
`autoencode_hierarchical_mse` runs the encoder too and is what `make_loss_fn` gives the trainer. Its prefix
weights are fixed, so dL/dr_j is known before the walk: under differentiation its forward runs the backward walk
at once (collecting the prefix MSEs on the way, so there is no separate forward walk) and TopK's sparse encoder
backward (scatter-adds of the selected rows, no [B, M] gradient), both in column blocks as `sae.py`'s TopK
backward; its backward scales the saved gradient. Only its loss carries a gradient.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxsae import cpu_kernels, sae


@dataclasses.dataclass(frozen=True)
class HTopKConfig:
    prefixes: tuple[int, ...] = ()  # prefix lengths j (1..k) averaged by the loss, uniform weights; empty = all of 1..k
    lean: bool = True  # memory-lean custom_vjp loss; False = the B×K×D cumulative-sum reference
    tile: int = 256  # lean loss: rows per tile of the forward walk (its T×D working set should fit in cache)


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


# The forward walks the batch in tiles of T rows and, inside a tile, the K prefixes: the T×D running
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
    dvals_BxK, dW_dec_MxD, G_BxD, _ = _walk_back(vals_BxK, idx_BxK, W_dec_MxD, rK_BxD, ct_K, ct_r_BxD)
    # b_dec and −x sit in every prefix, so their gradient is the full suffix sum G_1.
    return (dvals_BxK.astype(vals_BxK.dtype), None, dW_dec_MxD.astype(W_dec_MxD.dtype),
            jnp.sum(G_BxD, axis=0).astype(b_dec_D.dtype), (-G_BxD).astype(x_BxD.dtype))


# The suffix sum G and the residual r are column-wise recurrences, so the backward walks column blocks of
# width c, each over all rows at once, with [M, c] scatter targets that stay in cache (as TopK's backward
# in `sae.py` does); d(val) is summed over the blocks. The blocks are column slices (`sae._cols`), written
# back in place, rather than [D // c, R, c] stacks, which cost a transposed copy of each operand.
def _walk_back(vals_BxK, idx_BxK, W_dec_MxD, rK_BxD, ct_K, ct_r_BxD, sum_G: bool = False):
    """(dvals, dW_dec, G_1 = dL/dr_0 [B, D] (with `sum_G` only Σ_b G_1, [1, D]), sse_K = Σ r_j²) by walking the
    prefixes backwards, column block by block (`cpu_kernels.htopk_walk` on XLA:CPU). ct_r_BxD may be [0, D]: a
    zero cotangent that takes no memory."""
    coef_K = 2.0 * ct_K / (vals_BxK.shape[0] * rK_BxD.shape[1])  # dL/dr_j = coef_j · r_j
    return cpu_kernels.on_cpu(functools.partial(cpu_kernels.htopk_walk, sum_G=sum_G),
                              functools.partial(_walk_back_xla, sum_G=sum_G), vals_BxK, idx_BxK, W_dec_MxD, rK_BxD,
                              coef_K.astype(jnp.float32), ct_r_BxD.astype(jnp.float32))


def _walk_back_xla(vals_BxK, idx_BxK, W_dec_MxD, rK_BxD, coef_K, ct_r_BxD, sum_G=False):
    (B, K), (M, D) = vals_BxK.shape, W_dec_MxD.shape
    c = sae._chunk_width(D)

    def walk_block(j, carry):
        dW_MxD, dv_BxK, sse_K, G_BxD = carry
        W_Mxc, r_Bxc, G_Bxc = sae._cols(W_dec_MxD, j, c), sae._cols(rK_BxD, j, c), sae._cols(G_BxD, j, c)

        def sub_prefix(kk, inner):
            r_Bxc, G_Bxc, dW_Mxc, dv_BxK, sse_K = inner
            k = K - 1 - kk
            i_B, v_B = _col(idx_BxK, k), _col(vals_BxK, k)
            d_Bxc = _rows(W_Mxc, i_B)
            G_Bxc = G_Bxc + coef_K[k] * r_Bxc
            dv_BxK = jax.lax.dynamic_update_index_in_dim(dv_BxK, jnp.einsum("bc,bc->b", G_Bxc, d_Bxc), k, 1)
            # The prefix MSEs on the way (r_Bxc is r_k here), summed to one scalar per prefix: this makes the walk
            # 5-7% slower (K=64, 128), a per-row [B, K] share 12%; a separate forward walk cost 25%.
            sse_K = sse_K.at[k].add(jnp.sum(r_Bxc * r_Bxc))
            dW_Mxc = dW_Mxc.at[i_B].add(v_B[:, None] * G_Bxc, mode="promise_in_bounds")
            return r_Bxc - v_B[:, None] * d_Bxc, G_Bxc, dW_Mxc, dv_BxK, sse_K

        # The block's d(val) share starts from zeros and is only written in the walk: reading the running sum
        # there makes XLA copy the whole [B, K] carry at every prefix.
        inner = (r_Bxc, G_Bxc, jnp.zeros((M, c), jnp.float32), jnp.zeros((B, K), jnp.float32), sse_K)
        # Unrolled by 2: by 4 (as the other walks) the step ran 1-5% slower, by 8 about 14% (K=64, 128; 3 runs).
        _, G_Bxc, dW_Mxc, dv_block_BxK, sse_K = jax.lax.fori_loop(0, K, sub_prefix, inner, unroll=min(K, 2))
        return (jax.lax.dynamic_update_slice_in_dim(dW_MxD, dW_Mxc, j * c, axis=1), dv_BxK + dv_block_BxK, sse_K,
                jax.lax.dynamic_update_slice_in_dim(G_BxD, G_Bxc, j * c, axis=1))

    G_BxD = ct_r_BxD.astype(jnp.float32) if ct_r_BxD.shape[0] else jnp.zeros((B, D), jnp.float32)
    init = (jnp.zeros((M, D), jnp.float32), jnp.zeros((B, K), jnp.float32), jnp.zeros((K,), jnp.float32), G_BxD)
    dW_dec_MxD, dv_BxK, sse_K, G_BxD = jax.lax.fori_loop(0, D // c, walk_block, init)
    return dv_BxK, dW_dec_MxD, G_BxD.sum(0, keepdims=True) if sum_G else G_BxD, sse_K


def _encoder_scatter(idx_BxK, dpre_BxK, x_BxD, b_dec_D, W_enc_DxM):
    """(dW_enc [D, M], d(b_enc) [M], W_enc·d(b_enc) [D]) of a TopK encoder: scatter-adds of dpre · (x − b_dec), in
    column blocks (the kernel subtracts b_dec per block, so no [B, D] x − b_dec is stored)."""
    def kernel(idx_BxK, dpre_BxK, x_BxD, b_dec_D, W_enc_DxM):
        return tuple(a[0] for a in cpu_kernels.encoder_grads(idx_BxK[None], dpre_BxK[None], x_BxD[None],
                                                             b_dec_D[None], W_enc_DxM[None]))

    def xla(idx_BxK, dpre_BxK, x_BxD, b_dec_D, W_enc_DxM):
        dW_enc_DxM, db_enc_M = _encoder_scatter_xla(idx_BxK, dpre_BxK, x_BxD - b_dec_D, W_enc_DxM.shape[1])
        return dW_enc_DxM, db_enc_M, W_enc_DxM @ db_enc_M

    return cpu_kernels.on_cpu(kernel, xla, idx_BxK, dpre_BxK, x_BxD, b_dec_D, W_enc_DxM)


def _encoder_scatter_xla(idx_BxK, dpre_BxK, x_in_BxD, M: int):
    K, D = idx_BxK.shape[1], x_in_BxD.shape[1]
    c = sae._chunk_width(D)

    def enc_block(j, dW_MxD):
        x_Bxc = sae._cols(x_in_BxD, j, c)

        def one_k(k, acc_Mxc):
            return acc_Mxc.at[_col(idx_BxK, k)].add(_col(dpre_BxK, k)[:, None] * x_Bxc, mode="promise_in_bounds")

        acc_Mxc = jax.lax.fori_loop(0, K, one_k, jnp.zeros((M, c), jnp.float32), unroll=min(K, 4))
        return jax.lax.dynamic_update_slice_in_dim(dW_MxD, acc_Mxc, j * c, axis=1)

    dW_enc_MxD = jax.lax.fori_loop(0, D // c, enc_block, jnp.zeros((M, D), jnp.float32))
    db_enc_M = jnp.zeros((M,), jnp.float32).at[idx_BxK.reshape(-1)].add(dpre_BxK.reshape(-1))
    return dW_enc_MxD.T, db_enc_M


prefix_mse.defvjp(_lean_fwd, _lean_bwd)


def autoencode_hierarchical_mse(params: dict, x_BxD, sae_cfg: sae.SAEConfig, cfg: HTopKConfig = HTopKConfig()):
    """(loss = mean over J of the prefix MSEs, mse_K, r_BxD = x̂_K − x, Code) of a TopK SAE on x, lean like
    `prefix_mse`; only `loss` carries a gradient (the other outputs are metrics, under stop_gradient).

    Without differentiation it is TopK's encoder (`sae.encode`) then `prefix_mse`'s forward walk. Under
    differentiation the forward computes the gradient too, because the prefix weights are fixed: TopK's
    encoder, x̂_K by one gathered sum, the backward walk (which collects the prefix MSEs), the encoder's
    scatter-adds; the backward only scales it. No [B, M] or [B, K, D] tensor in either pass.
    """
    loss, outs = _fused_loss(params, x_BxD, sae_cfg, cfg)
    return (loss, *jax.lax.stop_gradient(outs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fused_loss(params, x_BxD, sae_cfg, cfg):
    code = sae.encode(params, x_BxD, sae_cfg)
    (mse_K, rK_BxD), _ = _lean_fwd(*code, params["W_dec"], params["b_dec"], x_BxD, cfg.tile)
    return jnp.dot(prefix_weights(sae_cfg.k, cfg.prefixes), mse_K), (mse_K, rK_BxD, code)


def _fused_fwd(params, x_BxD, sae_cfg, cfg):
    code = sae.encode(params, x_BxD, sae_cfg)  # the encoder `loss` runs, so XLA merges the two
    W_enc_DxM, W_dec_MxD, b_dec_D = params["W_enc"], params["W_dec"], params["b_dec"]
    (B, K), D = code.vals_BxK.shape, x_BxD.shape[1]
    rK_BxD = sae._topk_residual(params, code, x_BxD)
    w_K = prefix_weights(K, cfg.prefixes)
    no_ct = jnp.zeros((0, D), jnp.float32)
    # Only Σ_b G goes into the parameters' gradients; the whole [B, D] G only into x's, from a second walk that
    # XLA drops unless x's gradient is used.
    dvals_BxK, dW_dec_MxD, G_1xD, sse_K = _walk_back(*code, W_dec_MxD, rK_BxD, w_K, no_ct, sum_G=True)
    mse_K = sse_K / (B * D)
    dpre_BxK = jnp.where(code.vals_BxK > 0, dvals_BxK, 0.0)  # the ReLU after top_k
    dW_enc_DxM, db_enc_M, Wdb_D = _encoder_scatter(code.idx_BxK, dpre_BxK, x_BxD, b_dec_D, W_enc_DxM)
    # The encoder reads x − b_dec: through it, dx = Σ_k dpre_k W_enc[:, idx_k] (dropped by XLA unless x's
    # gradient is used) and d(b_dec) = −Σ_b dx = −W_enc·d(b_enc), a mat-vec that the encoder's scatter returns.
    dx_enc_BxD = sae._gather_sum(dpre_BxK, code.idx_BxK, W_enc_DxM.T)
    grads = {**jax.tree.map(jnp.zeros_like, params), "W_enc": dW_enc_DxM, "b_enc": db_enc_M,
             "W_dec": dW_dec_MxD, "b_dec": G_1xD[0] - Wdb_D}
    grads = {name: g.astype(params[name].dtype) for name, g in grads.items()}
    dx_BxD = (dx_enc_BxD - _walk_back(*code, W_dec_MxD, rK_BxD, w_K, no_ct)[2]).astype(x_BxD.dtype)
    return (jnp.dot(w_K, mse_K), (mse_K, rK_BxD, code)), (grads, dx_BxD)


def _fused_bwd(sae_cfg, cfg, res, cts):
    grads, dx_BxD = res
    ct = cts[0]  # the other outputs are under stop_gradient: their cotangents are zero
    return jax.tree.map(lambda g: (ct * g).astype(g.dtype), grads), (ct * dx_BxD).astype(dx_BxD.dtype)


_fused_loss.defvjp(_fused_fwd, _fused_bwd)


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
            hmse, mse_K, r_BxD, code = autoencode_hierarchical_mse(params, x_BxD, sae_cfg, cfg)
        else:
            code = sae.encode(params, x_BxD, sae_cfg)
            mse_K, r_BxD = prefix_mse_reference(*code, params["W_dec"], params["b_dec"], x_BxD)
            hmse = jnp.dot(w_K, mse_K)
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
