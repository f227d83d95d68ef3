"""Sparse autoencoders: TopK, BatchTopK, JumpReLU and ReLU/L1, as pure functions over a params dict.

Params use the SAELens orientation: W_enc [D, M], b_enc [M], W_dec [M, D], b_dec [D] (+ threshold [M]
for JumpReLU). The encoder sees x − b_dec (OpenAI, sparsify, Anthropic); with `decoder_bias=False`
b_dec is kept at zero and never used, so the output is exactly zero unless latents fire.

Loss convention: "mse" is the per-element mean, mean over tokens AND dimensions of (x − x̂)²
(the HierarchicalTopK reference uses the same, so its K-prefix loss equals this TopK loss). The
sparsity penalties are divided by D as well, so `l1_coeff` and `l0_coeff` mean what they mean with a
summed-over-D MSE (Anthropic's λ = 5, Gemma Scope's λ): loss = (1/D)·(‖x − x̂‖² + λ·penalty), per token.

AuxK (Gao et al. 2024): among latents flagged dead (only the first `aux_max_dead` of them by id, to bound
the cost), the top `aux_k` pre-activations of each token (exactly that many; ties go to the lower id)
reconstruct the stop-gradient residual e = x − x̂ without b_dec (b_dec is already in x̂). The loss is the
FVU of that fit, Σ‖e − ê‖² / Σ‖e − ē‖² over the batch, scaled by min(#dead / min(aux_k, aux_max_dead, d_sae), 1)
as in sparsify, so it is exactly zero when nothing is dead; it is zero too when Σ‖e − ē‖² is at float32
rounding level, ≤ (B·ε)²·Σ‖e‖² (a batch of equal rows).

Speed (TopK training): `loss` runs encode+decode through a `jax.custom_vjp` whose only dense work is the forward
encoder matmul. The backward touches just the K selected latents of each token: dW_dec and dW_enc are scatter-adds
of B·K rows (in column blocks that stay in cache), d(vals) a gather-dot, and d(b_dec) through the encoder input is
−W_enc·d(b_enc) (a mat-vec) rather than a B×D×M product. Under `jax.vmap` over seeds a `custom_vmap` rule keeps
these plain per-seed row operations. No gradient w.r.t. x is formed unless asked for. `loss` goes one step further
(`_topk_mse`): the MSE's weights are fixed, so its forward forms the gradient at once from the residual r = x̂ − x,
summed from b_dec − x, the one [B, D] tensor of the step. On XLA:CPU the top-k and this backward run as
multi-threaded kernels (`cpu_kernels`, same results), and the encoder's matmul and top-k run fused in one kernel,
so no [B, M] pre-activation is ever allocated. The kernels read the weights whose gradients they return (the
encoder adds its bias as it selects), so XLA copies no weight ahead of an in-place optimiser update.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsae import cpu_kernels

ACTIVATIONS = ("topk", "batchtopk", "jumprelu", "relu")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    d_in: int = 576  # width of the input activations (D)
    d_sae: int = 4608  # number of latents (M)
    activation: str = "topk"  # topk | batchtopk | jumprelu | relu
    k: int = 32  # active latents per token (topk) or on average over the batch (batchtopk)
    l1_coeff: float = 5.0  # relu: L1 penalty weight on latent activations times decoder norms
    jumprelu_bandwidth: float = 0.001  # jumprelu: straight-through rectangle-kernel width
    jumprelu_init_threshold: float = 0.001  # jumprelu: initial threshold
    l0_coeff: float = 1.0  # jumprelu: L0 penalty weight
    aux_k: int = 512  # AuxK: dead latents used to model the residual (0 disables; capped at d_sae)
    aux_coeff: float = 1 / 32  # AuxK loss weight
    aux_max_dead: int = 512  # AuxK: only the first this-many dead latents (by id) are candidates; bounds its cost
    decoder_bias: bool = True  # False for Boost residual SAEs: output is exactly zero unless latents fire

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"d_in and d_sae must be >= 1, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.activation in ("topk", "batchtopk") and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got k={self.k}")
        if self.aux_k < 0 or self.aux_max_dead < 1:
            raise ValueError(f"need aux_k >= 0 and aux_max_dead >= 1, got aux_k={self.aux_k}, "
                             f"aux_max_dead={self.aux_max_dead}")
        if self.jumprelu_bandwidth <= 0:
            raise ValueError(f"jumprelu_bandwidth must be > 0, got {self.jumprelu_bandwidth}")


class Code(NamedTuple):
    """TopK code: the K largest activations of each token, sorted descending, and their latent ids."""

    vals_BxK: jax.Array
    idx_BxK: jax.Array


def init(key: jax.Array, cfg: SAEConfig, b_dec_init: jax.Array | None = None) -> dict:
    """Unit-norm random decoder rows, encoder = decoder transpose, zero biases."""
    W_dec_MxD = jax.random.normal(key, (cfg.d_sae, cfg.d_in), jnp.float32)
    W_dec_MxD = W_dec_MxD / jnp.linalg.norm(W_dec_MxD, axis=-1, keepdims=True)
    if b_dec_init is None:
        b_dec_D = jnp.zeros((cfg.d_in,), jnp.float32)
    elif not cfg.decoder_bias:
        raise ValueError("b_dec_init given but decoder_bias=False (b_dec must stay zero)")
    elif jnp.shape(b_dec_init) != (cfg.d_in,):
        raise ValueError(f"b_dec_init must have shape ({cfg.d_in},), got {jnp.shape(b_dec_init)}")
    else:
        b_dec_D = jnp.asarray(b_dec_init, jnp.float32)
    params = {"W_enc": W_dec_MxD.T, "b_enc": jnp.zeros((cfg.d_sae,), jnp.float32),
              "W_dec": W_dec_MxD, "b_dec": b_dec_D}
    if cfg.activation == "jumprelu":
        params["threshold"] = jnp.full((cfg.d_sae,), cfg.jumprelu_init_threshold, jnp.float32)
    return params


def _check_input(x_BxD: jax.Array, cfg: SAEConfig):
    if x_BxD.ndim != 2 or x_BxD.shape[-1] != cfg.d_in:
        raise ValueError(f"x must have shape [B, d_in={cfg.d_in}], got {tuple(x_BxD.shape)}")


def _b_dec(params: dict, cfg: SAEConfig) -> jax.Array:
    return params["b_dec"] if cfg.decoder_bias else jnp.zeros_like(params["b_dec"])


def pre_activations(params: dict, x_BxD: jax.Array, cfg: SAEConfig) -> jax.Array:
    """Encoder pre-activations (x − b_dec) W_enc + b_enc, dense [B, M]."""
    _check_input(x_BxD, cfg)
    return (x_BxD - _b_dec(params, cfg)) @ params["W_enc"] + params["b_enc"]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _jumprelu(z_BxM, threshold_M, bandwidth):
    return z_BxM * (z_BxM > threshold_M)


@_jumprelu.defjvp
def _jumprelu_jvp(eps, primals, tangents):
    # Straight-through estimator (Rajamanoharan et al. 2024): d/dθ = −(θ/ε)·rect((z − θ)/ε).
    z, theta = primals
    dz, dtheta = tangents
    on = z > theta
    rect = (jnp.abs(z - theta) < eps / 2) / eps
    return z * on, dz * on - dtheta * theta * rect


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _step(z_BxM, threshold_M, bandwidth):
    return (z_BxM > threshold_M).astype(z_BxM.dtype)


@_step.defjvp
def _step_jvp(eps, primals, tangents):
    # L0's straight-through estimator: only the threshold gets a gradient, −(1/ε)·rect((z − θ)/ε).
    z, theta = primals
    _, dtheta = tangents
    rect = (jnp.abs(z - theta) < eps / 2) / eps
    return (z > theta).astype(z.dtype), -dtheta * rect


def _gather_rows(W_MxD: jax.Array, idx_N: jax.Array) -> jax.Array:
    return jnp.asarray(W_MxD).at[idx_N].get(mode="promise_in_bounds")


def _col(a_BxK: jax.Array, k) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(a_BxK, k, 1, keepdims=False)


def _gather_sum(vals_BxK: jax.Array, idx_BxK: jax.Array, W_MxD: jax.Array, start_BxD: jax.Array | None = None):
    """start + Σ_k vals[:, k] · W[idx[:, k]] (start: zeros): the gathers fuse into the adds, nothing [B, K, D] is
    built."""
    B, K = vals_BxK.shape
    if start_BxD is None:
        start_BxD = jnp.zeros((B, W_MxD.shape[1]), vals_BxK.dtype)

    def add_row(k, acc_BxD):
        return acc_BxD + _col(vals_BxK, k)[:, None] * _gather_rows(W_MxD, _col(idx_BxK, k))

    # unroll=8: each trip is one fused gather-add, and the loop carry materialises the sum once (fully
    # unrolled, XLA fuses the sum into every consumer and materialises each gather instead).
    return jax.lax.fori_loop(0, K, add_row, start_BxD, unroll=min(K, 8))


def _top_k(pre_NxM: jax.Array, k: int, shape: tuple[int, ...] | None = None) -> Code:
    # On XLA:CPU `cpu_kernels` runs a multi-threaded kernel (XLA's TopK is one thread, ~0.7 encoder matmuls here);
    # elsewhere it is lax.top_k. The barrier keeps XLA:CPU on its TopK when the kernel is off: fusing the slice
    # into consumers turns it into a full sort.
    # The operand must be 2-D: on [S, B, M] XLA copies it to 2-D first, one more pass over [S, B, M]. The
    # results are reshaped to `shape` before the barrier: a barrier on the 2-D results of a batch-sharded
    # [S·B, M] crashes XLA's CPU compiler (a failed HLO downcast check, jax 0.10.2).
    vals_NxK, idx_NxK = cpu_kernels.top_k(pre_NxM, k)
    if shape is not None:
        vals_NxK, idx_NxK = vals_NxK.reshape(shape), idx_NxK.reshape(shape)
    vals_NxK, idx_NxK = jax.lax.optimization_barrier((vals_NxK, idx_NxK))
    return Code(jax.nn.relu(vals_NxK), idx_NxK)


# The TopK train path works on S seeds at once (leading S axis; x is [1, B, D] when the seeds share the
# batch). The encoder matmul and top-k are batched over S; the gathers and scatter-adds run seed by seed
# (`lax.map`), so each touches one seed's weights (cache-sized) with plain row operations that XLA:CPU
# fuses well. `jax.vmap` over seeds folds its axis into S through `custom_vmap` rather than producing
# batched gathers, which XLA:CPU does not fuse.
def _encode_seeds(k, W_enc_SxDxM, b_enc_SxM, b_dec_SxD, x_XxBxD):
    """(vals [S, B, K], idx [S, B, K]) of S TopK encoders.

    b_dec moves into the bias, (x − b_dec)·W + b = x·W + (b − b_dec·W), so the matmul reads x itself (shared by
    all seeds, or each seed's) and the weights as they are: no x − b_dec and no copy of W_enc with a bias row.
    """
    b_row_SxM = b_enc_SxM - jnp.einsum("SD,SDM->SM", b_dec_SxD, W_enc_SxDxM)
    return cpu_kernels.on_cpu(functools.partial(_encode_fused, k), functools.partial(_encode_batched, k),
                              x_XxBxD, W_enc_SxDxM, b_row_SxM)


def _decode_seeds(minus_x: bool, W_dec_SxMxD, b_dec_SxD, vals_SxBxK, idx_SxBxK, x_XxBxD):
    """(x̂ [S, B, D],) of S TopK decoders, or with `minus_x` (x̂ − x,): the sum then starts from b_dec − x, so the
    residual is built in the sum's own buffer rather than as one more [S, B, D] tensor."""
    x_shared = x_XxBxD.shape[0] == 1

    def one_seed(a):
        W_dec_MxD, b_dec_D, vals_BxK, idx_BxK, x_BxD = a
        if not minus_x:
            return _gather_sum(vals_BxK, idx_BxK, W_dec_MxD) + b_dec_D
        return _gather_sum(vals_BxK, idx_BxK, W_dec_MxD, b_dec_D - (x_XxBxD[0] if x_shared else x_BxD))

    xs = W_dec_SxMxD, b_dec_SxD, vals_SxBxK, idx_SxBxK, (b_dec_SxD if x_shared else x_XxBxD)
    return (jax.lax.map(one_seed, xs),)


def _encode_batched(k, x_XxBxD, W_enc_SxDxM, b_row_SxM):
    """Code [S, B, K] of every seed's x @ W_enc + b_row at once: the encoder on GPU and TPU (and on CPU without
    the kernels)."""
    (S, D, M), B = W_enc_SxDxM.shape, x_XxBxD.shape[1]
    if S > 1 and x_XxBxD.shape[0] == 1:
        # Seeds sharing a batch: one [B, D] x [D, S·M] matmul whose rows of S·M are S rows of M for the top-k.
        pre_BxSxM = (x_XxBxD[0] @ jnp.transpose(W_enc_SxDxM, (1, 0, 2)).reshape(D, S * M)).reshape(B, S, M)
        pre_BSxM = (pre_BxSxM + b_row_SxM).reshape(B * S, M)
        return tuple(a.transpose(1, 0, 2) for a in _top_k(pre_BSxM, k, (B, S, k)))
    x_SxBxD = jnp.broadcast_to(x_XxBxD, (S, B, D))
    pre_SxBxM = jnp.einsum("SBD,SDM->SBM", x_SxBxD, W_enc_SxDxM) + b_row_SxM[:, None]
    return tuple(_top_k(pre_SxBxM.reshape(S * B, M), k, (S, B, k)))


def _encode_fused(k, x_XxBxD, W_enc_SxDxM, b_row_SxM):
    """`_encode_batched` on XLA:CPU: `cpu_kernels.encode_top_k`, the matmul and the top-k fused, so no [B, M]
    pre-activation is stored (whole, it was 75 MB at B=4096, M=4608, page-faulted afresh every step, and read
    back by the top-k)."""
    vals_SxBxK, idx_SxBxK = cpu_kernels.encode_top_k(x_XxBxD, W_enc_SxDxM, b_row_SxM, k)
    return jax.nn.relu(vals_SxBxK), idx_SxBxK


def _chunk_width(D: int) -> int:
    """The divisor of D nearest 144: column blocks whose [M, c] accumulators stay in cache."""
    return min((c for c in range(1, D + 1) if D % c == 0), key=lambda c: abs(c - 144))


def _cols(a_RxD: jax.Array, j, c: int) -> jax.Array:
    """Columns [j·c, (j+1)·c) of a_RxD: a slice that fuses into its consumer, not a transposed copy."""
    return jax.lax.dynamic_slice_in_dim(a_RxD, j * c, c, axis=1)


def _bwd_one_seed(k, scale, W_dec_MxD, x_in_BxD, vals_BxK, idx_BxK, g_BxD, g_vals_BxK):
    """(dW_dec [M, D], dW_enc [D, M], d(b_enc) [M]) of one seed whose x̂ has the gradient scale·g, in XLA
    (`_bwd_kernels` on XLA:CPU).

    Both passes walk D in blocks of c columns, so each scatter-add hits an [M, c] accumulator and each
    gathered [B, c] block that stay in cache, unlike full-width [M, D] rows on a CPU. The blocks are column
    slices of the operands (`_cols`): stacking them as [D // c, R, c] costs a transpose and a copy of
    W_dec, x_in and g each step.
    """
    M, D = W_dec_MxD.shape
    c = _chunk_width(D)

    def dvals_block(j, dvals_BxK):  # adds the block's share of g_b · W_dec[idx[b, k]]
        g_Bxc, W_Mxc = _cols(g_BxD, j, c), _cols(W_dec_MxD, j, c)

        def one_k(kk, dvals_BxK):
            return dvals_BxK.at[:, kk].add(jnp.sum(g_Bxc * _gather_rows(W_Mxc, _col(idx_BxK, kk)), -1))

        return jax.lax.fori_loop(0, k, one_k, dvals_BxK)

    dvals_BxK = scale * jax.lax.fori_loop(0, D // c, dvals_block, jnp.zeros_like(g_vals_BxK)) + g_vals_BxK
    dpre_BxK = jnp.where(vals_BxK > 0, dvals_BxK, 0.0)  # through the ReLU
    coef_BxK = scale * vals_BxK

    def scatter_block(j, carry):  # dW_dec[idx] += scale · val · g and dW_enc[:, idx] += dpre · x_in, block columns
        g_Bxc, x_Bxc = _cols(g_BxD, j, c), _cols(x_in_BxD, j, c)

        def one_k(kk, acc):
            dW_dec_Mxc, dW_enc_Mxc = acc
            i_B = _col(idx_BxK, kk)
            return (dW_dec_Mxc.at[i_B].add(_col(coef_BxK, kk)[:, None] * g_Bxc, mode="promise_in_bounds"),
                    dW_enc_Mxc.at[i_B].add(_col(dpre_BxK, kk)[:, None] * x_Bxc, mode="promise_in_bounds"))

        zeros_Mxc = jnp.zeros((M, c), g_BxD.dtype)
        dW_dec_Mxc, dW_enc_Mxc = jax.lax.fori_loop(0, k, one_k, (zeros_Mxc, zeros_Mxc))
        return tuple(jax.lax.dynamic_update_slice_in_dim(full_MxD, block_Mxc, j * c, axis=1)
                     for full_MxD, block_Mxc in zip(carry, (dW_dec_Mxc, dW_enc_Mxc)))

    zeros_MxD = jnp.zeros((M, D), g_BxD.dtype)
    dW_dec_MxD, dW_enc_MxD = jax.lax.fori_loop(0, D // c, scatter_block, (zeros_MxD, zeros_MxD))
    db_enc_M = jnp.zeros((M,), g_BxD.dtype).at[idx_BxK.reshape(-1)].add(dpre_BxK.reshape(-1))
    return dW_dec_MxD, dW_enc_MxD.T, db_enc_M


def _dx_one_seed(scale, W_enc_DxM, W_dec_MxD, vals_BxK, idx_BxK, g_BxD, g_vals_BxK):
    """d(loss)/dx of one seed through the encoder, the K selected latents (x̂'s gradient: scale·g)."""
    dvals_BxK = scale * jnp.einsum("BD,BKD->BK", g_BxD, _gather_rows(W_dec_MxD, idx_BxK)) + g_vals_BxK
    return _gather_sum(jnp.where(vals_BxK > 0, dvals_BxK, 0.0), idx_BxK, W_enc_DxM.T)


def _bwd_xla(k, scale, W_enc_SxDxM, W_dec_SxMxD, b_dec_SxD, vals_SxBxK, idx_SxBxK, g_SxBxD, g_vals_SxBxK, x_XxBxD):
    """(dW_dec, dW_enc, d(b_enc), W_enc·d(b_enc)) of S seeds, seed by seed (`lax.map`), each touching one seed's
    weights."""
    x_shared = x_XxBxD.shape[0] == 1

    def one_seed(a):
        W_dec_MxD, b_dec_D, x_BxD, *rest = a
        return _bwd_one_seed(k, scale, W_dec_MxD, (x_XxBxD[0] if x_shared else x_BxD) - b_dec_D, *rest)

    xs = W_dec_SxMxD, b_dec_SxD, (b_dec_SxD if x_shared else x_XxBxD), vals_SxBxK, idx_SxBxK, g_SxBxD, g_vals_SxBxK
    dW_dec_SxMxD, dW_enc_SxDxM, db_enc_SxM = jax.lax.map(one_seed, xs)
    return dW_dec_SxMxD, dW_enc_SxDxM, db_enc_SxM, jnp.einsum("SDM,SM->SD", W_enc_SxDxM, db_enc_SxM)


def _bwd_kernels(scale, W_enc_SxDxM, W_dec_SxMxD, b_dec_SxD, vals_SxBxK, idx_SxBxK, g_SxBxD, g_vals_SxBxK, x_XxBxD):
    """`_bwd_xla` by `cpu_kernels`, all seeds per call: no per-seed x − b_dec, stacking copies or transposes; the
    scale rides in the [S, B, K] coefficients, so no scaled [S, B, D] gradient is formed. Each kernel reads the
    weights whose gradient it returns, so XLA need not copy them ahead of the in-place optimiser update."""
    dv_SxBxK, dW_dec_SxMxD = cpu_kernels.decoder_grads(g_SxBxD, W_dec_SxMxD, idx_SxBxK, scale * vals_SxBxK)
    dpre_SxBxK = jnp.where(vals_SxBxK > 0, scale * dv_SxBxK + g_vals_SxBxK, 0.0)
    dW_enc_SxDxM, db_enc_SxM, Wdb_SxD = cpu_kernels.encoder_grads(idx_SxBxK, dpre_SxBxK, x_XxBxD, b_dec_SxD,
                                                                  W_enc_SxDxM)
    return dW_dec_SxMxD, dW_enc_SxDxM, db_enc_SxM, Wdb_SxD


def _bwd_seeds(k, scale, W_enc_SxDxM, W_dec_SxMxD, b_dec_SxD, vals_SxBxK, idx_SxBxK, g_SxBxD, g_vals_SxBxK,
               x_XxBxD):
    """(dW_enc, d(b_enc), dW_dec, d(b_dec), dx [S, B, D]) of S TopK SAEs whose x̂ has the gradient scale·g (and
    their code's values g_vals), touching only the selected latents. dx is through the encoder only."""
    args = W_enc_SxDxM, W_dec_SxMxD, b_dec_SxD, vals_SxBxK, idx_SxBxK, g_SxBxD, g_vals_SxBxK, x_XxBxD
    dW_dec_SxMxD, dW_enc_SxDxM, db_enc_SxM, Wdb_SxD = cpu_kernels.on_cpu(
        functools.partial(_bwd_kernels, scale), functools.partial(_bwd_xla, k, scale), *args)
    # x_in = x − b_dec, so through the encoder d(b_dec) = −Σ_b dx_in[b] = −W_enc·d(b_enc): a mat-vec.
    db_dec_SxD = scale * g_SxBxD.sum(1) - Wdb_SxD
    # dx is only computed when the caller differentiates w.r.t. x (otherwise XLA drops it).
    dx_SxBxD = jax.lax.map(lambda a: _dx_one_seed(scale, *a),
                           (W_enc_SxDxM, W_dec_SxMxD, vals_SxBxK, idx_SxBxK, g_SxBxD, g_vals_SxBxK))
    return dW_enc_SxDxM, db_enc_SxM, dW_dec_SxMxD, db_dec_SxD, dx_SxBxD


def _fold(a: jax.Array, batched: bool, n: int) -> jax.Array:
    """[n, S, ...] (or unbatched [S, ...], broadcast) -> [n·S, ...]."""
    a = a if batched else jnp.broadcast_to(a, (n,) + a.shape)
    return a.reshape((-1,) + a.shape[2:])


def _fold_x(x_XxBxD: jax.Array, batched: bool, n: int, S: int) -> jax.Array:
    """x stays [1, B, D] when every seed shares it; otherwise it becomes [n·S, B, D]."""
    if not batched and x_XxBxD.shape[0] == 1:
        return x_XxBxD
    x = x_XxBxD if batched else jnp.broadcast_to(x_XxBxD, (n,) + x_XxBxD.shape)
    return jnp.broadcast_to(x, (n, S) + x.shape[2:]).reshape((n * S,) + x.shape[2:])


@functools.lru_cache(maxsize=None)
def _per_seed(fn, *static):
    """fn(*static, *args) over S seeds (params [S, ...] first, x [1, B, D] or [S, B, D] last), returning a tuple, as
    a `custom_vmap` whose rule folds a vmapped axis into S."""
    f = jax.custom_batching.custom_vmap(functools.partial(fn, *static))

    @f.def_vmap
    def rule(n, batched, *args):
        S = args[0].shape[1] if batched[0] else args[0].shape[0]
        folded = [_fold(a, b, n) for a, b in zip(args[:-1], batched[:-1])]
        outs = f(*folded, _fold_x(args[-1], batched[-1], n, S))
        return tuple(o.reshape((n, S) + o.shape[1:]) for o in outs), (True,) * len(outs)

    return f


def _encode_one(W_enc_DxM, b_enc_M, b_dec_D, x_BxD, k):
    """(vals [1, B, K], idx [1, B, K]) of one TopK encoder, through `_per_seed`."""
    return _per_seed(_encode_seeds, k)(W_enc_DxM[None], b_enc_M[None], b_dec_D[None], x_BxD[None])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _topk_autoencode(W_enc_DxM, b_enc_M, W_dec_MxD, b_dec_D, x_BxD, k):
    """(x̂, Code) of one TopK SAE, with the sparse backward `_bwd_seeds`."""
    return _topk_autoencode_fwd(W_enc_DxM, b_enc_M, W_dec_MxD, b_dec_D, x_BxD, k)[0]


def _topk_autoencode_fwd(W_enc_DxM, b_enc_M, W_dec_MxD, b_dec_D, x_BxD, k):
    vals, idx = _encode_one(W_enc_DxM, b_enc_M, b_dec_D, x_BxD, k)
    weights = W_enc_DxM[None], W_dec_MxD[None], b_dec_D[None]
    x_hat, = _per_seed(_decode_seeds, False)(*weights[1:], vals, idx, x_BxD[None])
    return (x_hat[0], Code(vals[0], idx[0])), (*weights, vals, idx, x_BxD[None])


def _topk_autoencode_bwd(k, res, cts):
    g_BxD, (g_vals_BxK, _) = cts
    *weights, vals, idx, x = res
    grads = _per_seed(_bwd_seeds, k, 1.0)(*weights, vals, idx, g_BxD[None], g_vals_BxK[None], x)
    return tuple(a[0] for a in grads)


_topk_autoencode.defvjp(_topk_autoencode_fwd, _topk_autoencode_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _topk_mse(W_enc_DxM, b_enc_M, W_dec_MxD, b_dec_D, x_BxD, k):
    """(mse, r = x̂ − x, Code) of one TopK SAE; only mse carries a gradient (callers put the rest under
    stop_gradient).

    Under differentiation the forward forms the gradient at once, as the loss's weights are fixed: dL/dx̂ = c·r with
    c = 2/(B·D), and c rides in the sparse backward's [B, K] coefficients, so r is the step's only [B, D] tensor
    (loss, metrics, AuxK and the backward all read it). The backward scales the saved gradient.
    """
    vals, idx = _encode_one(W_enc_DxM, b_enc_M, b_dec_D, x_BxD, k)
    r, = _per_seed(_decode_seeds, True)(W_dec_MxD[None], b_dec_D[None], vals, idx, x_BxD[None])
    return jnp.sum(r * r) / x_BxD.size, r[0], Code(vals[0], idx[0])


def _topk_mse_fwd(W_enc_DxM, b_enc_M, W_dec_MxD, b_dec_D, x_BxD, k):
    vals, idx = _encode_one(W_enc_DxM, b_enc_M, b_dec_D, x_BxD, k)
    weights = W_enc_DxM[None], W_dec_MxD[None], b_dec_D[None]
    r, = _per_seed(_decode_seeds, True)(*weights[1:], vals, idx, x_BxD[None])
    c = 2.0 / x_BxD.size
    *grads, dx_enc = _per_seed(_bwd_seeds, k, c)(*weights, vals, idx, r, jnp.zeros_like(vals), x_BxD[None])
    dx_BxD = dx_enc[0] - c * r[0]  # x also enters r directly (dropped by XLA unless x's gradient is used)
    return (jnp.sum(r * r) / x_BxD.size, r[0], Code(vals[0], idx[0])), (tuple(g[0] for g in grads), dx_BxD)


def _topk_mse_bwd(k, res, cts):
    grads, dx_BxD = res
    return tuple(cts[0] * g for g in (*grads, dx_BxD))


_topk_mse.defvjp(_topk_mse_fwd, _topk_mse_bwd)


def _topk_residual(params: dict, code: Code, x_BxD: jax.Array) -> jax.Array:
    """x̂ − x of a TopK code, summed from b_dec − x in one [B, D] buffer (seed-folded under vmap, as `loss`'s)."""
    r, = _per_seed(_decode_seeds, True)(params["W_dec"][None], params["b_dec"][None], code.vals_BxK[None],
                                        code.idx_BxK[None], x_BxD[None])
    return r[0]


def _batchtopk(pre_BxM: jax.Array, k: int) -> jax.Array:
    """Keep the B·k largest (ReLU'd) activations across the whole batch."""
    B, M = pre_BxM.shape
    acts_BM = jax.nn.relu(pre_BxM).reshape(-1)
    _, idx = jax.lax.top_k(acts_BM, B * k)
    return jnp.zeros_like(acts_BM).at[idx].set(acts_BM[idx]).reshape(B, M)


def _topk_args(params: dict, x_BxD: jax.Array, cfg: SAEConfig):
    _check_input(x_BxD, cfg)
    return params["W_enc"], params["b_enc"], params["W_dec"], _b_dec(params, cfg), x_BxD


def encode(params: dict, x_BxD: jax.Array, cfg: SAEConfig) -> Code | jax.Array:
    """TopK: `Code` (sorted descending); the other activations: dense acts [B, M]."""
    if cfg.activation == "topk":  # the train path's encoder, so XLA merges it with a `loss` on the same batch
        return _topk_autoencode(*_topk_args(params, x_BxD, cfg), cfg.k)[1]
    pre_BxM = pre_activations(params, x_BxD, cfg)
    if cfg.activation == "batchtopk":
        return _batchtopk(pre_BxM, cfg.k)
    if cfg.activation == "jumprelu":
        return _jumprelu(pre_BxM, params["threshold"], cfg.jumprelu_bandwidth)
    return jax.nn.relu(pre_BxM)


def decode(params: dict, code: Code | jax.Array, cfg: SAEConfig) -> jax.Array:
    """x̂ = acts W_dec + b_dec; a `Code` gathers its K decoder rows per token and never forms [B, M]."""
    if isinstance(code, Code):
        x_hat_BxD = _gather_sum(code.vals_BxK, code.idx_BxK, params["W_dec"])
    else:
        x_hat_BxD = code @ params["W_dec"]
    return x_hat_BxD + _b_dec(params, cfg)


def apply(params: dict, x_BxD: jax.Array, cfg: SAEConfig) -> jax.Array:
    """Reconstruction x̂ of x."""
    if cfg.activation == "topk":
        return _topk_autoencode(*_topk_args(params, x_BxD, cfg), cfg.k)[0]
    return decode(params, encode(params, x_BxD, cfg), cfg)


def aux_loss(params, x_BxD, resid_BxD, dead_M, cfg):
    """AuxK: FVU of the residual modelled by the top `aux_k` dead pre-activations; 0 if none dead, if
    `dead_M` is None (no firing statistics, e.g. outside the trainer) or if AuxK is off (`aux_k=0`).

    Only the first `aux_max_dead` dead latents (by id) are candidates, gathered into a dense [B, N]
    problem: its cost is N/M of the encoder matmul, whatever the activation. Each token uses exactly
    min(aux_k, N) of them (ties at the cut go to the lower id, as in `lax.top_k`). A residual whose
    variance is at rounding level (`_degenerate_variance`) gives 0, not Σ‖e − ê‖² / noise.
    """
    if dead_M is None or cfg.aux_k == 0:
        return jnp.zeros(())
    N = min(cfg.aux_max_dead, cfg.d_sae)
    A = min(cfg.aux_k, N)
    B = x_BxD.shape[0]
    num_dead = jnp.sum(dead_M)
    ids_N = jnp.nonzero(dead_M, size=N, fill_value=0)[0]
    W_enc_DxN = params["W_enc"][:, ids_N]
    # x W − b_dec W rather than (x − b_dec) W: d(b_dec) is then a mat-vec, not a [B, D] × [D, N] product.
    pre_BxN = x_BxD @ W_enc_DxN - _b_dec(params, cfg) @ W_enc_DxN + params["b_enc"][ids_N]
    pre_BxN = jnp.where(jnp.arange(N) < num_dead, pre_BxN, -jnp.inf)
    if A < N:  # keep each token's A largest by index, so ties at the A-th value cannot let more through
        idx_BxA = jax.lax.top_k(jax.lax.stop_gradient(pre_BxN), A)[1]
        keep_BxN = jnp.zeros((B, N), bool).at[jnp.arange(B)[:, None], idx_BxA].set(True)
        pre_BxN = jnp.where(keep_BxN, pre_BxN, -jnp.inf)
    acts_BxN = jnp.where(jnp.isfinite(pre_BxN), jax.nn.relu(pre_BxN), 0.0)
    e_BxD = jax.lax.stop_gradient(resid_BxD)
    e_hat_BxD = acts_BxN @ params["W_dec"][ids_N]
    var = jnp.sum((e_BxD - e_BxD.mean(0)) ** 2)
    ok = ~_degenerate_variance(var, jnp.sum(e_BxD**2), B)
    scale = jnp.minimum(num_dead / A, 1.0) * ok
    return scale * jnp.sum((e_BxD - e_hat_BxD) ** 2) / jnp.where(ok, var, 1.0)


def _degenerate_variance(var, energy, B: int) -> jax.Array:
    """True when a centred sum of squares `var` of B rows (float32: ε = 2⁻²³) is indistinguishable from rounding.

    A float32 sum of B terms, in any order, is off by at most (B−1)·u·Σ|terms| (u = ε/2, Higham's γ_{B−1});
    so each column mean is off by at most B·u·mean|e|, and rows that are all equal come out with a
    `var` of at most (B·u)²·Σ‖e‖² (Σ‖e‖² = `energy`). (B·ε)² = 4·(B·u)² leaves room for the rounding of the
    squares and of the 1/B. Below it the variance is noise (e.g. repeated rows, or x = 0 with biases),
    and dividing by it would give an FVU of ~1e13; var = energy = 0 (a perfect fit) counts as degenerate too.
    """
    tol = (B * float(jnp.finfo(var.dtype).eps)) ** 2
    return var <= tol * energy


def loss(params: dict, x_BxD: jax.Array, cfg: SAEConfig, dead_M: jax.Array | None = None):
    """Training loss of one SAE on one batch and its scalar metrics ("mse", "aux", "l0", "fvu", ...)."""
    _check_input(x_BxD, cfg)
    D = cfg.d_in
    metrics = {}
    penalty = 0.0
    if cfg.activation == "topk":  # r = x̂ − x from the fused MSE (`_topk_mse`), the step's only [B, D] tensor
        mse, r_BxD, code = _topk_mse(*_topk_args(params, x_BxD, cfg), cfg.k)
        r_BxD, code = jax.lax.stop_gradient((r_BxD, code))
        resid_BxD = -r_BxD
    else:
        pre_BxM = pre_activations(params, x_BxD, cfg)
        if cfg.activation == "batchtopk":
            code = _batchtopk(pre_BxM, cfg.k)
        elif cfg.activation == "jumprelu":
            code = _jumprelu(pre_BxM, params["threshold"], cfg.jumprelu_bandwidth)
            l0_BxM = _step(pre_BxM, params["threshold"], cfg.jumprelu_bandwidth)
            penalty = cfg.l0_coeff * jnp.mean(jnp.sum(l0_BxM, -1)) / D
        else:
            code = jax.nn.relu(pre_BxM)
            l1 = jnp.mean(code @ jnp.linalg.norm(params["W_dec"], axis=-1))
            metrics["l1"] = l1
            penalty = cfg.l1_coeff * l1 / D
        resid_BxD = x_BxD - decode(params, code, cfg)
        mse = jnp.mean(resid_BxD**2)
    l0 = jnp.mean(jnp.sum((code.vals_BxK if isinstance(code, Code) else code) != 0, axis=-1))
    aux = aux_loss(params, x_BxD, resid_BxD, dead_M, cfg)
    total = mse + penalty + cfg.aux_coeff * aux
    var = jnp.sum((x_BxD - x_BxD.mean(0)) ** 2)
    fvu = jnp.sum(resid_BxD**2) / jnp.where(var > 0, var, 1.0)
    metrics.update(loss=total, mse=mse, aux=aux, l0=l0, fvu=jax.lax.stop_gradient(fvu))
    return total, metrics


def normalize_decoder(params: dict) -> dict:
    """Rows of W_dec rescaled to unit norm."""
    W_dec_MxD = params["W_dec"]
    norm_Mx1 = jnp.linalg.norm(W_dec_MxD, axis=-1, keepdims=True)
    return {**params, "W_dec": W_dec_MxD / jnp.maximum(norm_Mx1, 1e-12)}


def project_decoder_grads(params: dict, grads: dict) -> dict:
    """Remove from each row of dW_dec its component along that decoder row (keeps norms fixed to first order)."""
    W_dec_MxD, g_MxD = params["W_dec"], grads["W_dec"]
    along_M = jnp.einsum("MD,MD->M", W_dec_MxD, g_MxD) / jnp.maximum(jnp.sum(W_dec_MxD**2, -1), 1e-12)
    return {**grads, "W_dec": g_MxD - along_M[:, None] * W_dec_MxD}


def batchtopk_to_jumprelu(params: dict, cfg: SAEConfig, x_NxD: jax.Array, batch_size: int = 4096):
    """Freeze a BatchTopK SAE into a JumpReLU one with ONE scalar threshold for all latents.

    The threshold is the mean, over the full batches of `x_NxD`, of the smallest positive activation that
    BatchTopK keeps (Bussmann et al. 2024); a per-latent threshold would be noisy for rare latents.
    """
    if cfg.activation != "batchtopk":
        raise ValueError(f"expected a batchtopk config, got activation={cfg.activation!r}")
    _check_input(x_NxD, cfg)
    num_batches = x_NxD.shape[0] // batch_size
    if num_batches < 1:
        raise ValueError(f"need at least batch_size={batch_size} rows, got {x_NxD.shape[0]}")

    @jax.jit
    def min_kept(x_BxD):
        acts_BxM = _batchtopk(pre_activations(params, x_BxD, cfg), cfg.k)
        return jnp.min(jnp.where(acts_BxM > 0, acts_BxM, jnp.inf))

    xs = x_NxD[: num_batches * batch_size].reshape(num_batches, batch_size, cfg.d_in)
    theta = jnp.mean(jnp.stack([min_kept(x) for x in xs]))
    new_cfg = dataclasses.replace(cfg, activation="jumprelu")
    return {**params, "threshold": jnp.full((cfg.d_sae,), theta, jnp.float32)}, new_cfg
